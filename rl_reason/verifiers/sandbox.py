"""Starting the code sandbox and reading its report (host side).

Backends, chosen with the environment variable ``RL_REASON_CODE_SANDBOX``:

- ``bwrap`` (default): bubblewrap with every namespace unshared (so no network: only a private
  loopback), an empty environment (bwrap itself is started with no environment, otherwise its
  pid-1 process would show ours in ``/proc/1/environ``), a read-only view of ``/usr`` (and the
  interpreter's prefix) and nothing else of the host, a read-only root, a private size-limited
  ``/tmp``, a new session, ``--die-with-parent``. When the host process is root, bwrap runs as
  the unprivileged uid 65534: the kernel does not enforce RLIMIT_NPROC for uid 0, even inside a
  user namespace, so a fork bomb would otherwise be unbounded.
- ``rlimit``: an explicit opt-in for machines without user namespaces. The same runner and
  rlimits, as uid 65534 when root, but the code can read world-readable host files and use the
  network, and processes that leave the process group may survive the wall-clock kill. It warns
  loudly, once per process.

If bubblewrap cannot run, the code verifier raises ``SandboxUnavailable`` saying what to do; it
never silently falls back.

Inside, the runner (``sandbox_runner``) applies per-process rlimits (CPU time, address space,
file size, process count) to each case it forks. The host adds the wall-clock limit that kills
the whole sandbox (process group + pid namespace) and caps what it reads back.

``RL_REASON_SANDBOX_PYTHON`` picks the interpreter that runs inside (default: this process's
base interpreter if the sandbox user can run it, else ``/usr/bin/python3``). It gets ``-I``:
only its standard library, no site-packages of this venv.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

SANDBOX_ENV = "RL_REASON_CODE_SANDBOX"
PYTHON_ENV = "RL_REASON_SANDBOX_PYTHON"
BACKENDS = ("bwrap", "rlimit")
# uid/gid the sandboxed code sees, and the host uid it runs as when we are root.
INNER_ID = 1000
UNPRIVILEGED_HOST_ID = 65534
# Time for bwrap and the interpreter to start, on top of the code's own wall-clock limit.
STARTUP_SLACK_S = 2.0
STDERR_CAP_BYTES = 1 << 16

_RUNNER_SOURCE = (Path(__file__).parent / "sandbox_runner.py").read_text()
_log = logging.getLogger(__name__)


class SandboxUnavailable(RuntimeError):
    """The configured sandbox cannot run on this machine."""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one verification (all cases of one response).

    wall_s: wall clock for the whole run, all cases together; the sandbox is killed after it.
    cpu_s: CPU seconds per process (RLIMIT_CPU, SIGKILL at the limit).
    memory_bytes: address space per process (RLIMIT_AS).
    file_bytes: largest file a process may write (RLIMIT_FSIZE).
    tmp_bytes: size of the private /tmp.
    processes: processes and threads of the sandbox user (RLIMIT_NPROC).
    output_bytes: captured stdout per case; more is a failure ("output limit exceeded").
    total_output_bytes: captured stdout of all cases together.
    """

    wall_s: float = 10.0
    cpu_s: int = 5
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    tmp_bytes: int = 64 << 20
    processes: int = 32
    output_bytes: int = 1 << 20
    total_output_bytes: int = 8 << 20

    def for_runner(self) -> dict[str, Any]:
        return {
            "cpu_s": self.cpu_s,
            "memory_bytes": self.memory_bytes,
            "file_bytes": self.file_bytes,
            "processes": self.processes,
            "output_bytes": self.output_bytes,
            "total_output_bytes": self.total_output_bytes,
        }


@dataclasses.dataclass(frozen=True)
class CaseRun:
    """What one forked case did, as observed by the runner. Untrusted content."""

    exit_code: int | None
    signal: int | None
    timed_out: bool
    overflow: bool
    stdout: bytes
    records: bytes
    stderr: str


@dataclasses.dataclass(frozen=True)
class RunReport:
    """All case runs, or ``failure`` when the sandbox produced no usable report."""

    runs: tuple[CaseRun, ...]
    failure: str = ""
    timed_out: bool = False


@dataclasses.dataclass(frozen=True)
class _Backend:
    kind: str
    python: str
    binds: tuple[str, ...]


def _python_candidates() -> list[str]:
    override = os.environ.get(PYTHON_ENV)
    if override:
        return [override]
    found = []
    for path in (os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.isfile(path) and path not in found:
            found.append(path)
    return found


def _prefix_binds(python: str) -> tuple[str, ...]:
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(python)))
    if prefix == "/usr" or prefix.startswith("/usr/"):
        return ()
    return (prefix,)


