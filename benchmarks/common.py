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
