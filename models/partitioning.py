"""Logical axis names -> mesh axes: the one rules table, and the shardings it gives.

Parameters carry logical axis names (models/transformer.py); `LOGICAL_RULES` maps each name to
a mesh axis of the data x fsdp x tensor mesh that `rl_reason.infra.sharding` builds. It lives here,
beside the model, so that `models.from_pretrained(path, mesh=...)` can place weights shard by
shard without importing the RL library; `rl_reason.infra.sharding` uses this same table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axis (or None: replicated).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("lora_rank", None),
    ("cache_seq", None),
)


def logical_to_spec(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=LOGICAL_RULES
) -> PartitionSpec:
    """PartitionSpec for an array with these logical axis names.

    A dimension whose size the mesh axis does not divide is replicated instead, with a warning:
    e.g. 2 kv-heads on a tensor axis of 4. A mesh axis is used at most once per array.
    """
    table = dict(rules)
    spec, used = [], set()
    for name, size in zip(names, shape, strict=True):
        axis = table.get(name) if name is not None else None
        axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
        axes = tuple(a for a in axes if a in mesh.shape and a not in used and mesh.shape[a] > 1)
        ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if axes and size % ways:
            log.warning(
                "dimension %r of size %d is not divisible by mesh axes %s (%d): replicating it",
                name,
                size,
                axes,
                ways,
            )
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def variable_spec(var, mesh: Mesh, rules=LOGICAL_RULES) -> PartitionSpec:
    """The PartitionSpec of one nnx.Variable from its `out_sharding` names (none: replicated)."""
    names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
    if names is None:
        return PartitionSpec()
    return logical_to_spec(names, var.shape, mesh, rules)


def state_shardings(abstract_state, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for an nnx.State of Variables, from their logical axis names.

    The result has the state's own tree structure (each Variable holding its sharding), so it
    zips with the params in `jax.tree.map`, optax's `tree_map_params` and jit shardings alike.
    """
    is_var = lambda x: isinstance(x, nnx.Variable)
    variables = jax.tree.leaves(abstract_state, is_leaf=is_var)
    shardings = [NamedSharding(mesh, variable_spec(v, mesh, rules)) for v in variables]
    return jax.tree.unflatten(jax.tree.structure(abstract_state), shardings)
