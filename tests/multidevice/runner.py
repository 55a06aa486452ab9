"""One process with 8 fake CPU devices for every multi-device computation the tests compare.

XLA_FLAGS=--xla_force_host_platform_device_count=8 only takes effect before jax is imported, so
these computations cannot run in the test process (one CPU device). Each test file used to start
its own process and pay Python and jax start-up there; here they share one, started in the
background as soon as collection knows which computations the selected tests need, so it works
while the tests before them run.

    python -m tests.multidevice.runner OUT_DIR NAME...

A NAME is `<kind>/<arg>` (kinds in COMPUTATIONS); its function writes the results under
OUT_DIR/NAME/. A computation that raises leaves its traceback under OUT_DIR/.status/ and the next
one still runs, so only the tests that read its results fail, each with that traceback. One that
kills the process or runs past its timeout is failed alone as well: the computations after it
are run again in a fresh process.

This module is imported by tests/conftest.py, so nothing at its top level may import jax.
"""

from __future__ import annotations

import faulthandler
import importlib
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEVICES = 8
# kind: (module, function called as fn(arg, out_dir), seconds one computation may take). Each
# took well under a minute alone on two busy cores, with the rest of the suite running beside it.
COMPUTATIONS = {
    "sharding": ("tests.multidevice.mesh_equivalence", "compute", 300),
    "checkpoint": ("tests.multidevice.checkpoint_meshes", "compute", 240),
    "pretrained": ("tests.test_pretrained_sharded", "compute_on_meshes", 300),
    "algorithms": ("tests.multidevice.algorithm_meshes", "compute", 300),
    "partial": ("tests.multidevice.partial_meshes", "compute", 240),
    "multi_turn": ("tests.multidevice.multi_turn_meshes", "compute", 240),
}
STARTUP_TIMEOUT = 120  # from start until the first computation begins (imports, device setup)
NICENESS = 5  # it runs beside the tests: let their processes (and their timeouts) come first
TAIL = 6000


def _status(out: Path, name: str, what: str) -> Path:
    return out / ".status" / f"{name}.{what}"


def _write(path: Path, text: str) -> None:
    # Atomic, so the test side never reads half a traceback or sees "done" before the results.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str]) -> None:
    out, names = Path(argv[0]), argv[1:]
    os.nice(NICENESS)
    # On a timeout the test side sends SIGUSR1 first, so its message shows where the hang was.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    import jax

    assert jax.device_count() == DEVICES, (
        f"run with XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES}"
    )
    for name in names:
        print(f"\n=== start {name}", flush=True)
        _write(_status(out, name, "started"), repr(time.time()))
        try:
            kind, arg = name.split("/", 1)
            module, function, _ = COMPUTATIONS[kind]
            results = out / name
            results.mkdir(parents=True, exist_ok=True)
            getattr(importlib.import_module(module), function)(arg, str(results))
        except Exception:
            traceback.print_exc()
            sys.stderr.flush()
            _write(_status(out, name, "error"), traceback.format_exc())
        else:
            _write(_status(out, name, "done"), "")
        print(f"=== end {name}", flush=True)


class SharedProcess:
    """The test side: schedules computations, waits for one, enforces the timeouts.

    At most one runner process is alive at a time; names scheduled while it runs wait for the
    next one, which starts once it has exited.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.out = Path(out_dir)
        self.queue: list[str] = []  # scheduled, not yet given to a process
        self.seen: set[str] = set()
        self.proc: subprocess.Popen | None = None
        self.proc_names: list[str] = []
        self.proc_started = 0.0
        self.log: Path | None = None
        self.logs = 0

    def schedule(self, names) -> None:
        for name in names:
            kind = name.split("/", 1)[0]
            if kind not in COMPUTATIONS:
                raise KeyError(f"no multi-device computation of kind {kind!r} ({name!r})")
            if name not in self.seen:
                self.seen.add(name)
                self.queue.append(name)
        self._poll()

    def result(self, name: str) -> Path:
        """OUT_DIR/name once its computation has finished; fails the calling test if it failed."""
        self.schedule([name])
        while True:
            if _status(self.out, name, "done").exists():
                return self.out / name
            error = _status(self.out, name, "error")
            if error.exists():
                import pytest

                pytest.fail(
                    f"multi-device computation {name!r} failed in the {DEVICES}-device process:\n"
                    f"{error.read_text()}",
                    pytrace=False,
                )
            self._poll()
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    # --- the process ------------------------------------------------------------------------

    def _finished(self, name: str) -> bool:
        return any(_status(self.out, name, w).exists() for w in ("done", "error"))

    def _poll(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self._check_timeout()
            if self.proc.poll() is not None:
                self._reap()
        if self.proc is None and self.queue:
            self._start()

    def _start(self) -> None:
        names, self.queue = self.queue, []
        self.out.mkdir(parents=True, exist_ok=True)
        self.logs += 1
        self.log = self.out / f".process{self.logs}.log"
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.multidevice.runner", str(self.out), *names],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.proc_names, self.proc_started = names, time.time()

    def _output(self, name: str | None) -> str:
        text = self.log.read_text(errors="replace") if self.log and self.log.exists() else ""
        if name is not None:
            start = text.rfind(f"\n=== start {name}\n")
            text = text[start:] if start >= 0 else text
        return text[-TAIL:]

    def _check_timeout(self) -> None:
        running = [n for n in self.proc_names if not self._finished(n)]
        if not running:
            return
        name = running[0]
        started = _status(self.out, name, "started")
        if started.exists():
            limit = COMPUTATIONS[name.split("/", 1)[0]][2]
            since = float(started.read_text())
        elif all(not _status(self.out, n, "started").exists() for n in self.proc_names):
            name, limit, since = None, STARTUP_TIMEOUT, self.proc_started
        else:  # between two computations
            return
        if time.time() - since <= limit:
            return
        self.proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        self.proc.kill()
        self.proc.wait()
        what = f"{name!r} ran" if name else "the process took"
        message = f"{what} past its {limit} s timeout and was killed; where it was:\n"
        for n in [name] if name else self.proc_names:
            _write(_status(self.out, n, "error"), message + self._output(name))

    def _reap(self) -> None:
        rc = self.proc.returncode
        left = [n for n in self.proc_names if not self._finished(n)]
        begun = [n for n in left if _status(self.out, n, "started").exists()]
        if any(_status(self.out, n, "started").exists() for n in self.proc_names):
            for name in begun:
                message = f"the process died (exit status {rc}) while running it:\n"
                _write(_status(self.out, name, "error"), message + self._output(name))
            # Those it had not begun get a fresh process.
            self.queue = [n for n in left if n not in begun] + self.queue
        else:
            message = f"the process exited (status {rc}) before running any computation:\n"
            for name in left:
                _write(_status(self.out, name, "error"), message + self._output(None))
        self.proc = None


if __name__ == "__main__":
    main(sys.argv[1:])
