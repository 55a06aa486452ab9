"""Exact resume of the default experiment after SIGKILL and after SIGTERM (preemption).

Each run is `python -m experiments.train` on the smoke config in its own process, with a
checkpoint every step. The RL problem pool is 12 problems and a step takes 4, so the data
stream crosses an epoch boundary (and reshuffles) after step 3 of 6, inside the resumed part.

  straight  6 steps in one process
  killed    SIGKILL once step 2's checkpoint exists, then a new process runs to step 6
  preempted SIGTERM after a random step, which saves and exits 0; a new process runs to step 6

Per-step metrics (everything but wall-clock timings) and the final params must be identical,
bit for bit, and every step must appear exactly once in metrics.jsonl.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from rl_reason.infra.metrics import read_jsonl

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
ARGS = [
    "--config=experiments/configs/r1_zero_tiny.py:smoke",
    f"--config.grpo.steps={STEPS}",
    "--config.grpo.checkpoint_every=1",
    "--config.grpo.checkpoint_keep=2",
    "--config.data.rl_pool_size=12",
    "--config.data.eval_size=8",
]
TIMING = ("time_", "generated_tokens_per_s")
# How many verifier workers this process replaced: a count of the faults injected, which the
# faulted run reports and the straight run does not; everything else must be equal.
REPLACED = "verifier_workers_replaced"


def _start(workdir):
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.train", *ARGS, f"--config.workdir={workdir}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc, timeout=300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _wait_for(predicate, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError("the run ended early:\n" + proc.stdout.read()[-4000:])
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def _metrics(workdir) -> list[dict]:
    rows = read_jsonl(workdir / "metrics.jsonl")
    return [
        {k: v for k, v in r.items() if not k.startswith(TIMING) and k != REPLACED} for r in rows
    ]


def _final_state(workdir) -> dict[str, np.ndarray]:
    path = workdir / "checkpoints" / str(STEPS) / "state"
    with ocp.PyTreeCheckpointer() as ckpt:
        tree = ckpt.restore(path)
    leaves = ocp.tree.to_flat_dict(tree, sep="/")
    return {k: np.asarray(v) for k, v in leaves.items()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    _finish(_start(workdir))
    return workdir


def _assert_same_run(resumed, straight):
    got, want = _metrics(resumed), _metrics(straight)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # no step repeated or skipped
    assert got == want
    a, b = _final_state(resumed), _final_state(straight)
    assert a.keys() == b.keys() and any("opt_state" in k for k in a)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # The after-RL evaluation of the final policy agrees as well, and how far RL moved the
    # weights is measured from the run's initial weights (kept beside the checkpoints).
    got, want = (json.loads((w / "summary.json").read_text()) for w in (resumed, straight))
    assert got["after"] == want["after"]
    assert got["rl_param_change_l2"] == want["rl_param_change_l2"] > 0


def test_straight_run_moves_and_crosses_an_epoch(straight):
    rows = _metrics(straight)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # The overlong penalty gives reward variance, so updates are real.
    assert sum(r["grad_norm"] > 0 for r in rows) >= 3


def test_sigkill_then_restart_repeats_and_skips_nothing(straight, tmp_path):
    proc = _start(tmp_path)
    _wait_for(lambda: (tmp_path / "checkpoints" / "2").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert max(done) < STEPS  # it really died mid-run
    out = _finish(_start(tmp_path))
    assert "resumed at step" in out and "[stage 1] skipped" in out
    _assert_same_run(tmp_path, straight)


def test_sigterm_saves_and_a_restart_continues(straight, tmp_path):
    stop_after = random.Random().randint(1, STEPS - 2)
    proc = _start(tmp_path)
    jsonl = tmp_path / "metrics.jsonl"
    _wait_for(lambda: jsonl.exists() and len(read_jsonl(jsonl)) >= stop_after, proc)
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc)  # exits 0 after saving the step it reached
    assert "preempted: saved step" in out, out[-2000:]
    saved = int(out.split("preempted: saved step ")[1].split(";")[0])
    assert stop_after <= saved < STEPS
    assert (tmp_path / "checkpoints" / str(saved)).is_dir()
    assert not (tmp_path / "summary.json").exists()
    out = _finish(_start(tmp_path))
    assert f"resumed at step {saved}/{STEPS}" in out
    _assert_same_run(tmp_path, straight)


# -- every fault in one run ---------------------------------------------------------------------


def _descendants(pid: int) -> dict[int, int]:
    """pid -> parent pid of every process below `pid`."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    below, frontier = {}, {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier and p not in below}
        below.update({p: parents[p] for p in frontier})
    return below


