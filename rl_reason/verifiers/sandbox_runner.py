"""The program that runs inside the code sandbox (standard library only).

The host starts it as ``python -I -c <this file's source>`` inside bubblewrap (or, in the weak
mode, directly), writes one JSON job to its stdin and reads one JSON report from its stdout.
Untrusted code never runs in this process: each case runs in a forked child with rlimits, whose
stdin/stdout/stderr (and, for probes, fd 3) are pipes this process reads with size caps and a
deadline. This process then kills everything the child left behind.

Nothing in the report is trusted by the host as a verdict: it is what the child *claimed*
(bytes it printed, values it encoded). The host holds the expected outputs and decides.

Job: {"mode": "io" | "probes" | "reference", "limits": {...}, "deadline_s": float, and
  io:        "code", "inputs": [stdin text per case]
  probes:    "code", "setup", "probes": [expression source]       (records: {"i", "v" | "e"})
  reference: "setup", "conditions": [source], "values": [encoded]  (records: {"i", "ok" | "e"})
  calls:     "setup", "run", "max_calls", and "recorded": [encoded arguments], "replies":
             [[encoded] | null] to replay (records: {"i", "ok" | "e"}), or neither to record the
             calls "run" makes to __candidate__ (records: {"i", "a"})}
Probes may also get "values": [encoded], bound as __value_K__ before the probes run.
Report: {"runs": [{"exit", "signal", "timed_out", "overflow", "stdout", "records", "stderr"}]}
with stdout/records base64 encoded.

``encode_value``/``decode_value`` move plain Python data (None, bool, int, float, complex, str,
bytes, list, tuple, dict, set, frozenset, Fraction, Decimal) as tagged JSON; the decoder is strict
and builds only those types, so an object that "equals everything" cannot cross.
"""

from __future__ import annotations

import base64
import json
import os
import select
import signal
import sys
import time

STDERR_KEEP_BYTES = 2048
READ_CHUNK = 1 << 16
MAX_VALUE_DEPTH = 64
MAX_INT_DIGITS = 4000

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36


# ----------------------------------------------------------------------------------------------
# Plain values.


def encode_value(value, depth=0):
    """Tagged-JSON form of a plain value; raises TypeError/ValueError for anything else."""
    # Base-class methods are called explicitly so that a subclass cannot report one value and
    # behave as another; what crosses is always the plain underlying value.
    from decimal import Decimal
    from fractions import Fraction

    if depth > MAX_VALUE_DEPTH:
        raise ValueError("value nested too deeply")
    if value is None or value is True or value is False:
        return value
    if isinstance(value, bool):
        return bool.__bool__(value)
    if isinstance(value, int):
        return ["i", int.__repr__(int.__index__(value))]
    if isinstance(value, float):
        return ["f", float.__repr__(value)]
    if isinstance(value, complex):
        return ["c", complex.__repr__(value)]
    if isinstance(value, str):
        return ["s", str.__str__(value)]
    if isinstance(value, (bytes, bytearray)):  # noqa: UP038 - runs on older pythons too
        return ["b", base64.b64encode(bytes(memoryview(value))).decode("ascii")]
    if isinstance(value, Fraction):
        return ["q", int.__repr__(value.numerator), int.__repr__(value.denominator)]
    if isinstance(value, Decimal):
        return ["D", Decimal.__str__(value)]
    if isinstance(value, list):
        return ["l", [encode_value(v, depth + 1) for v in list.__iter__(value)]]
    if isinstance(value, tuple):
        return ["t", [encode_value(v, depth + 1) for v in tuple.__iter__(value)]]
    if isinstance(value, dict):
        items = dict.items(value)
        return ["d", [[encode_value(k, depth + 1), encode_value(v, depth + 1)] for k, v in items]]
    if isinstance(value, frozenset):
        return ["F", [encode_value(v, depth + 1) for v in frozenset.__iter__(value)]]
    if isinstance(value, set):
        return ["S", [encode_value(v, depth + 1) for v in set.__iter__(value)]]
    raise TypeError(f"cannot report a value of type {type(value).__name__}")


