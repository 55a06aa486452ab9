"""Shared helpers for the side-by-side benchmarks: timing, environment facts, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile_total = [0.0]
_listening = [False]


def _on_event(event: str, seconds: float, **_: Any) -> None:
    if event in _COMPILE_EVENTS:
        _compile_total[0] += seconds


def compile_seconds() -> float:
    """Seconds JAX has spent tracing, lowering and compiling since the first call of this.

    Read before and after a call to get its compile time: unlike "first call minus a later
    call", this does not go negative or absorb the run time when the machine is loaded.
    """
    if not _listening[0]:
        import jax

        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _listening[0] = True
    return _compile_total[0]


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Wall seconds of `repeats` calls of each blocking `fn`, taken in turns (a, b, a, b, ...).

    Taking turns spreads slow phases of a shared machine's load over all contenders instead of
    penalising whichever happened to run during them.
    """
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds[name] += time_calls(fn, 1)
    return seconds


def time_calls(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of `fn` (which must block until its work is done)."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def summarize(seconds: list[float], units: float) -> dict[str, float]:
    """Best and median time of a list of runs, and `units` per second at each."""
    best, median = min(seconds), statistics.median(seconds)
    return {
        "best_s": best,
        "median_s": median,
        "runs_s": seconds,
        "best_per_s": units / best,
        "median_per_s": units / median,
    }


def limit_cpus(count: int) -> None:
    """Confine this process (XLA's threads, torch's) to `count` of the CPUs it may use.

    Call before JAX's backend starts (its thread pool is sized then). On a machine shared with
    other jobs, both sides of a benchmark confined to one CPU compare like with like, where a
    two-thread run is slowed by whichever of its threads shares a core with another process.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if not 0 < count <= len(cpus):
        raise ValueError(f"--cpus must be in 1..{len(cpus)}, got {count}")
    os.sched_setaffinity(0, set(cpus[:count]))
    try:
        import torch

        torch.set_num_threads(count)
    except ImportError:
        pass


def environment() -> dict[str, Any]:
    """Versions and machine facts that a speed figure is meaningless without.

    The load average is recorded because these CPU machines are shared: a figure taken under
    load from other processes is not comparable with one taken on an idle machine.
    """
    import jax

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
    }
    try:
        import torch
        import transformers

        info.update(
            torch=torch.__version__,
            transformers=transformers.__version__,
            torch_threads=torch.get_num_threads(),
        )
    except ImportError:
        pass
    return info


def write_json(path: str, record: dict[str, Any]) -> None:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")


def print_table(rows: list[list[Any]], header: list[str]) -> None:
    cells = [header] + [
        [f"{c:,.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        print(
            "  ".join(
                c.rjust(w) if n and i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _busy_union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def device_busy_seconds(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds of `fn()`, seconds in which the device executed something during it).

    From a JAX profiler trace (Python tracing off): the union of the spans of XLA executions
    and their ops on the runtime's threads. On the CPU the "device" is these threads; time not
    covered by them is the host's own work (Python, tokenising, waiting on other processes) that
    the device idles through. The trace format is the profiler's, not a stable API: an empty
    trace raises rather than reporting an idle device.
    """
    import glob
    import gzip
    import tempfile

    import jax

    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, profiler_options=options):
            start = time.perf_counter()
            fn()
            wall = time.perf_counter() - start
        (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    threads = {
        (e["pid"], e["tid"]): e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    spans = []
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith(("end: ", "ThreadpoolListener")):
            continue
        if threads.get((e.get("pid"), e.get("tid")), "").startswith("tf_XLA"):
            spans.append((e["ts"], e["ts"] + e.get("dur", 0)))
    if not spans:
        raise RuntimeError("the profiler trace holds no XLA execution spans")
    return wall, _busy_union(spans) / 1e6
