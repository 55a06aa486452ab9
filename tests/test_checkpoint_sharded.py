"""A checkpoint saved from one mesh restores onto another mesh shape, values and shardings exact;
several processes resume together.

The mesh test runs in a subprocess with 8 fake CPU devices (the test process itself has one). The
saved state is what the trainer holds: the policy's params as an nnx.State created sharded by
`sharding.create_model`, an AdamW state after one real update, a step counter and a PRNG key.
The multi-process test runs two JAX processes on localhost that save and restore one array
sharded across both, through a damaged newest step.
"""

import os
import shutil
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from rl_reason.checkpoint import Checkpointer

SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from models import Transformer
    from models.config import get_config
    from rl_reason import train_step
    from rl_reason.checkpoint import Checkpointer, abstract_on, abstract_opt_state
    from rl_reason.sharding import MeshConfig, create_model, make_mesh, state_shardings

    assert jax.device_count() == 8
    cfg = get_config("tiny", vocab_size=64, embed_dim=32, mlp_dim=64, num_layers=1, head_dim=8)
    tx = train_step.make_optimizer(train_step.OptimConfig(learning_rate=1e-2))

    def trained_state(mesh):
        _, params = create_model(cfg, mesh, seed=0)
        opt_state = tx.init(params)
        grads = jax.tree.map(lambda p: 0.1 * jnp.cos(p), params)
        updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)
        params = jax.jit(lambda p, u: jax.tree.map(jnp.add, p, u))(params, updates)
        return {"params": params, "opt_state": opt_state, "step": jnp.asarray(7),
                "key": jax.random.key(3)}

    def target_on(mesh):
        abstract_params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))[1]
        shardings = state_shardings(abstract_params, mesh)
        params = abstract_on(abstract_params, shardings)
        replicated = NamedSharding(mesh, P())
        return {
            "params": params,
            "opt_state": abstract_opt_state(tx, params),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
            "key": jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated),
        }, shardings

    def check(saved, restored, target, shardings, mesh, label):
        flat_saved = jax.tree_util.tree_flatten_with_path(saved)[0]
        flat_restored = jax.tree_util.tree_flatten_with_path(restored)[0]
        flat_target = jax.tree.leaves(target)
        assert len(flat_saved) == len(flat_restored) == len(flat_target), label
        for (path, want), (_, got), tgt in zip(flat_saved, flat_restored, flat_target):
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
            jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(shardings)
        ):
            assert p.sharding == sh, (label, jax.tree_util.keystr(path))
        for p, mu, nu in zip(
            jax.tree.leaves(params), jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu)
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
        print("ok", label, flush=True)

    root = sys.argv[1]
    for source, targets in [
        (MeshConfig(8, 1, 1), [MeshConfig(1, 4, 2), MeshConfig(2, 2, 2)]),
        (MeshConfig(1, 4, 2), [MeshConfig(2, 2, 2), MeshConfig(8, 1, 1)]),
    ]:
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
    """
)


def test_restore_onto_other_mesh_shapes(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    oks = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert oks == [
        "ok 8x1x1->1x4x2",
        "ok 8x1x1->2x2x2",
        "ok 1x4x2->2x2x2",
        "ok 1x4x2->8x1x1",
    ], proc.stdout


# Two JAX processes with two devices each: one array sharded over all four devices. Each phase is
# a fresh pair of processes; between them the test damages the newest step on disk.
TWO_HOSTS = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from rl_reason.checkpoint import Checkpointer

    port, pid, directory, phase = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    mesh = Mesh(np.array(jax.devices()).reshape(4), ("fsdp",))
    rows, replicated = NamedSharding(mesh, P("fsdp")), NamedSharding(mesh, P())
    value = lambda s: np.arange(24.0, dtype=np.float32).reshape(8, 3) * s

    def state(s):
        w = jax.make_array_from_callback((8, 3), rows, lambda idx: value(s)[idx])
        key = jax.jit(lambda: jax.random.key(s), out_shardings=replicated)()
        return {"w": w, "key": key}

    target = {
        "w": jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=rows),
        "key": jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated),
    }
    ckpt = Checkpointer(directory, save_every=1, max_to_keep=5)
    if phase == "save":
        for s in (1, 2, 3):
            ckpt.save(s, state(s), meta={"step": s})
    else:
        step, got, meta = ckpt.restore_latest(target)
        assert step == 2 and meta == {"step": 2}, (step, meta)
        assert got["w"].sharding == rows
        for shard in got["w"].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), value(2)[shard.index])
        np.testing.assert_array_equal(
            jax.random.key_data(got["key"]), jax.random.key_data(jax.random.key(2))
        )
        assert ckpt.all_steps() == [1, 2], ckpt.all_steps()
        ckpt.save(3, state(30), meta={"step": 3})
    ckpt.close()
    print("done", pid, flush=True)
    """
)


def _two_hosts(directory, phase):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TWO_HOSTS, port, str(i), str(directory), phase],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, (out, err)) in enumerate(zip(procs, results, strict=True)):
        assert p.returncode == 0 and f"done {i}" in out, err[-4000:]


def test_two_processes_fall_back_together_and_save_again(tmp_path):
    _two_hosts(tmp_path, "save")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "3"]
    for part in (tmp_path / "3" / "state").iterdir():
        if part.name == "d" or part.name.startswith("ocdbt.process_"):
            shutil.rmtree(part)
    _two_hosts(tmp_path, "restore")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "3", "3.unreadable"]

    # The new step 3, written by two hosts, reads back here on one device.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {
        "w": jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=device),
        "key": jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=device),
    }
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        step, got, meta = ckpt.restore_latest(target)
    assert step == 3 and meta == {"step": 3}
    np.testing.assert_array_equal(
        np.asarray(got["w"]), np.arange(24.0, dtype=np.float32).reshape(8, 3) * 30
    )
    np.testing.assert_array_equal(
        jax.random.key_data(got["key"]), jax.random.key_data(jax.random.key(30))
    )