def _decode_items(payload, depth):
    if not isinstance(payload, list):
        raise ValueError("malformed value")
    return [decode_value(v, depth + 1) for v in payload]


def decode_value(obj, depth=0):
    """The plain value an ``encode_value`` result describes; ValueError if malformed."""
    from decimal import Decimal
    from fractions import Fraction

    if depth > MAX_VALUE_DEPTH:
        raise ValueError("value nested too deeply")
    if obj is None or obj is True or obj is False:
        return obj
    if not isinstance(obj, list) or not obj or not isinstance(obj[0], str):
        raise ValueError("malformed value")
    tag, args = obj[0], obj[1:]
    try:
        if tag in ("i", "f", "c", "s", "b", "D") and (len(args) != 1 or type(args[0]) is not str):
            raise ValueError("malformed value")
        if tag == "i":
            if len(args[0]) > MAX_INT_DIGITS + 1:
                raise ValueError("integer too long")
            return int(args[0])
        if tag == "f":
            return float(args[0])
        if tag == "c":
            return complex(args[0])
        if tag == "s":
            return args[0]
        if tag == "b":
            return base64.b64decode(args[0], validate=True)
        if tag == "D":
            return Decimal(args[0])
        if tag == "q":
            if len(args) != 2 or not all(type(a) is str and len(a) <= MAX_INT_DIGITS for a in args):
                raise ValueError("malformed value")
            return Fraction(int(args[0]), int(args[1]))
        if len(args) != 1:
            raise ValueError("malformed value")
        if tag == "l":
            return _decode_items(args[0], depth)
        if tag == "t":
            return tuple(_decode_items(args[0], depth))
        if tag == "S":
            return set(_decode_items(args[0], depth))
        if tag == "F":
            return frozenset(_decode_items(args[0], depth))
        if tag == "d":
            pairs = args[0]
            if not isinstance(pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 for p in pairs
            ):
                raise ValueError("malformed value")
            return {decode_value(k, depth + 1): decode_value(v, depth + 1) for k, v in pairs}
    except (TypeError, ArithmeticError, ValueError) as e:
        raise ValueError(f"malformed value: {e}") from None
    raise ValueError(f"unknown value tag {tag!r}")


# ----------------------------------------------------------------------------------------------
# What a child process runs.


def _write_all(fd, data):
    while data:
        data = data[os.write(fd, data) :]


def _record(payload):
    _write_all(3, (json.dumps(payload) + "\n").encode())


def _exit_status(exc):
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _run_program(job, index):
    import atexit
    import builtins
    import threading
    import traceback

    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(job["code"], "solution.py", "exec"), namespace)
        # Like interpreter shutdown: non-daemon threads finish (some solutions run main in a
        # thread with a bigger stack), then atexit handlers.
        threading._shutdown()
        atexit._run_exitfuncs()
        return 0
    except SystemExit as e:
        return _exit_status(e)
    except BaseException:
        traceback.print_exc()
        return 1


