"""VerifierPool: same verdicts as serial calls, timeouts, crashes, recycling, clean shutdown.

The pools here import this module in their workers (``imports=[__name__]``) so that the small
verifiers below, which sleep, crash or report on the worker process, exist there too.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rl_reason import verifiers
from rl_reason.verifiers import VerifyResult

from .test_verifiers_code import sandbox_processes

POOL_TIMEOUT_S = 2.0


def _sleep(response, example):
    time.sleep(float(response))
    return VerifyResult(1.0, True, "slept")


def _pid(response, example):
    return VerifyResult(1.0, True, str(os.getpid()))


def _heavy_modules(response, example):
    loaded = [m for m in ("jax", "jaxlib", "flax", "optax", "torch") if m in sys.modules]
    return VerifyResult(1.0, True, ",".join(loaded))


def _crash(response, example):
    os._exit(3)


def _raise(response, example):
    raise ValueError("malformed example")


for _name, _fn in [
    ("test_sleep", _sleep),
    ("test_pid", _pid),
    ("test_heavy_modules", _heavy_modules),
    ("test_crash", _crash),
    ("test_raise", _raise),
]:
    if _name not in verifiers.names():
        verifiers.register(_name, _fn)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _ancestors(pid: int) -> set[int]:
    found = set()
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                pid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        found.add(pid)
    return found


def wait_until_dead(pids, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


@pytest.fixture(scope="module")
def pool():
    with verifiers.VerifierPool(2, timeout_s=POOL_TIMEOUT_S, imports=[__name__]) as p:
        yield p


def mixed_items():
    """256 items over every verifier, right and wrong, including adversarial ones."""
    base = [
        ("math", "<answer>\\boxed{\\frac{1}{2}}</answer>", {"answer": "0.5"}),
        ("math", "\\boxed{0.499}", {"answer": "1/2"}),
        ("math", "\\boxed{[1, 2)}", {"answer": "[1,2)"}),
        ("math", "\\boxed{3} \\boxed{5}", {"answer": "5"}),
        ("math", "<think>\\boxed{5}</think>", {"answer": "5"}),
        ("math", "\\boxed{9^{9^{9^{9}}}}", {"answer": "5"}),
        ("gsm8k", "<answer>$1,000</answer>", {"answer": "#### 1000"}),
        ("gsm8k", "<answer>999</answer>", {"answer": "#### 1000"}),
        (
            "countdown",
            "<answer>50 + 25 - 7 - 3</answer>",
            {"numbers": [25, 3, 7, 50], "target": 65},
        ),
        (
            "countdown",
            "<answer>75 ** 50 ** 3 ** 2</answer>",
            {"numbers": [75, 50, 3, 2], "target": 5},
        ),
        ("arithmetic", "<answer>42</answer>", {"answer": "42"}),
        ("arithmetic", "<answer>41</answer>", {"answer": "42"}),
        ("format", "a</think><answer>1</answer>", {}),
        ("format", "a<answer>1</answer>", {}),
    ]
    code = [
        (
            "code",
            "```python\nprint(int(input()) * 2)\n```",
            {"io": [{"stdin": "21", "stdout": "42"}]},
        ),
        ("code", "```python\nprint(41)\n```", {"io": [{"stdin": "21", "stdout": "42"}]}),
        ("code", "```python\ndef f(x):\n    return -x\n```", {"tests": "assert f(2) == -2"}),
        (
            "code",
            "```python\ndef f(x):\n    return x\n```",
            {"tests": "assert sorted([f(2), 1]) == [2, 1]"},
        ),
    ]
    items = [base[i % len(base)] for i in range(240)] + [code[i % len(code)] for i in range(16)]
    return items


def test_pool_verdicts_equal_serial_verdicts(pool):
    items = mixed_items()
    assert len(items) == 256
    serial = [verifiers.get(name)(response, example) for name, response, example in items]
    parallel = pool.map(items)
    assert parallel == serial
    assert 0 < sum(r.correct for r in parallel) < len(items)


def test_handles_are_independent_and_ordered(pool):
    first = pool.submit([("arithmetic", f"<answer>{i}</answer>", {"answer": i}) for i in range(20)])
    second = pool.submit(
        [("test_sleep", "0", {}), ("arithmetic", "<answer>1</answer>", {"answer": 2})]
    )
    assert [r.correct for r in second.result()] == [True, False]
    assert all(r.correct for r in first.result())
    assert pool.map([]) == []


def test_timeout_scores_zero_kills_the_worker_and_the_pool_keeps_serving(pool, caplog):
    before, replaced = set(pool.worker_pids()), pool.replaced
    start = time.monotonic()
    handle = pool.submit([("test_sleep", "60", {}), ("test_sleep", "0", {}), ("test_pid", "", {})])
    results = handle.result()
    assert time.monotonic() - start < POOL_TIMEOUT_S + 1.0
    assert results[0] == VerifyResult(0.0, False, "timeout")
    assert results[1].correct and results[2].correct
    killed = before - set(pool.worker_pids())
    assert len(killed) == 1 and wait_until_dead(killed) == []
    assert pool.map([("test_sleep", "0", {})])[0].correct
    # The replacement is counted (the trainer logs it as verifier_workers_replaced) and logged.
    assert pool.replaced == replaced + 1
    (pid,) = killed
    assert f"verifier worker (pid {pid}) replaced: an item ran past timeout_s" in caplog.text


def test_killed_worker_takes_its_sandbox_with_it(pool):
    # The program would run for 30 s under the code verifier's own limit; the pool's 2 s
    # timeout kills the worker, and bubblewrap's --die-with-parent tears down the sandbox.
    item = (
        "code",
        "```python\nwhile True:\n    pass\n```",
        {"io": [{"stdout": ""}], "timeout_s": 30},
    )
    # Only this item's sandbox is checked: the other test worker may be running tool
    # sandboxes of its own (a multi-turn smoke run), which look the same on the host.
    workers, ours, done = set(pool.worker_pids()), set(), threading.Event()

    def watch():
        while not done.is_set():
            ours.update(p for p in _sandbox_pids() if _ancestors(p) & workers)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.monotonic()
    try:
        assert pool.map([item])[0].reason == "timeout"
    finally:
        done.set()
        watcher.join()
    assert time.monotonic() - start < POOL_TIMEOUT_S + 1.0
    assert ours, "the sandbox was never seen under the pool's worker"
    assert wait_until_dead(ours, timeout_s=3.0) == []


def _sandbox_pids() -> set[int]:
    return {int(line.split(":", 1)[0]) for line in sandbox_processes()}


NESTED = "(" * 10_000 + "1" + ")" * 10_000
ADVERSARIAL = [
    ("math", "\\boxed{9^{9^{9^{9}}}}", {"answer": "5"}),
    ("math", "\\boxed{9^9^9^9}", {"answer": "5"}),
    ("math", "\\boxed{" + NESTED + "}", {"answer": "1"}),
    ("math", "x" * 1_000_000 + "\\boxed{1}" * 1000 + "\\boxed{2}", {"answer": "1"}),
    ("gsm8k", "<answer>" + NESTED + "</answer>", {"answer": "1"}),
    ("countdown", "<answer>75 ** 50 ** 3 ** 2</answer>", {"numbers": [75, 50, 3, 2], "target": 1}),
    ("countdown", "<answer>" + NESTED + "</answer>", {"numbers": [1], "target": 1}),
    ("countdown", "<answer>6 // 3 + 1</answer>", {"numbers": [6, 3, 1], "target": 3}),
    ("countdown", "<answer>6 % 3 + 1</answer>", {"numbers": [6, 3, 1], "target": 1}),
    ("countdown", "<answer>x + 3 + 1</answer>", {"numbers": [6, 3, 1], "target": 10}),
    ("countdown", "<answer>abs(6) + 3 + 1</answer>", {"numbers": [6, 3, 1], "target": 10}),
    ("countdown", "<answer>6 + 6 + 3 + 1</answer>", {"numbers": [6, 3, 1], "target": 16}),
    ("countdown", "<answer>6 + 3</answer>", {"numbers": [6, 3, 1], "target": 9}),
    ("code", "```python\nx = " + NESTED + "\n```", {"io": [{"stdout": "1"}]}),
    ("code", "x" * 1_000_000 + "```python\nprint(2)\n```", {"io": [{"stdout": "1"}]}),
    ("format", "x" * 1_000_000, {}),
]


@pytest.mark.parametrize(
    "item", ADVERSARIAL, ids=[f"{i}-{item[0]}" for i, item in enumerate(ADVERSARIAL)]
)
def test_adversarial_items_return_in_time_and_the_pool_keeps_serving(pool, item):
    start = time.monotonic()
    result = pool.map([item])[0]
    assert time.monotonic() - start < POOL_TIMEOUT_S + 1.0
    assert not result.correct
    assert pool.map([("arithmetic", "<answer>1</answer>", {"answer": 1})])[0].correct


def test_a_crashing_worker_scores_zero_and_is_replaced(pool):
    replaced = pool.replaced
    results = pool.map([("test_crash", "", {}), ("test_sleep", "0", {})])
    assert results[0] == VerifyResult(0.0, False, "worker died")
    assert results[1].correct
    assert len(pool.worker_pids()) == 2
    assert pool.replaced == replaced + 2  # the item was tried on a second worker, which died too


def test_a_worker_killed_from_outside_loses_no_item(pool):
    handle = pool.submit([("test_sleep", "1", {})] + [("test_pid", "", {})] * 4)
    time.sleep(0.3)  # the first item is running on one of the workers
    for pid in pool.worker_pids():
        os.kill(pid, signal.SIGKILL)
    results = handle.result()
    assert all(r.correct for r in results), results


def test_verifier_errors_raise_after_the_batch_completes(pool):
    handle = pool.submit(
        [("test_sleep", "0", {}), ("test_raise", "", {}), ("math", "\\boxed{1}", {})]
    )
    with pytest.raises(verifiers.VerifierError, match="item 1: ValueError: malformed example"):
        handle.result()
    assert handle.done()
    with pytest.raises(verifiers.VerifierError, match="'answer'"):
        pool.map([("math", "\\boxed{1}", {"gold": "1"})])


def test_submit_validates_items(pool):
    with pytest.raises(ValueError, match="valid names: arithmetic"):
        pool.submit([("maths", "x", {})])
    with pytest.raises(ValueError, match="expected"):
        pool.submit([("math", "x")])


def test_handle_reports_how_much_verification_was_hidden(pool):
    handle = pool.submit([("test_sleep", "0.4", {}), ("test_sleep", "0.4", {})])
    time.sleep(0.8)  # the trainer's device work
    handle.result()
    assert handle.wall_seconds >= 0.4
    assert handle.blocked_seconds < handle.wall_seconds
    assert handle.hidden_seconds >= 0.4
    blocking = pool.submit([("test_sleep", "0.3", {})])
    blocking.result()
    assert blocking.blocked_seconds >= 0.25 and blocking.hidden_seconds < 0.1


def test_result_timeout(pool):
    handle = pool.submit([("test_sleep", "0.5", {})])
    with pytest.raises(TimeoutError):
        handle.result(timeout=0.05)
    assert handle.result()[0].correct


@pytest.mark.parametrize("mp_context", ["forkserver", "spawn"])
def test_workers_are_recycled(mp_context):
    with verifiers.VerifierPool(
        1, recycle_every=3, mp_context=mp_context, imports=[__name__]
    ) as pool:
        pids = [r.reason for r in pool.map([("test_pid", "", {})] * 7)]
    assert pids[0] == pids[1] == pids[2] != pids[3] == pids[4] == pids[5] != pids[6]
    assert len(set(pids)) == 3


@pytest.mark.parametrize("mp_context", ["forkserver", "spawn"])
def test_workers_never_import_jax(mp_context):
    jax = pytest.importorskip("jax")
    jax.numpy.zeros(2).block_until_ready()  # JAX initialised, its threads running
    with verifiers.VerifierPool(1, mp_context=mp_context, imports=[__name__]) as pool:
        assert pool.map([("test_heavy_modules", "", {})])[0].reason == ""


def test_spawn_workers_time_out_and_are_replaced():
    with verifiers.VerifierPool(1, timeout_s=1.0, mp_context="spawn", imports=[__name__]) as pool:
        assert pool.zygote_pid is None
        first = pool.worker_pids()
        start = time.monotonic()
        assert pool.map([("test_sleep", "60", {})])[0].reason == "timeout"
        assert time.monotonic() - start < 1.0 + 1.0
        assert pool.worker_pids() != first and wait_until_dead(first) == []
        assert pool.map([("test_sleep", "0", {})])[0].correct  # the new interpreter serves


def test_items_queued_behind_a_timeout_or_a_large_item_complete():
    # One worker: while there is a backlog it holds the running item and the next one.
    with verifiers.VerifierPool(1, timeout_s=1.0, imports=[__name__]) as pool:
        start = time.monotonic()
        results = pool.map(
            [("test_sleep", "60", {}), ("test_sleep", "0", {}), ("test_pid", "", {})]
        )
        assert [r.reason for r in results][:2] == ["timeout", "slept"] and results[2].correct
        assert time.monotonic() - start < 1.0 + 1.0
        big = "x" * 3_000_000  # larger than a socket buffer: only sent to an idle worker
        items = [("test_sleep", "0.3", {}), ("format", big, {}), ("format", big, {})]
        assert [r.reason for r in pool.map(items)] == ["slept", "no </think>", "no </think>"]


def test_fork_is_refused():
    with pytest.raises(ValueError, match="fork is unsafe"):
        verifiers.VerifierPool(1, mp_context="fork")


def test_close_leaves_no_process_behind():
    pool = verifiers.VerifierPool(2, imports=[__name__])
    handle = pool.submit([("test_sleep", "30", {})] * 3)
    time.sleep(0.2)
    pids = [pool.zygote_pid, *pool.worker_pids()]
    pool.close()
    pool.close()  # idempotent
    assert wait_until_dead(pids) == []
    with pytest.raises(verifiers.VerifierError, match="closed"):
        handle.result(timeout=1)
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit([("test_sleep", "0", {})])


def test_everything_dies_with_the_pool_owner(tmp_path):
    script = (
        "import json, sys, time\n"
        "from rl_reason import verifiers\n"
        "pool = verifiers.VerifierPool(2)\n"
        "handle = pool.submit([('code', '```python\\nimport time\\ntime.sleep(60)\\n```',"
        " {'io': [{'stdout': ''}], 'timeout_s': 60})])\n"
        "time.sleep(0.5)\n"
        "print(json.dumps([pool.zygote_pid, *pool.worker_pids()]), flush=True)\n"
        "time.sleep(60)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        pids = json.loads(owner.stdout.readline())
        assert all(alive(p) for p in pids)
        assert sandbox_processes()  # the sleeping program is running in its sandbox
    finally:
        owner.kill()
        owner.wait()
    assert wait_until_dead(pids) == []
    deadline = time.monotonic() + 3.0
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == []
