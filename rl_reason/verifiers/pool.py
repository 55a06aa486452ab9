"""VerifierPool: verification in persistent worker processes, overlapped with device work.

    with VerifierPool(num_workers=2, timeout_s=10.0) as pool:
        handle = pool.submit([("math", completion, example), ...])  # returns at once
        ...  # reference / old log-probs on the device
        results = handle.result()  # list[VerifyResult], in order
        metrics = {"verify_s": handle.wall_seconds, "verify_hidden_s": handle.hidden_seconds}

Workers are never forked from this process: by default they are forked from a clean zygote
process (``mp_context="forkserver"``), or each is a new interpreter (``"spawn"``); see ``worker``.
So the pool is safe to create after JAX has started its threads, and workers never import jax.
A dispatcher thread here hands items to the workers (the running one and, while there is a
backlog, the next) and tracks each running item's deadline: an item that runs past ``timeout_s``
gets reward 0 with reason "timeout", and its worker is killed (its sandboxes die with it) and
replaced; the item queued behind it goes to another worker. A worker that dies while verifying
an item is replaced and the item tried once more on the new worker (a worker killed from outside
loses nothing); an item whose second worker dies too scores 0 ("worker died"). Workers are
retired after ``recycle_every`` items, bounding what caches and leaks accumulate.
``close()`` (or leaving the ``with`` block, or interpreter exit) kills every process the pool
started; they also die on their own if this process dies.

Verifier exceptions (a malformed example, an unavailable sandbox) are not rewards: the other
items still complete, then ``result()`` raises ``VerifierError`` naming the items.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import itertools
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from rl_reason.verifiers.result import VerifyResult, reject

Item = tuple[str, str, Mapping[str, Any]]
log = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 120.0
# Items a worker holds at once while there is a backlog (the running one and the next).
PIPELINE_DEPTH = 2
# Larger items wait for an idle worker (an AF_UNIX socket buffers about 200 KiB).
PIPELINE_MAX_BYTES = 64 << 10


class VerifierError(RuntimeError):
    """A verifier raised for some items of a batch (see the message)."""


class VerifyHandle:
    """The pending results of one ``submit``; ``result()`` blocks until all are in.

    Timing, for the trainer's metrics:
      wall_seconds: from submit to the last result (so far, while not done).
      blocked_seconds: time callers spent waiting inside ``result()``.
      hidden_seconds: wall_seconds - blocked_seconds, the verification that overlapped other work.
    """

    def __init__(self, size: int):
        self._results: list[VerifyResult | None] = [None] * size
        self._errors: dict[int, str] = {}
        self._remaining = size
        self._done = threading.Event()
        self._submitted = time.monotonic()
        self._completed: float | None = None
        self.blocked_seconds = 0.0
        if size == 0:
            self._finish()

    def _finish(self) -> None:
        self._completed = time.monotonic()
        self._done.set()

    def _set(self, index: int, result: VerifyResult | None, error: str | None = None) -> None:
        if error is not None:
            self._errors[index] = error
        self._results[index] = result
        self._remaining -= 1
        if self._remaining == 0:
            self._finish()

    def _fail_all(self, message: str) -> None:
        for i, result in enumerate(self._results):
            if result is None and i not in self._errors:
                self._errors[i] = message
        self._finish()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> list[VerifyResult]:
        """The results in submission order; TimeoutError if not done within ``timeout``."""
        start = time.monotonic()
        finished = self._done.wait(timeout)
        self.blocked_seconds += time.monotonic() - start
        if not finished:
            raise TimeoutError(f"{self._remaining} of {len(self._results)} items still running")
        if self._errors:
            shown = "; ".join(f"item {i}: {msg}" for i, msg in sorted(self._errors.items())[:5])
            raise VerifierError(f"{len(self._errors)} item(s) could not be verified: {shown}")
        return list(self._results)  # type: ignore[arg-type]

    @property
    def wall_seconds(self) -> float:
        end = self._completed if self._completed is not None else time.monotonic()
        return end - self._submitted

    @property
    def hidden_seconds(self) -> float:
        return max(self.wall_seconds - self.blocked_seconds, 0.0)


@dataclasses.dataclass
class _Worker:
    pid: int
    pidfd: int
    conn: Connection
    process: subprocess.Popen | None = None  # set when we are its parent and must reap it
    ready: bool = False
    served: int = 0
    # Items sent and not answered yet, oldest (the one running) first.
    tasks: collections.deque[tuple[VerifyHandle, int, Item]] = dataclasses.field(
        default_factory=collections.deque
    )
    head_started: float = 0.0  # when the oldest task started (as far as we can observe)
    # Which worker of the pool this is, in the order they were started.
    spawned: int = dataclasses.field(default_factory=itertools.count().__next__)

    def kill(self) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.close()

    def close(self) -> None:
        self.conn.close()
        os.close(self.pidfd)
        if self.process is not None:
            try:
                self.process.wait(5.0)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    # The workers must import this package even if it is not installed (a source checkout).
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


class _Spawner:
    """mp_context="spawn": every worker is a fresh interpreter (about a second of imports)."""

    pid: int | None = None

    def __init__(self, imports: Sequence[str]):
        self.imports = tuple(imports)

    def spawn(self) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        command = [sys.executable, "-m", "rl_reason.verifiers.worker", "worker"]
        process = subprocess.Popen(
            [*command, str(theirs.fileno()), *self.imports],
            pass_fds=(theirs.fileno(),),
            env=_worker_env(),
            start_new_session=True,
        )
        theirs.close()
        return _Worker(process.pid, os.pidfd_open(process.pid), Connection(ours.detach()), process)

    def close(self) -> None:
        pass


class _Zygote:
    """mp_context="forkserver": workers are forked from one clean, pre-imported process."""

    def __init__(self, imports: Sequence[str]):
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rl_reason.verifiers.worker", "zygote", str(theirs.fileno())]
            + list(imports),
            pass_fds=(theirs.fileno(),),
            env=_worker_env(),
            start_new_session=True,
        )
        self.pid = self.process.pid
        theirs.close()
        self.control.settimeout(WORKER_START_TIMEOUT_S)
        try:
            ready = self.control.recv(1)
        except TimeoutError:
            ready = b""
        if ready != b"R":
            self.close()
            raise RuntimeError(
                "verifier pool: the worker zygote did not start (see its error output above)"
            )

    def spawn(self) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            socket.send_fds(self.control, [b"S"], [theirs.fileno()])
            reply = self.control.recv(8)
        finally:
            theirs.close()
        if len(reply) != 8:
            ours.close()
            raise RuntimeError("verifier pool: the worker zygote died")
        pid = struct.unpack("q", reply)[0]
        return _Worker(pid, os.pidfd_open(pid), Connection(ours.detach()))

    def close(self) -> None:
        self.control.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


class VerifierPool:
    """Verifies (name, response, example) items in ``num_workers`` worker processes.

    Args:
      num_workers: worker processes (each runs one item at a time).
      timeout_s: per item, from the moment it starts; past it the item scores 0 ("timeout") and
        its worker is killed and replaced. Keep it above twice the code verifier's own limit
        (``SandboxLimits.wall_s``, 10 s by default, or an example's ``timeout_s``; an assert-test
        item may need a second sandbox run) so that sandboxed programs report their own
        timeouts.
      recycle_every: items after which a worker is replaced by a fresh one.
      mp_context: "forkserver" (default) forks workers from a clean pre-imported zygote process;
        "spawn" starts each worker as a new interpreter. Both are safe while JAX threads run in
        this process; neither imports this process's ``__main__`` (see ``worker``).
      imports: extra modules the workers import first (modules that ``register`` verifiers),
        after those of `rl_reason.plugins.load` (a config's ``plugins``).
    """

    def __init__(
        self,
        num_workers: int,
        *,
        timeout_s: float = 30.0,
        recycle_every: int = 1000,
        mp_context: str = "forkserver",
        imports: Sequence[str] = (),
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0 or recycle_every < 1:
            raise ValueError("timeout_s must be > 0 and recycle_every >= 1")
        if mp_context not in ("forkserver", "spawn"):
            raise ValueError(
                f"mp_context must be 'forkserver' or 'spawn' (fork is unsafe once JAX runs), "
                f"got {mp_context!r}"
            )
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.recycle_every = recycle_every
        self.mp_context = mp_context
        from rl_reason.verifiers import worker_imports  # the package imports this module

        self._imports = tuple(dict.fromkeys((*worker_imports(), *imports)))
        self._pending: collections.deque[tuple[VerifyHandle, int, Item]] = collections.deque()
        self._lock = threading.Lock()
        self._closed = False
        self._wake_recv, self._wake_send = socket.socketpair()
        self._workers: list[_Worker] = []
        self._spawner: _Zygote | _Spawner | None = None
        self._failed_starts = 0
        # Workers killed and replaced (timeouts, deaths; not the routine recycling), logged and
        # reported in the training metrics as verifier_workers_replaced.
        self.replaced = 0
        # Items whose first worker died -> the newest `spawned` of the workers alive then.
        # Their second try goes to a worker started after that death, never to one that may
        # be dying of the same cause (workers killed together: a retry sent to one not yet
        # seen dead would be charged its death).
        self._retried: dict[tuple[int, int], int] = {}
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        # Processes are created by this long-lived thread: PR_SET_PDEATHSIG fires when the
        # creating *thread* exits, so it must not be a caller's short-lived thread.
        self._thread = threading.Thread(target=self._run, name="VerifierPool", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error
        atexit.register(self.close)

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, items: Sequence[Item]) -> VerifyHandle:
        """Queues items and returns at once; ``handle.result()`` collects them in order."""
        from rl_reason import verifiers

        valid = set(verifiers.names())
        for i, item in enumerate(items):
            if not (isinstance(item, tuple | list) and len(item) == 3):
                raise ValueError(f"item {i}: expected (verifier_name, response, example)")
            if item[0] not in valid:
                verifiers.get(item[0])  # raises with the list of valid names
            if not isinstance(item[1], str):
                raise ValueError(f"item {i}: the response must be a str, got {type(item[1])}")
        handle = VerifyHandle(len(items))
        with self._lock:
            if self._closed:
                raise RuntimeError("VerifierPool is closed")
            self._pending.extend((handle, i, tuple(item)) for i, item in enumerate(items))
        self._wake()
        return handle

    def map(self, items: Sequence[Item]) -> list[VerifyResult]:
        """``submit(items).result()``."""
        return self.submit(items).result()

    def close(self) -> None:
        """Stops the workers (and the zygote); pending items fail. Safe to call twice."""
        with self._lock:
            if self._closed and not self._thread.is_alive():
                return
            self._closed = True
        atexit.unregister(self.close)
        self._wake()
        self._thread.join()

    def worker_pids(self) -> list[int]:
        """Current worker pids (for monitoring and tests)."""
        return [w.pid for w in list(self._workers)]

    @property
    def zygote_pid(self) -> int | None:
        """The zygote's pid with mp_context="forkserver", else None."""
        return self._spawner.pid if self._spawner is not None else None

    # ------------------------------------------------------------------------------------------
    # The dispatcher thread.

    def _wake(self) -> None:
        try:
            self._wake_send.send(b"x")
        except OSError:
            pass

    def _spawn(self) -> _Worker:
        try:
            return self._spawner.spawn()
        except (OSError, RuntimeError):
            if self.mp_context == "spawn":
                raise
            # The zygote died (OOM killer...): start a new one, once.
            self._spawner.close()
            self._spawner = _Zygote(self._imports)
            return self._spawner.spawn()

    def _run(self) -> None:
        try:
            self._start_workers()
        except BaseException as e:  # noqa: BLE001 - re-raised in the constructor
            self._start_error = e
            self._shut_down("the pool failed to start")
            self._started.set()
            return
        self._started.set()
        reason = "the pool was closed"
        try:
            self._loop()
        except BaseException as e:
            reason = f"the verifier pool failed: {e!r}"
            raise
        finally:
            self._shut_down(reason)

    def _start_workers(self) -> None:
        self._spawner = (
            _Zygote(self._imports) if self.mp_context == "forkserver" else _Spawner(self._imports)
        )
        self._workers = [self._spawn() for _ in range(self.num_workers)]
        for worker in self._workers:
            self._await_ready(worker)

    def _await_ready(self, worker: _Worker) -> None:
        if not worker.conn.poll(WORKER_START_TIMEOUT_S):
            raise RuntimeError("verifier pool: a worker did not start in time")
        self._receive_ready(worker)

    def _receive_ready(self, worker: _Worker) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            message = None
        if not (isinstance(message, tuple) and message[0] == "ready"):
            raise RuntimeError(
                "verifier pool: a worker died while starting (see its error output above)"
            )
        worker.ready = True

    def _shut_down(self, reason: str) -> None:
        with self._lock:
            self._closed = True
            pending, self._pending = list(self._pending), collections.deque()
        for worker in self._workers:
            worker.kill()
            pending.extend(worker.tasks)
        if self._spawner is not None:
            self._spawner.close()
        for handle, _, _ in pending:
            handle._fail_all(reason)
        self._wake_recv.close()
        self._wake_send.close()

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                for slot in range(len(self._workers)):
                    self._fill(slot)
            waiting = [w for w in self._workers if w.tasks or not w.ready]
            deadlines = [w.head_started + self.timeout_s for w in waiting if w.tasks]
            timeout = max(min(deadlines) - time.monotonic(), 0.0) if deadlines else None
            ready = wait([w.conn for w in waiting] + [self._wake_recv], timeout)
            if self._wake_recv in ready:
                self._wake_recv.recv(4096)
            for slot, worker in enumerate(self._workers):
                if worker.conn not in ready:
                    continue
                if not worker.ready:
                    self._workers[slot] = self._started_or_replaced(worker)
                    continue
                while worker is self._workers[slot] and worker.tasks and worker.conn.poll():
                    self._workers[slot] = self._collect(worker)
            now = time.monotonic()
            for slot, worker in enumerate(self._workers):
                if worker.tasks and now >= worker.head_started + self.timeout_s:
                    handle, index, _ = worker.tasks.popleft()
                    self._replace(slot, f"an item ran past timeout_s={self.timeout_s:g}")
                    handle._set(index, reject("timeout"))

    def _fill(self, slot: int) -> None:
        """Sends pending items to a worker. While there is a backlog, one more (small) item is
        queued behind the running one, so the worker never waits for this thread to be scheduled.
        A large item is only sent to an idle worker: sending blocks until the worker reads it."""
        while self._pending:
            worker = self._workers[slot]
            depth = PIPELINE_DEPTH if len(self._pending) >= len(self._workers) else 1
            if (
                not worker.ready
                or len(worker.tasks) >= depth
                or worker.served + len(worker.tasks) >= self.recycle_every
            ):
                return
            died = self._retried.get((id(self._pending[0][0]), self._pending[0][1]))
            if died is not None and worker.spawned <= died:
                return  # a retry, for a newer worker
            handle, index, item = self._pending.popleft()
            try:
                message = pickle.dumps((index, *item), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as e:  # noqa: BLE001 - an unpicklable example is the caller's error
                handle._set(index, None, error=f"cannot send the item to a worker: {e!r}")
                continue
            if worker.tasks and len(message) > PIPELINE_MAX_BYTES:
                self._pending.appendleft((handle, index, item))
                return
            self._dispatch(slot, handle, index, item, message)

    def _replace(self, slot: int, reason: str) -> None:
        """Kills a worker and puts the items queued behind its running one back in front."""
        worker = self._workers[slot]
        self.replaced += 1
        log.warning("verifier worker (pid %d) replaced: %s", worker.pid, reason)
        worker.kill()
        self._pending.extendleft(reversed(worker.tasks))
        worker.tasks.clear()
        self._workers[slot] = self._spawn()

    def _started_or_replaced(self, worker: _Worker) -> _Worker:
        try:
            self._receive_ready(worker)
        except RuntimeError:
            worker.kill()
            self._failed_starts += 1
            if self._failed_starts >= 3:
                raise
            return self._spawn()
        self._failed_starts = 0
        return worker

    def _dispatch(
        self, slot: int, handle: VerifyHandle, index: int, item: Item, message: bytes
    ) -> None:
        worker = self._workers[slot]
        try:
            worker.conn.send_bytes(message)
        except OSError:  # the worker died: retry its items and this one on a replacement
            self._pending.appendleft((handle, index, item))
            self._replace(slot, "it died (its pipe closed while an item was sent)")
            return
        if not worker.tasks:
            worker.head_started = time.monotonic()
        worker.tasks.append((handle, index, item))

    def _collect(self, worker: _Worker) -> _Worker:
        handle, index, item = worker.tasks.popleft()
        slot = self._workers.index(worker)
        try:
            seq, ok, payload = worker.conn.recv()
        except (EOFError, OSError):
            died = max(w.spawned for w in self._workers)
            self._replace(slot, "it died while verifying an item")
            if (id(handle), index) in self._retried:
                del self._retried[(id(handle), index)]
                handle._set(index, reject("worker died"))
            else:
                self._retried[(id(handle), index)] = died
                self._pending.appendleft((handle, index, item))
            return self._workers[slot]
        if seq != index:
            raise RuntimeError(f"verifier pool: worker answered item {seq}, expected {index}")
        # The worker starts its next queued item as soon as it has sent this answer.
        worker.head_started = time.monotonic()
        self._retried.pop((id(handle), index), None)
        if ok:
            handle._set(index, payload)
        else:
            handle._set(index, None, error=payload)
        worker.served += 1
        if worker.served >= self.recycle_every and not worker.tasks:
            try:
                worker.conn.send(None)
            except OSError:
                pass
            worker.close()
            return self._spawn()
        return worker