def _run_probes(job, index):
    import builtins
    import traceback

    namespace = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(compile(job["code"], "solution.py", "exec"), namespace)
    except BaseException:
        # A solution that exits or fails while loading has run no tests.
        traceback.print_exc()
        return 1
    try:
        exec(compile(job["setup"], "tests.py", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        return 1
    for k, encoded in enumerate(job.get("values", ())):
        namespace[f"__value_{k}__"] = decode_value(encoded)
    for i, source in enumerate(job["probes"]):
        try:
            value = eval(compile(source, f"probe{i}", "eval"), namespace)
            line = {"i": i, "v": encode_value(value)}
        except BaseException as e:  # a solution raising SystemExit fails this probe only
            line = {"i": i, "e": type(e).__name__}
        _record(line)
    return 0


def _run_reference(job, index):
    import builtins

    namespace = {"__name__": "tests", "__builtins__": builtins}
    exec(compile(job["setup"], "tests.py", "exec"), namespace)
    for k, encoded in enumerate(job["values"]):
        if encoded is not None:
            namespace[f"__probe_{k}__"] = decode_value(encoded[0])
    for i, source in enumerate(job["conditions"]):
        try:
            ok = bool(eval(compile(source, f"check{i}", "eval"), namespace))
            line = {"i": i, "ok": ok}
        except BaseException as e:
            line = {"i": i, "e": type(e).__name__}
        _record(line)
    return 0


class _Unreplayable(Exception):
    pass


def _run_calls(job, index):
    # The tests' own code with a stand-in for the solution: no solution code runs here. Both
    # passes draw the same "random" inputs (tests that use the module without a seed).
    import builtins
    import copy
    import random

    random.seed(0)
    namespace = {"__name__": "tests", "__builtins__": builtins}
    exec(compile(job["setup"], "tests.py", "exec"), namespace)
    recorded, replies = job.get("recorded"), job.get("replies")
    count = [0]

    def candidate(*args, **kwargs):
        k = count[0]
        count[0] += 1
        if k >= int(job["max_calls"]):
            raise _Unreplayable("too many calls")
        if replies is None:
            _record({"i": k, "a": encode_value([list(copy.deepcopy(args)), dict(kwargs)])})
            return None
        if k >= len(recorded) or decode_value(recorded[k]) != [list(args), dict(kwargs)]:
            raise _Unreplayable("the calls differ from the recorded ones")
        if replies[k] is None:
            raise RuntimeError("the solution raised or did not answer")
        return decode_value(replies[k][0])

    namespace["__candidate__"] = candidate
    try:
        exec(compile(job["run"], "run", "exec"), namespace)
        line = {"i": 0, "ok": True}
    except _Unreplayable as e:
        line = {"i": 0, "e": "unreplayable: " + str(e)}
    except BaseException as e:
        line = {"i": 0, "e": type(e).__name__}
    if replies is not None:
        _record(line)
    return 0


_MODES = {
    "io": _run_program,
    "probes": _run_probes,
    "reference": _run_reference,
    "calls": _run_calls,
}


def _set_limits(limits):
    import resource

    cpu = int(limits["cpu_s"])
    for which, wanted in (
        # Soft equal to hard: at the limit the kernel sends SIGKILL, which cannot be ignored.
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_AS, int(limits["memory_bytes"])),
        (resource.RLIMIT_FSIZE, int(limits["file_bytes"])),
        (resource.RLIMIT_NPROC, int(limits["processes"])),
        (resource.RLIMIT_NOFILE, 256),
        (resource.RLIMIT_CORE, 0),
    ):
        _, hard = resource.getrlimit(which)
        value = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(which, (value, value))


def _child(job, index, fds):
    status = 70
    try:
        stdin_r, stdout_w, stderr_w, records_w = fds
        os.dup2(stdin_r, 0)
        os.dup2(stdout_w, 1)
        os.dup2(stderr_w, 2)
        if job["mode"] == "io":
            os.close(records_w)
            os.closerange(3, 1 << 16)
        else:
            os.dup2(records_w, 3)
            os.closerange(4, 1 << 16)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        _set_limits(job["limits"])
        sys.stdin = sys.__stdin__ = open(
            0, encoding="utf-8", errors="surrogateescape", closefd=False
        )
        sys.stdout = sys.__stdout__ = open(
            1, "w", encoding="utf-8", errors="surrogateescape", closefd=False
        )
        sys.stderr = sys.__stderr__ = open(
            2, "w", encoding="utf-8", errors="backslashreplace", closefd=False
        )
        sys.argv = ["solution.py"]
        status = _MODES[job["mode"]](job, index)
    except BaseException:
        status = 70
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(status)


# ----------------------------------------------------------------------------------------------
# The supervising loop.


_libc = None


def _prctl(option, value):
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    _libc.prctl(option, value, 0, 0, 0)


def _children():
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == me:
            found.append(int(name))
    return found


def _kill_leftovers():
    # This process is a child subreaper, so everything a case forked is, or becomes when its
    # parent dies, our child: kill and reap until none is left.
    for _ in range(1000):
        children = _children()
        if not children:
            return
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.001)
                break


