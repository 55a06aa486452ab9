"""Tests for rl_reason.infra.preemption: SIGTERM -> save at the step boundary -> exit 0.

In-process tests check the handler's bookkeeping; subprocess tests send real signals to a real
training-like loop (one process with its own handler, two processes through JAX's preemption
sync point) and check what reached the disk.
"""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest

from rl_reason.infra.checkpoint import Checkpointer
from rl_reason.infra.preemption import PreemptionGuard


def test_sigterm_sets_stop_and_exit_restores_the_previous_handler():
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda *a: calls.append(a))
    try:
        with PreemptionGuard() as guard:
            assert not guard.uses_sync_point
            assert not guard.should_stop(1)
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            assert guard.signalled
            assert guard.should_stop(2)
            # Latched: later steps stop too, and the stop step is the first one answered True.
            assert guard.should_stop(3)
            assert guard.stop_step == 2
        assert calls == []  # the guard, not the previous handler, took both signals
        os.kill(os.getpid(), signal.SIGTERM)
        assert len(calls) == 1  # the previous handler is back
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_extra_signals_and_clear_errors():
    with PreemptionGuard(signals=(signal.SIGTERM, signal.SIGUSR1)) as guard:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert guard.should_stop(10)
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL

    with pytest.raises(RuntimeError, match="inside `with PreemptionGuard"):
        PreemptionGuard().should_stop(1)
    with pytest.raises(ValueError, match="at least one signal"):
        PreemptionGuard(signals=())

    errors = []

    def enter_off_main_thread():
        try:
            with PreemptionGuard():
                pass
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=enter_off_main_thread)
    t.start()
    t.join()
    assert errors and "main thread" in errors[0]


# A loop shaped like the trainer's: a step of work, the stop question, a save (forced on stop).
# The state is ~32 MB so the final asynchronous write takes a moment, long enough for the loop to
# signal itself again while it runs.
LOOP = textwrap.dedent(
    """
    import os, signal, sys, time
    import jax, jax.numpy as jnp
    from rl_reason.infra.checkpoint import Checkpointer
    from rl_reason.infra.preemption import PreemptionGuard

    ckpt = Checkpointer(sys.argv[1], save_every=4, async_save=True)
    w = jnp.zeros((8_000_000,), jnp.float32)
    key = jax.random.key(0)
    with PreemptionGuard() as guard:
        for step in range(1, 10_000):
            w = w + 1.0
            key = jax.random.fold_in(key, step)
            w.block_until_ready()
            time.sleep(0.05)
            print("step", step, flush=True)
            stop = guard.should_stop(step)
            if stop:
                print("saving", step, flush=True)
            state = {"w": w, "key": key, "step": jnp.asarray(step)}
            ckpt.save(step, state, meta={"data": {"position": step}}, force=stop)
            if stop:
                # A second notice while the asynchronous write runs must not break it.
                os.kill(os.getpid(), signal.SIGTERM)
                ckpt.wait()
                print("stopped", step, "signals", guard.signal_count, flush=True)
                break
    ckpt.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    """
)


def _read_until(proc, prefix, timeout=60.0):
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(prefix):
            return line, lines
    raise AssertionError(f"no line starting with {prefix!r}; got {lines[-5:]}")


def test_sigterm_in_a_loop_saves_the_step_reached_and_exits_zero(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", LOOP, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _read_until(proc, "step 6")
        proc.send_signal(signal.SIGTERM)
        line, _ = _read_until(proc, "saving")
        stop_step = int(line.split()[1])
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"stopped {stop_step} signals 2" in rest
    assert stop_step >= 6

    abstract = {
        "w": jax.ShapeDtypeStruct((8_000_000,), np.float32),
        "key": jax.eval_shape(lambda: jax.random.key(0)),
        "step": jax.ShapeDtypeStruct((), np.int32),
    }
    with Checkpointer(tmp_path, save_every=4) as ckpt:
        assert ckpt.latest_step() == stop_step
        step, state, meta = ckpt.restore_latest(abstract)
    assert step == stop_step and int(state["step"]) == stop_step
    assert meta == {"data": {"position": stop_step}}
    np.testing.assert_array_equal(np.asarray(state["w"][:3]), [stop_step] * 3)
    assert float(np.asarray(state["w"]).min()) == float(stop_step)
    key = jax.random.key(0)
    for s in range(1, stop_step + 1):
        key = jax.random.fold_in(key, s)
    np.testing.assert_array_equal(jax.random.key_data(state["key"]), jax.random.key_data(key))


# Two JAX processes: SIGTERM to one of them; both must stop at the same step.
DISTRIBUTED = textwrap.dedent(
    """
    import sys, time
    import jax
    from rl_reason.infra.preemption import PreemptionGuard

    port, pid = sys.argv[1], int(sys.argv[2])
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    with PreemptionGuard() as guard:
        assert guard.uses_sync_point
        for step in range(1, 100_000):
            time.sleep(0.02)
            print("step", step, flush=True)
            if guard.should_stop(step):
                print("stopped", step, flush=True)
                break
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_stop_at_the_same_step():
    port = str(_free_port())
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DISTRIBUTED, port, str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    try:
        for p in procs:
            _read_until(p, "step 5")
        procs[1].send_signal(signal.SIGTERM)
        results = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                # JAX's notifier catches SIGTERM, so only SIGKILL ends a stuck process.
                p.kill()
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    stops = [[ln for ln in out.splitlines() if ln.startswith("stopped")] for out, _ in results]
    assert stops[0] and stops[0] == stops[1], stops
    assert int(stops[0][0].split()[1]) > 5