def _bwrap_path() -> str | None:
    path = shutil.which("bwrap") or "/usr/bin/bwrap"
    return path if os.path.exists(path) else None


def _bwrap_command(backend: _Backend, limits: SandboxLimits) -> list[str]:
    cmd = [
        _bwrap_path() or "bwrap",
        "--unshare-all",
        "--unshare-user",
        "--uid", str(INNER_ID),
        "--gid", str(INNER_ID),
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--hostname", "sandbox",
        "--ro-bind", "/usr", "/usr",
    ]  # fmt: skip
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    for path in backend.binds:
        cmd += ["--ro-bind", path, path]
    cmd += [
        "--proc", "/proc",
        "--dev", "/dev",
        "--size", str(limits.tmp_bytes), "--tmpfs", "/tmp",
        "--remount-ro", "/dev",
        "--remount-ro", "/",
        "--chdir", "/tmp",
        backend.python, "-I", "-c", _RUNNER_SOURCE,
    ]  # fmt: skip
    return cmd


def _user_kwargs() -> dict[str, Any]:
    if os.geteuid() != 0:
        return {}
    ids = UNPRIVILEGED_HOST_ID
    return {"user": ids, "group": ids, "extra_groups": []}


def _communicate(
    proc: subprocess.Popen, payload: bytes, timeout_s: float, cap: int
) -> tuple[bytes, bytes, bool, bool]:
    """Feeds ``payload``, reads stdout (at most ``cap`` bytes) and stderr until exit or timeout.

    Returns (stdout, stderr, timed_out, overflow). On timeout or overflow the whole process
    group is killed; with bwrap that tears down the sandbox's pid namespace.
    """
    deadline = time.monotonic() + timeout_s
    out, err = bytearray(), bytearray()
    timed_out = overflow = False
    with selectors.DefaultSelector() as selector:
        os.set_blocking(proc.stdin.fileno(), False)
        selector.register(proc.stdin, selectors.EVENT_WRITE)
        selector.register(proc.stdout, selectors.EVENT_READ, out)
        selector.register(proc.stderr, selectors.EVENT_READ, err)
        view = memoryview(payload)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in selector.select(min(remaining, 1.0)):
                if key.fileobj is proc.stdin:
                    try:
                        view = view[os.write(proc.stdin.fileno(), view[: 1 << 16]) :]
                    except BlockingIOError:
                        continue
                    except OSError:  # the runner died or stopped reading
                        view = view[:0]
                    if not view:
                        selector.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fileobj.fileno(), 1 << 16)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffer = key.data
                if buffer is err:
                    buffer += chunk[: max(STDERR_CAP_BYTES - len(buffer), 0)]
                else:
                    buffer += chunk
                    if len(buffer) > cap:
                        overflow = True
            if overflow:
                break
    if timed_out or overflow:
        _kill_group(proc)
    else:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if not stream.closed:
            stream.close()
    return bytes(out), bytes(err), timed_out, overflow


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _launch(
    backend: _Backend, job: dict[str, Any], limits: SandboxLimits
) -> tuple[bytes, bytes, bool, bool]:
    job = dict(job, limits=limits.for_runner(), deadline_s=limits.wall_s)
    payload = json.dumps(job).encode()
    # The report carries base64 stdout and records of every case, plus JSON framing.
    cap = 3 * limits.total_output_bytes + (1 << 20)
    common = dict(
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={},
        close_fds=True,
        start_new_session=True,
        **_user_kwargs(),
    )
    if backend.kind == "bwrap":
        proc = subprocess.Popen(_bwrap_command(backend, limits), cwd="/", **common)
        return _communicate(proc, payload, limits.wall_s + STARTUP_SLACK_S, cap)
    with tempfile.TemporaryDirectory(prefix="rl_reason_sandbox_") as cwd:
        os.chmod(cwd, 0o777)
        proc = subprocess.Popen([backend.python, "-I", "-c", _RUNNER_SOURCE], cwd=cwd, **common)
        return _communicate(proc, payload, limits.wall_s + STARTUP_SLACK_S, cap)