def _run_case(job, index, deadline, output_cap):
    stdin_data = (
        job["inputs"][index].encode("utf-8", "surrogateescape") if job["mode"] == "io" else b""
    )
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    stderr_r, stderr_w = os.pipe()
    records_r, records_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _child(job, index, (stdin_r, stdout_w, stderr_w, records_w))
    for fd in (stdin_r, stdout_w, stderr_w, records_w):
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    buffers = {stdout_r: bytearray(), stderr_r: bytearray(), records_r: bytearray()}
    caps = {stdout_r: output_cap, records_r: output_cap}
    readable = set(buffers)
    for fd in buffers:
        os.set_blocking(fd, False)
        poller.register(fd, select.POLLIN)
    os.set_blocking(stdin_w, False)
    if stdin_data:
        poller.register(stdin_w, select.POLLOUT)
    else:
        os.close(stdin_w)
        stdin_w = None
    exited = timed_out = overflow = False

    def read(fd):
        nonlocal overflow
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return False
        if not chunk:
            poller.unregister(fd)
            readable.discard(fd)
            return False
        if fd == stderr_r:
            keep = STDERR_KEEP_BYTES - len(buffers[fd])
            buffers[fd] += chunk[: max(keep, 0)]
        else:
            buffers[fd] += chunk
            if len(buffers[fd]) > caps[fd]:
                overflow = True
        return True

    while not exited and not overflow:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        for fd, _ in poller.poll(min(remaining, 1.0) * 1000):
            if fd == pidfd:
                exited = True
            elif fd == stdin_w:
                try:
                    stdin_data = stdin_data[os.write(stdin_w, stdin_data[:READ_CHUNK]) :]
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:  # the child closed its stdin
                    stdin_data = b""
                if not stdin_data:
                    poller.unregister(stdin_w)
                    os.close(stdin_w)
                    stdin_w = None
            else:
                read(fd)
    if not exited:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    # Whatever the child wrote before it exited is still in the pipes.
    for fd in buffers:
        while not overflow and fd in readable and read(fd):
            pass
    _kill_leftovers()
    for fd in [*buffers, pidfd] + ([stdin_w] if stdin_w is not None else []):
        os.close(fd)
    return {
        "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "timed_out": timed_out,
        "overflow": overflow,
        "stdout": base64.b64encode(bytes(buffers[stdout_r][: caps[stdout_r]])).decode("ascii"),
        "records": base64.b64encode(bytes(buffers[records_r][: caps[records_r]])).decode("ascii"),
        "stderr": buffers[stderr_r].decode("utf-8", "replace"),
    }


def main():
    start = time.monotonic()
    job = json.loads(sys.stdin.buffer.read())
    # Not dumpable: the children (same uid) cannot open our /proc entries, so they cannot
    # write into our report pipe or read our memory.
    _prctl(PR_SET_DUMPABLE, 0)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    deadline = start + float(job["deadline_s"])
    cases = len(job["inputs"]) if job["mode"] == "io" else 1
    limits = job["limits"]
    budget = int(limits["total_output_bytes"])
    runs = []
    for index in range(cases):
        run = _run_case(job, index, deadline, min(int(limits["output_bytes"]), budget))
        runs.append(run)
        if run["timed_out"] or run["overflow"]:
            break
        budget -= len(run["stdout"]) * 3 // 4 + len(run["records"]) * 3 // 4
    sys.stdout.buffer.write(json.dumps({"runs": runs}).encode())
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