def _verifier_workers(pid: int) -> list[int]:
    """The pool's workers under the run `pid`: children of its zygote."""
    below = _descendants(pid)
    zygotes = {
        p
        for p in below
        if b"rl_reason.verifiers.worker" in _cmdline(p) and below[p] not in below  # noqa: SIM118
    }
    return [p for p, parent in below.items() if parent in zygotes]


def _kill_a_verifier_worker(pid: int) -> bool:
    """SIGKILL one of the pool's workers; False when none is alive at this moment.

    The pool retires and replaces workers as it goes, so a worker listed a moment ago may be
    gone: the caller retries rather than trusting an earlier listing.
    """
    for worker in _verifier_workers(pid):
        try:
            os.kill(worker, signal.SIGKILL)
            return True
        except ProcessLookupError:
            continue
    return False


def _cmdline(pid: int) -> bytes:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return b""


def _rows(workdir) -> list[dict]:
    jsonl = workdir / "metrics.jsonl"
    return read_jsonl(jsonl) if jsonl.exists() else []


def _steps(workdir) -> list[int]:
    return [r["step"] for r in _rows(workdir)]


@pytest.fixture
def small_disk(tmp_path):
    """A workdir on its own 64 MiB tmpfs, so that a test can fill it for real (needs root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True
    )
    if proc.returncode:
        yield None  # no mount privilege: the full-disk fault is left out
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_every_fault_in_one_run_leaves_it_identical_to_the_straight_run(
    straight, tmp_path, small_disk
):
    workdir = (small_disk or tmp_path) / "run"
    rng = random.Random()
    # 1. SIGKILL at a random step, once its checkpoint exists.
    proc = _start(workdir)
    first = rng.randint(2, 3)  # two checkpoints: the corrupted newest has one before it
    _wait_for(lambda: (workdir / "checkpoints" / str(first)).is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    # 2. The newest checkpoint is corrupted: the next run falls back to the one before it
    # and metrics.jsonl is cut back to the step it restored.
    newest = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    for f in (workdir / "checkpoints" / str(newest) / "state" / "d").iterdir():
        f.write_bytes(f.read_bytes()[:7])
    # 3. A verifier worker is killed while the run trains; then SIGKILL at a later step.
    jsonl = workdir / "metrics.jsonl"
    old_file = jsonl.stat().st_ino
    proc = _start(workdir)
    # Training has begun once the run has cut metrics.jsonl back (a new file) and written the
    # corrupted step again: from then on only the training's verifier pool is alive (stage 1
    # has its own, closed before), so the worker killed is one the run must replace.
    _wait_for(lambda: jsonl.stat().st_ino != old_file and newest in _steps(workdir), proc)
    _wait_for(lambda: _kill_a_verifier_worker(proc.pid), proc)
    # The pool notices the death when it next hands that worker an item; the step's row then
    # counts the replacement.
    _wait_for(lambda: any(r.get(REPLACED, 0) >= 1 for r in _rows(workdir)), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (workdir / "summary.json").exists()  # it died mid-run
    # 4. The disk fills up: the next save fails, the run stops with an error naming the
    # problem, and nothing written before it is lost.
    if small_disk is not None:
        # The killed run may have left a save in progress; the next run deletes its temporary
        # directory on open, which would free room for its own saves. Remove it first, so that
        # the ballast leaves no room whatever the kill interrupted.
        for tmp in (workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp)
        ballast = small_disk / "ballast"
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        with open(ballast, "wb") as f:
            f.write(b"\0" * max(free - 64 * 1024, 0))
        proc = _start(workdir)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode != 0, out[-3000:]
        assert "No space left on device" in out or "ENOSPC" in out, out[-3000:]
        ballast.unlink()
    # 5. A clean run finishes it.
    out = _finish(_start(workdir))
    assert "resumed at step" in out
    _assert_same_run(workdir, straight)
