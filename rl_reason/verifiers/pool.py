"""VerifierPool: verification in persistent worker processes, overlapped with device work.

    with VerifierPool(num_workers=2, timeout_s=10.0) as pool:
        handle = pool.submit([("math", completion, example), ...])  # returns at once
        ...  # reference / old log-probs on the device
        results = handle.result()  # list[VerifyResult], in order
        metrics = {"verify_s": handle.wall_seconds, "verify_hidden_s": handle.hidden_seconds}

Workers are processes forked from a clean zygote (see ``worker``), never from this process, so
the pool is safe to create after JAX has started its threads, and workers never import jax.
A dispatcher thread here hands each worker one item at a time and tracks its deadline: an item
that runs past ``timeout_s`` gets reward 0 with reason "timeout", and its worker is killed (its
sandboxes die with it) and replaced. A worker that dies scores its item 0 ("worker died").
Workers are retired after ``recycle_every`` items, bounding what caches and leaks accumulate.
``close()`` (or leaving the ``with`` block, or interpreter exit) kills every process the pool
started; they also die on their own if this process dies.

Verifier exceptions (a malformed example, an unavailable sandbox) are not rewards: the other
items still complete, then ``result()`` raises ``VerifierError`` naming the items.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
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
ZYGOTE_START_TIMEOUT_S = 120.0


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
    served: int = 0
    task: tuple[VerifyHandle, int] | None = None
    deadline: float = 0.0

    def kill(self) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.close()

    def close(self) -> None:
        self.conn.close()
        os.close(self.pidfd)


class _Zygote:
    """The process workers are forked from (see ``worker``)."""

    def __init__(self, imports: Sequence[str]):
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        # The workers must import this package even if it is not installed (a source checkout).
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rl_reason.verifiers.worker", str(theirs.fileno()), *imports],
            pass_fds=(theirs.fileno(),),
            env=env,
            start_new_session=True,
        )
        theirs.close()
        self.control.settimeout(ZYGOTE_START_TIMEOUT_S)
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
        return _Worker(pid=pid, pidfd=os.pidfd_open(pid), conn=Connection(ours.detach()))

    def close(self) -> None:
        self.control.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


class VerifierPool:
    """Verifies (name, response, example) items in ``num_workers`` worker processes.

    Args:
      num_workers: worker processes (each runs one item at a time).
      timeout_s: per item, from dispatch; past it the item scores 0 ("timeout") and its worker is
        killed and replaced. Keep it above the code verifier's own limit (SandboxLimits.wall_s,
        10 s by default) so that sandboxed programs report their own timeouts.
      recycle_every: items after which a worker is replaced by a fresh one.
      imports: extra modules the workers import first (modules that ``register`` verifiers).
    """

    def __init__(
        self,
        num_workers: int,
        *,
        timeout_s: float = 30.0,
        recycle_every: int = 1000,
        imports: Sequence[str] = (),
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0 or recycle_every < 1:
            raise ValueError("timeout_s must be > 0 and recycle_every >= 1")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.recycle_every = recycle_every
        self._imports = tuple(imports)
        self._pending: collections.deque[tuple[VerifyHandle, int, Item]] = collections.deque()
        self._lock = threading.Lock()
        self._closed = False
        self._wake_recv, self._wake_send = socket.socketpair()
        self._workers: list[_Worker] = []
        self._zygote: _Zygote | None = None
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
        """Stops the workers and the zygote; pending items fail. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        self._wake()
        self._thread.join()
        self._wake_recv.close()
        self._wake_send.close()

    def worker_pids(self) -> list[int]:
        """Current worker pids (for monitoring and tests)."""
        return [w.pid for w in list(self._workers)]

    @property
    def zygote_pid(self) -> int | None:
        return self._zygote.process.pid if self._zygote else None

    # ------------------------------------------------------------------------------------------
    # The dispatcher thread.

    def _wake(self) -> None:
        try:
            self._wake_send.send(b"x")
        except OSError:
            pass

    def _spawn(self) -> _Worker:
        try:
            return self._zygote.spawn()
        except (OSError, RuntimeError):
            # The zygote died (OOM killer...): start a new one once.
            self._zygote.close()
            self._zygote = _Zygote(self._imports)
            return self._zygote.spawn()

    def _run(self) -> None:
        try:
            self._zygote = _Zygote(self._imports)
            self._workers = [self._zygote.spawn() for _ in range(self.num_workers)]
        except BaseException as e:  # noqa: BLE001 - re-raised in the constructor
            self._start_error = e
            if self._zygote is not None:
                self._zygote.close()
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
            with self._lock:
                self._closed = True
                pending, self._pending = list(self._pending), collections.deque()
            for worker in self._workers:
                worker.kill()
                if worker.task is not None:
                    worker.task[0]._fail_all(reason)
            self._zygote.close()
            for handle, _, _ in pending:
                handle._fail_all(reason)

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                for slot, worker in enumerate(self._workers):
                    if worker.task is None and self._pending:
                        handle, index, item = self._pending.popleft()
                        self._workers[slot] = self._dispatch(worker, handle, index, item)
            busy = [w for w in self._workers if w.task is not None]
            timeout = None
            if busy:
                timeout = max(min(w.deadline for w in busy) - time.monotonic(), 0.0)
            ready = wait([w.conn for w in busy] + [self._wake_recv], timeout)
            if self._wake_recv in ready:
                self._wake_recv.recv(4096)
            for slot, worker in enumerate(self._workers):
                if worker.task is not None and worker.conn in ready:
                    self._workers[slot] = self._collect(worker)
            now = time.monotonic()
            for slot, worker in enumerate(self._workers):
                if worker.task is not None and now >= worker.deadline:
                    handle, index = worker.task
                    worker.kill()
                    self._workers[slot] = self._spawn()
                    handle._set(index, reject("timeout"))

    def _dispatch(self, worker: _Worker, handle: VerifyHandle, index: int, item: Item) -> _Worker:
        try:
            message = pickle.dumps((index, *item), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # noqa: BLE001 - an unpicklable example is the caller's error
            handle._set(index, None, error=f"cannot send the item to a worker: {e!r}")
            return worker
        try:
            worker.conn.send_bytes(message)
        except OSError:  # the idle worker died: replace it
            worker.kill()
            worker = self._spawn()
            worker.conn.send_bytes(message)
        worker.task = (handle, index)
        worker.deadline = time.monotonic() + self.timeout_s
        return worker

    def _collect(self, worker: _Worker) -> _Worker:
        handle, index = worker.task
        worker.task = None
        try:
            seq, ok, payload = worker.conn.recv()
        except (EOFError, OSError):
            worker.kill()
            replacement = self._spawn()
            handle._set(index, reject("worker died"))
            return replacement
        if seq != index:
            raise RuntimeError(f"verifier pool: worker answered item {seq}, expected {index}")
        if ok:
            handle._set(index, payload)
        else:
            handle._set(index, None, error=payload)
        worker.served += 1
        if worker.served >= self.recycle_every:
            try:
                worker.conn.send(None)
            except OSError:
                pass
            worker.close()
            return self._spawn()
        return worker
