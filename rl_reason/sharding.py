"""Device mesh, logical-axis rules, and sharded creation of the policy.

Sharding is declared once: parameters carry logical axis names (models/transformer.py) and
`LOGICAL_RULES` (models/partitioning.py, re-exported here) maps each name to a mesh axis. The
mesh has three axes:

  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters sharded over their `embed` dimension
  tensor  model parallelism over heads, MLP hidden units and the vocabulary

Batches are split over data x fsdp. The mesh is real on one CPU device too (all axes of size
1), so there is one code path everywhere.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models import ModelConfig, Transformer
from models.partitioning import (  # noqa: F401  (re-exported: the one rules table)
    BATCH_AXES,
    LOGICAL_RULES,
    logical_to_spec,
    state_shardings,
)

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; one axis may be -1 for "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh axis sizes must be positive or -1, got {sizes}")
        known = int(np.prod([s for s in sizes if s != -1]))
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"{num_devices} devices do not divide into mesh {sizes}")
            sizes[sizes.index(-1)] = num_devices // known
        if int(np.prod(sizes)) != num_devices:
            raise ValueError(
                f"mesh {dict(zip(AXES, sizes, strict=True))} needs {int(np.prod(sizes))} "
                f"devices, but {num_devices} are available"
            )
        return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with Auto axis types (shardings propagate through jit without `set_mesh`)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.shape(len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def batch_sharding(mesh: Mesh, rank: int) -> NamedSharding:
    """Leading (batch) dimension over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (rank - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def create_model(cfg: ModelConfig, mesh: Mesh, seed: int = 0):
    """(graphdef, params) with every parameter created directly in its shards.

    eval_shape gives the structure without allocating; the jitted init then materialises each
    parameter already split across the mesh, never whole on one device.
    """
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh)

    def init():
        return nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))[1]

    return graphdef, jax.jit(init, out_shardings=shardings)()
