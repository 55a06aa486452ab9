"""A checkpoint saved from one mesh, restored onto other mesh shapes; checked for
tests/test_checkpoint_sharded.py in the shared 8-device process (tests/multidevice/runner.py).

The saved state is what the trainer holds: the policy's params as an nnx.State created sharded
by `sharding.create_model`, an AdamW state after one real update, a step counter and a PRNG key.
Every check is an assert here; OUT_DIR/oks.json lists the restores that passed them all.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models import Transformer
from models.config import get_config
from rl_reason.core import update as train_step
from rl_reason.core.config import OptimOptions
from rl_reason.infra.checkpoint import Checkpointer, abstract_on, abstract_opt_state
from rl_reason.infra.sharding import MeshConfig, create_model, make_mesh, state_shardings

CFG = get_config("tiny", vocab_size=64, embed_dim=32, mlp_dim=64, num_layers=1, head_dim=8)
TX = train_step.make_optimizer(OptimOptions(learning_rate=1e-2))
RESTORES = [
    (MeshConfig(8, 1, 1), [MeshConfig(1, 4, 2), MeshConfig(2, 2, 2)]),
    (MeshConfig(1, 4, 2), [MeshConfig(2, 2, 2), MeshConfig(8, 1, 1)]),
]


def trained_state(mesh):
    _, params = create_model(CFG, mesh, seed=0)
    opt_state = TX.init(params)
    grads = jax.tree.map(lambda p: 0.1 * jnp.cos(p), params)
    updates, opt_state = jax.jit(TX.update)(grads, opt_state, params)
    params = jax.jit(lambda p, u: jax.tree.map(jnp.add, p, u))(params, updates)
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.asarray(7),
        "key": jax.random.key(3),
    }


def target_on(mesh):
    abstract_params = nnx.split(nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(0))))[1]
    shardings = state_shardings(abstract_params, mesh)
    params = abstract_on(abstract_params, shardings)
    replicated = NamedSharding(mesh, P())
    return {
        "params": params,
        "opt_state": abstract_opt_state(TX, params),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        "key": jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated),
    }, shardings


def check(saved, restored, target, shardings, mesh, label):
    flat_saved = jax.tree_util.tree_flatten_with_path(saved)[0]
    flat_restored = jax.tree_util.tree_flatten_with_path(restored)[0]
    flat_target = jax.tree.leaves(target)
    assert len(flat_saved) == len(flat_restored) == len(flat_target), label
    for (path, want), (_, got), tgt in zip(flat_saved, flat_restored, flat_target, strict=True):
        name = f"{label} {jax.tree_util.keystr(path)}"
        assert got.dtype == want.dtype, name
        assert got.sharding == tgt.sharding, (name, got.sharding, tgt.sharding)
        if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
            want, got = jax.random.key_data(want), jax.random.key_data(got)
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), name
    # "As the rules say": the logical-axis rules, and one spec spelled out by hand.
    params, opt = restored["params"], restored["opt_state"]
    adam = opt[1][0]
    for (path, p), sh in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(shardings), strict=True
    ):
        assert p.sharding == sh, (label, jax.tree_util.keystr(path))
    for p, mu, nu in zip(
        jax.tree.leaves(params), jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu), strict=True
    ):
        assert mu.sharding == p.sharding and nu.sharding == p.sharding, label
    assert adam.count.sharding == NamedSharding(mesh, P()), label
    assert int(adam.count) == 1 and int(restored["step"]) == 7, label
    emb = params["embedding"][...]
    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    # [vocab, embed]: vocab over tensor, embed over fsdp, an axis of size 1 left out.
    spec = P("tensor" if tensor > 1 else None, "fsdp" if fsdp > 1 else None)
    assert emb.sharding.spec == spec, (label, emb.sharding.spec)
    shard_shape = emb.addressable_shards[0].data.shape
    assert shard_shape == (64 // tensor, 32 // fsdp), (label, shard_shape)
    assert len({s.device for s in emb.addressable_shards}) == 8, label


def compute(_: str, root: str) -> None:
    assert jax.device_count() == 8
    oks = []
    for source, targets in RESTORES:
        directory = os.path.join(root, f"{source.data}x{source.fsdp}x{source.tensor}")
        saved = trained_state(make_mesh(source))
        with Checkpointer(directory, save_every=1) as ckpt:
            ckpt.save(7, saved, meta={"mesh": [source.data, source.fsdp, source.tensor]})
        for mesh_cfg in targets:
            mesh = make_mesh(mesh_cfg)
            target, shardings = target_on(mesh)
            with Checkpointer(directory, save_every=1) as ckpt:
                step, restored, meta = ckpt.restore_latest(target)
            assert step == 7 and meta["mesh"] == [source.data, source.fsdp, source.tensor]
            label = f"{source.data}x{source.fsdp}x{source.tensor}->" + "x".join(
                str(mesh.shape[a]) for a in ("data", "fsdp", "tensor")
            )
            check(saved, restored, target, shardings, mesh, label)
            oks.append(f"ok {label}")
    with open(os.path.join(root, "oks.json"), "w") as f:
        json.dump(oks, f)
