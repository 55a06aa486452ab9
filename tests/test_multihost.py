"""Two JAX processes on localhost (jax.distributed, CPU collectives), four fake devices each,
run two GRPO steps of a tiny model and agree with one process on a single device (one process
on eight fake devices is tests/test_sharding.py's; it is not run again here, for time).

Each process feeds its own half of every batch, verifies only its own completions in its own
verifier pool and gathers rewards; with KL, two minibatches and two microbatches, every
collective path of the step runs. Metrics are compared up to float32 reduction order; sampled
tokens must be identical for that (a different token would move the metrics by far more).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = "tests.multidevice.grpo_processes"


def _env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(path) -> dict:
    d = np.load(path)
    return {
        "metrics": json.loads(str(d["metrics"])),
        "evaluation": json.loads(str(d["evaluation"])),
        "params": {k: d[k] for k in d.files if k.startswith("[")},
    }


def _run_single(out, devices: int, mesh: str, algorithm: str = "grpo") -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", SCRIPT, str(out), f"--mesh={mesh}", f"--algorithm={algorithm}"],
        cwd=ROOT,
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return _load(out)


def _run_two(out, algorithm: str = "grpo") -> dict:
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                SCRIPT,
                str(out),
                f"--process_id={i}",
                "--num_processes=2",
                f"--port={port}",
                f"--algorithm={algorithm}",
            ],
            cwd=ROOT,
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()  # SIGKILL: the distributed runtime's preemption notifier eats SIGTERM
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-4000:]
    return _load(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    return {
        "two_processes": _run_two(tmp / "two.npz"),
        "one_device": _run_single(tmp / "dev.npz", 1, "1,1,1"),
    }


def _assert_same(a: dict, b: dict, params_atol: float) -> None:
    assert len(a["metrics"]) == len(b["metrics"]) == 2
    for ma, mb in zip(a["metrics"], b["metrics"], strict=True):
        assert ma.keys() == mb.keys()
        for key in ma:
            np.testing.assert_allclose(ma[key], mb[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert a["evaluation"] == b["evaluation"]
    assert a["params"].keys() == b["params"].keys()
    for key, value in a["params"].items():
        np.testing.assert_allclose(value, b["params"][key], atol=params_atol, err_msg=key)


def test_two_processes_agree_with_one_device(runs):
    # Adam divides by the root of the second moment, so a gradient entry near zero that differs
    # in its 7th digit between reduction orders can move its weight by a visible fraction of
    # one step (lr 1e-3): 5e-5 is 5% of a step; a wrong shard would be off by whole steps.
    _assert_same(runs["two_processes"], runs["one_device"], params_atol=5e-5)


def test_the_run_did_real_work(runs):
    # The comparison above means something only if rewards varied and the policy moved.
    metrics = runs["one_device"]["metrics"]
    assert all(m["reward_std"] > 0.1 and m["zero_std_groups"] < 1 for m in metrics)
    assert all(m["grad_norm"] > 0.1 and m["kl_ref"] >= 0 for m in metrics)
    assert metrics[1]["kl_ref"] > 0