def _parse_report(stdout: bytes) -> tuple[CaseRun, ...]:
    report = json.loads(stdout)
    runs = []
    for run in report["runs"]:
        exit_code, sig = run["exit"], run["signal"]
        if not (exit_code is None or type(exit_code) is int) or not (
            sig is None or type(sig) is int
        ):
            raise ValueError("malformed exit status")
        runs.append(
            CaseRun(
                exit_code=exit_code,
                signal=sig,
                timed_out=run["timed_out"] is True,
                overflow=run["overflow"] is True,
                stdout=base64.b64decode(run["stdout"], validate=True),
                records=base64.b64decode(run["records"], validate=True),
                stderr=str(run["stderr"])[:2000],
            )
        )
    return tuple(runs)


class SandboxError(RuntimeError):
    """bubblewrap failed to set a sandbox up (not something the code under test did)."""


def run_job(job: dict[str, Any], limits: SandboxLimits) -> RunReport:
    """Runs one runner job (see ``sandbox_runner``) in the configured sandbox.

    A failure of bubblewrap itself (it reports "bwrap: ..." before the runner starts, e.g. when
    the machine runs out of namespaces) is retried once and then raised as SandboxError: it is
    not the response's fault and must not be scored as a wrong answer.
    """
    backend = current_backend()
    for attempt in range(2):
        stdout, stderr, timed_out, overflow = _launch(backend, job, limits)
        setup_failed = not stdout and stderr.startswith(b"bwrap:")
        if not setup_failed:
            break
        if attempt == 1:
            raise SandboxError(stderr.decode("utf-8", "replace").strip()[:300])
    if overflow:
        return RunReport((), failure="output limit exceeded")
    try:
        runs = _parse_report(stdout)
    except (ValueError, KeyError, TypeError) as e:
        if timed_out:
            return RunReport((), failure="timeout", timed_out=True)
        detail = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [type(e).__name__]
        return RunReport((), failure=f"no report from the sandbox ({detail[0][:80]})")
    return RunReport(runs, timed_out=timed_out)


def _probe(backend: _Backend) -> str:
    """'' if the backend runs a trivial program correctly, else what went wrong."""
    limits = SandboxLimits(wall_s=10.0)
    try:
        stdout, stderr, timed_out, _ = _launch(
            backend, {"mode": "io", "code": "print(6 * 7)", "inputs": [""]}, limits
        )
        runs = _parse_report(stdout)
    except Exception as e:  # noqa: BLE001 - any failure means this backend is unusable
        message = stderr.decode("utf-8", "replace").strip() if "stderr" in locals() else ""
        return message[-300:] or f"{type(e).__name__}: {e}"
    if timed_out or not runs or runs[0].stdout.strip() != b"42":
        return f"unexpected probe result: {runs!r}"[:300]
    return ""


@functools.cache
def _resolve_backend(kind: str, candidates: tuple[str, ...]) -> _Backend:
    if kind == "bwrap" and _bwrap_path() is None:
        raise SandboxUnavailable(_unavailable_message("bubblewrap (bwrap) is not installed"))
    problems = []
    for python in candidates:
        backend = _Backend(kind, python, _prefix_binds(python) if kind == "bwrap" else ())
        problem = _probe(backend)
        if not problem:
            return backend
        problems.append(f"{python}: {problem}")
    raise SandboxUnavailable(_unavailable_message("; ".join(problems) or "no python3 found"))


def _unavailable_message(detail: str) -> str:
    return (
        f"the code verifier's sandbox cannot run: {detail}. Install bubblewrap "
        "(apt-get install bubblewrap) and allow unprivileged user namespaces "
        "(sysctl kernel.unprivileged_userns_clone=1, or on Ubuntu "
        "kernel.apparmor_restrict_unprivileged_userns=0; in Docker, a seccomp profile that "
        f"permits clone/unshare). The sandboxed interpreter can be chosen with {PYTHON_ENV}. "
        f"Only if you accept running model-written code without isolation, set "
        f"{SANDBOX_ENV}=rlimit (rlimits only: host files and network stay reachable)."
    )


def current_backend() -> _Backend:
    """The configured backend, probed once per process; raises SandboxUnavailable."""
    kind = os.environ.get(SANDBOX_ENV, "bwrap")
    if kind not in BACKENDS:
        raise ValueError(f"{SANDBOX_ENV}={kind!r}: expected one of {BACKENDS}")
    if kind == "rlimit":
        _warn_weak_sandbox()
    return _resolve_backend(kind, tuple(_python_candidates()))


@functools.cache
def _warn_weak_sandbox() -> None:
    message = (
        f"{SANDBOX_ENV}=rlimit: model-written code runs WITHOUT a sandbox, only with rlimits. "
        "It can read world-readable host files, use the network, and leave processes behind. "
        "Use bubblewrap for anything but a trusted, throwaway machine."
    )
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    _log.warning(message)
