"""The zygote and worker processes behind ``VerifierPool``.

Both are fresh interpreters started with subprocess: never forked from the trainer (no JAX
threads are copied) and, unlike multiprocessing's spawn and forkserver, they do not re-import
the trainer's ``__main__`` (which would import jax).

``python -m rl_reason.verifiers.worker zygote FD [MODULE ...]`` (``mp_context="forkserver"``)
imports the verifiers, warms math-verify up, then forks one worker per request arriving on the
control socket FD. Forking from this clean, single-threaded process makes replacing a killed or
recycled worker cost milliseconds instead of a new interpreter and a second of imports.
Control protocol (Unix socket): the zygote sends b"R" when ready; each request is one byte with
one file descriptor attached (the worker's end of a socket pair), answered with the new worker's
pid as 8 bytes.

``python -m rl_reason.verifiers.worker worker FD [MODULE ...]`` (``mp_context="spawn"``) is one
worker serving on FD.

Workers speak ``multiprocessing.connection`` on their socket: first they send ``("ready", pid)``,
then they receive ``(seq, name, response, example)`` or None (retire) and answer
``(seq, ok, result_or_message)``. Everything dies with its parent (PR_SET_PDEATHSIG), so nothing
outlives the pool's owner.
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import struct
import sys
from multiprocessing.connection import Connection

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def serve(conn: Connection) -> None:
    """The worker loop: verify items until told to retire or the pool goes away."""
    from rl_reason import verifiers

    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        seq, name, response, example = message
        try:
            reply = (seq, True, verifiers.get(name)(response, example))
        except Exception as e:  # noqa: BLE001 - reported to the caller of result()
            reply = (seq, False, f"{type(e).__name__}: {e}")
        conn.send(reply)


def _warm_up() -> None:
    # Imports and first-call setup happen once here instead of in every worker's first item.
    from rl_reason import verifiers
    from rl_reason.verifiers import sandbox

    verifiers.get("math")("\\boxed{1}", {"answer": "1"})
    try:
        sandbox.current_backend()
    except Exception:  # noqa: BLE001 - reported when a code item actually needs the sandbox
        pass


def _prepare(modules: list[str]) -> None:
    _die_with_parent()
    # The owner handles Ctrl-C and closes the pool; a terminal's SIGINT must not kill us first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for module in modules:
        importlib.import_module(module)
    _warm_up()


def worker(fd: int, modules: list[str]) -> None:
    _prepare(modules)
    serve(Connection(fd))


def zygote(control_fd: int, modules: list[str]) -> None:
    _prepare(modules)
    control = socket.socket(fileno=control_fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped automatically
    # Keep the imported modules out of the workers' garbage collections, so that collecting
    # does not touch (and copy-on-write) the pages they share with us.
    import gc

    gc.freeze()
    control.sendall(b"R")
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 1, 1)
        except OSError:
            return
        if not message:
            return
        if not fds:
            continue
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                control.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # workers wait for sandboxes
                _die_with_parent()
                serve(Connection(fds[0]))
            except BaseException:  # noqa: BLE001 - a worker must never return into this loop
                code = 1
            finally:
                os._exit(code)
        os.close(fds[0])
        control.sendall(struct.pack("q", pid))


if __name__ == "__main__":
    {"zygote": zygote, "worker": worker}[sys.argv[1]](int(sys.argv[2]), sys.argv[3:])
