"""A checkpoint saved from one mesh restores onto another mesh shape, values and shardings exact;
several processes resume together.

The mesh test runs in the shared process with 8 fake CPU devices (the test process itself has
one), tests/multidevice/checkpoint_meshes.py, which asserts values and shardings and lists the
restores that passed. The saved state is what the trainer holds: the policy's params as an
nnx.State created sharded by `sharding.create_model`, an AdamW state after one real update, a
step counter and a PRNG key. The multi-process test runs two JAX processes on localhost that save
and restore one array sharded across both, through a damaged newest step; they are processes of
their own, since each is one host of a jax.distributed run and a phase starts a fresh pair.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from rl_reason.infra.checkpoint import Checkpointer


def multidevice_needs(params: dict) -> list[str]:
    # Computed in the shared 8-device process (tests/multidevice/runner.py).
    return ["checkpoint/restore"]


def test_restore_onto_other_mesh_shapes(multidevice):
    oks = json.loads((multidevice.result("checkpoint/restore") / "oks.json").read_text())
    assert oks == [
        "ok 8x1x1->1x4x2",
        "ok 8x1x1->2x2x2",
        "ok 1x4x2->2x2x2",
        "ok 1x4x2->8x1x1",
    ], oks


# Two JAX processes with two devices each: one array sharded over all four devices. Each phase is
# a fresh pair of processes; between them the test damages the newest step on disk.
TWO_HOSTS = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from rl_reason.infra.checkpoint import Checkpointer

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
