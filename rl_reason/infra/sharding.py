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
import os
from collections.abc import Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
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
        named = dict(zip(AXES, sizes, strict=True))
        if sizes.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {named}")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh axis sizes must be positive or -1, got {named}")
        known = int(np.prod([s for s in sizes if s != -1]))
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"{num_devices} devices do not divide into mesh {named}")
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


def batch_shards(mesh: Mesh) -> int:
    """How many ways a batch is split (data x fsdp): batch sizes must be multiples of it."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def opt_state_shardings(optimizer, params, params_shardings):
    """Shardings of `optimizer.init(params)`: moments like their parameter, the rest (step
    counters) replicated on the same mesh.

    `params` may be abstract; `params_shardings` has its tree structure (`state_shardings`).
    A jitted init would otherwise leave the counters unsharded (STACK.md).
    """
    mesh = jax.tree.leaves(params_shardings)[0].mesh
    abstract = jax.eval_shape(optimizer.init, params)
    return optax.tree_map_params(
        optimizer,
        lambda _, s: s,
        abstract,
        params_shardings,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )


# --- multi-host ------------------------------------------------------------------------------

_TPU_ENV = (
    "TPU_WORKER_HOSTNAMES",
    "CLOUD_TPU_TASK_ID",
    "TPU_WORKER_ID",
    "MEGASCALE_COORDINATOR_ADDRESS",
)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> tuple[int, int]:
    """Start JAX's multi-controller runtime; returns (process_index, process_count).

    With a coordinator address (flags), all three of address / count / id are needed. Without
    one, a TPU VM slice (or SLURM / Open MPI launch) is detected from its environment and
    `jax.distributed.initialize()` reads the topology itself; otherwise this is one process and
    nothing is started. Call it before any other JAX call touches the devices.
    """
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError(
                "a coordinator address needs num_processes and process_id too (e.g. "
                "--coordinator_address=10.0.0.2:1234 --num_processes=2 --process_id=0)"
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id} is not in [0, {num_processes})")
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            local_device_ids=local_device_ids,
        )
    elif num_processes not in (None, 1):
        raise ValueError(
            f"num_processes={num_processes} needs a coordinator_address (host:port of process 0)"
        )
    elif any(k in os.environ for k in _TPU_ENV) or "SLURM_JOB_ID" in os.environ:
        jax.distributed.initialize()
    log.info(
        "JAX process %d of %d, %d local devices of %d",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return jax.process_index(), jax.process_count()


def from_global_full(full, mesh: Mesh) -> jax.Array:
    """A global array from host data every process holds whole: batch-sharded over its
    leading axis (a scalar is replicated)."""
    full = np.asarray(full)
    sharding = batch_sharding(mesh, full.ndim) if full.ndim else replicated(mesh)
    return jax.make_array_from_callback(full.shape, sharding, lambda index: full[index])


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, as numpy (all of it on one host)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    shards = {}
    for shard in x.addressable_shards:
        start = shard.index[0].start or 0
        shards.setdefault(start, shard.data)
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)], axis=0)


def all_rows(local) -> np.ndarray:
    """Every process's rows, in process order (the global batch), on every host."""
    local = np.asarray(local)
    if jax.process_count() == 1:
        return local
    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def mesh_of(params) -> Mesh:
    """The mesh the params live on; a one-device mesh for params on a single device."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
        if sharding is not None:
            devices = sorted(sharding.device_set, key=lambda d: d.id)
            if len(devices) == 1:
                return Mesh(np.asarray(devices).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
            break
    raise ValueError(
        "cannot tell which mesh the params live on: create them with "
        "rl_reason.infra.sharding.create_model (or pass mesh=)"
    )


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


def check_batch_split(prompts: int, rows_per_minibatch: int, mesh: Mesh, processes: int) -> None:
    """The step's prompts and each minibatch's rows split evenly over the batch shards (and the
    prompts over the processes), or an error naming what to change."""
    shards, problems = batch_shards(mesh), []
    if prompts % shards:
        problems.append(f"prompts_per_step ({prompts})")
    if rows_per_minibatch % shards:
        problems.append(f"rows per minibatch ({rows_per_minibatch})")
    if prompts % processes:
        problems.append(f"prompts_per_step over {processes} processes")
    if problems:
        raise ValueError(
            f"{' and '.join(problems)} must split evenly over the {shards} batch shards "
            f"(data x fsdp) of mesh {dict(mesh.shape)}: change prompts_per_step, "
            "group_size or optim.minibatches, or the mesh"
        )
