"""Per-step metrics: a JSONL file, TensorBoard scalars, optionally Weights & Biases, a console
progress line, and plots.

``workdir/metrics.jsonl`` holds one JSON object per ``write`` call, ``{"step": s, **metrics}``,
flushed at once so a killed or preempted run keeps every line it logged. Non-finite floats
(NaN, ±inf) are written as ``null`` so the file stays strict JSON that any reader accepts;
``read_jsonl`` turns them back into NaN (TensorBoard and the progress line keep the exact value).

Only JAX process 0 should write: construct with ``enabled=jax.process_index() == 0`` and every
method becomes a no-op on the other processes, so the trainer needs no ``if`` around calls.

Weights & Biases is opt-in (``options=MetricsConfig(wandb=True)``, ``pip install -e ".[wandb]"``):
every scalar written to the JSONL is logged to the wandb run at the same step. Its files go to
``workdir/wandb/`` and its run id is kept in ``workdir/wandb_run_id.txt``, so a run resumed in
the same workdir continues the same wandb run. wandb's service process writes the run's
``.wandb`` file shortly after ``close`` returns; it is complete once that process has shut down
(at interpreter exit, or ``wandb.teardown()``).

Typical use::

    with MetricsWriter(workdir, total_steps=cfg.steps, enabled=jax.process_index() == 0) as mw:
        for step in range(cfg.steps):
            metrics = jax.device_get(train_step(...))
            mw.write(step, metrics)
            mw.log_progress(step, metrics)
    plot_curves(workdir / "metrics.jsonl", workdir / "curves.png",
                ["accuracy", "reward_mean", "response_length_mean"])
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import secrets
import string
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

JSONL_NAME = "metrics.jsonl"
TB_DIR = "tb"
WANDB_RUN_ID_NAME = "wandb_run_id.txt"
WANDB_MODES = ("online", "offline", "disabled")

# (metric key, console label), named as the GRPO trainer names its metrics; keys absent from a
# step's metrics are left out of its line, so eval accuracy shows only on evaluation steps.
DEFAULT_PROGRESS_KEYS: tuple[tuple[str, str], ...] = (
    ("reward_mean", "reward"),
    ("accuracy", "acc"),
    ("response_length_mean", "len"),
    ("eval_accuracy", "eval_acc"),
)


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """Optional metrics sinks beside the JSONL file and TensorBoard.

    Attributes:
      wandb: also log to Weights & Biases (needs the ``[wandb]`` extra).
      wandb_project: the wandb project.
      wandb_run_name: display name of the run; empty lets wandb pick one.
      wandb_entity: user or team; empty uses the account's default entity.
      wandb_mode: "online", "offline" or "disabled"; empty leaves it to wandb (the
        ``WANDB_MODE`` environment variable, else online).
    """

    wandb: bool = False
    wandb_project: str = "rl_reason"
    wandb_run_name: str = ""
    wandb_entity: str = ""
    wandb_mode: str = ""

    def __post_init__(self) -> None:
        if self.wandb_mode not in ("", *WANDB_MODES):
            raise ValueError(
                f"MetricsConfig.wandb_mode must be one of {', '.join(map(repr, WANDB_MODES))} or "
                f"'' (wandb's default / WANDB_MODE), got {self.wandb_mode!r}"
            )


def _wandb_run_id(workdir: Path) -> str:
    """The wandb run id of this workdir, created on first use so a resumed run reuses it."""
    path = workdir / WANDB_RUN_ID_NAME
    if path.exists():
        run_id = path.read_text(encoding="utf-8").strip()
        if run_id:
            return run_id
    # wandb's own id alphabet: lowercase base 36, which is also safe in its run directory names.
    alphabet = string.ascii_lowercase + string.digits
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    tmp = path.with_suffix(".txt.tmp")
    tmp.write_text(run_id + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return run_id


def _scalar(key: str, value: Any) -> int | float:
    """A Python int or float from a Python/numpy/jax scalar (fetching it from the device)."""
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric '{key}' must be a scalar, got shape {arr.shape}")
    if arr.dtype.kind in "biu":
        return int(arr.reshape(()))
    if arr.dtype.kind == "f":
        return float(arr.reshape(()))
    raise TypeError(f"metric '{key}' must be a number, got {type(value).__name__} {arr.dtype}")


def format_number(x: float | int) -> str:
    """Compact console form: 3 significant digits, no exponent between 1e-3 and 1e5."""
    if isinstance(x, int):
        return str(x)
    if not math.isfinite(x):
        return str(x)
    ax = abs(x)
    if ax != 0 and (ax < 1e-3 or ax >= 1e5):
        return f"{x:.2e}"
    if ax >= 1000:
        return f"{x:.0f}"
    return f"{x:.3g}"


def format_duration(seconds: float) -> str:
    """'42s', '3m51s', '2h05m', '3d04h': two units at most, enough to plan around."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _import_summary_writer():
    """tensorboardX's SummaryWriter, without the torch import it does when torch is installed.

    tensorboardX imports torch (2 s of start-up) only to accept torch tensors, which we never
    log; with the [ref] extra installed every run paid for it. A torch imported already is kept.
    """
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError inside tensorboardX
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Writes each step's scalar metrics to JSONL and TensorBoard and reports progress.

    Args:
      workdir: run directory; ``metrics.jsonl`` and ``tb/`` are created in it. An existing
        ``metrics.jsonl`` is appended to, so a resumed run continues the same file.
      resume_step: the step a resumed run restarts after: rows of later steps (logged after the
        checkpoint, before the crash) are dropped first, so every step appears exactly once.
      total_steps: for the ``step s/total`` and ETA parts of the progress line.
      enabled: False makes every method a no-op (non-zero JAX processes).
      tensorboard: also write TensorBoard event files (tensorboardX).
      timing_window: the step time is the mean over this many most recent intervals, so the
        first step's compilation stops inflating the ETA after that many steps.
      clock: seconds as a float; injectable so tests control time.
      options: further sinks (Weights & Biases); None is ``MetricsConfig()``, i.e. none.
      run_config: the run's configuration, recorded as the wandb run config.

    With wandb, the values of a step are sent as one history row when a later step is written
    (or on ``close``), so several ``write`` calls for one step end up in the same row.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        total_steps: int | None = None,
        enabled: bool = True,
        tensorboard: bool = True,
        timing_window: int = 20,
        clock: Callable[[], float] = time.perf_counter,
        resume_step: int | None = None,
        options: MetricsConfig | None = None,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.options = options if options is not None else MetricsConfig()
        self.total_steps = total_steps
        self.enabled = enabled
        self._clock = clock
        self._step_times: collections.deque[float] = collections.deque(maxlen=timing_window)
        self._last_tick: tuple[int, float] | None = None
        self._file = None
        self._tb = None
        self._wandb_run = None
        self._closed = False
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._drop_rows_after(int(resume_step))
        self._file = open(self.workdir / JSONL_NAME, "a", encoding="utf-8")
        if tensorboard:
            SummaryWriter = _import_summary_writer()
            self._tb = SummaryWriter(logdir=str(self.workdir / TB_DIR))
        if self.options.wandb:
            try:
                self._wandb_run = self._init_wandb(run_config)
            except BaseException:
                self.close()
                raise

    def _init_wandb(self, run_config: Mapping[str, Any] | None):
        try:
            import wandb  # optional dependency, only where it is used
        except ImportError as e:
            raise ImportError(
                'MetricsConfig(wandb=True) needs the wandb package: pip install -e ".[wandb]"'
            ) from e
        o = self.options
        return wandb.init(
            project=o.wandb_project,
            name=o.wandb_run_name or None,
            entity=o.wandb_entity or None,
            mode=o.wandb_mode or None,
            dir=str(self.workdir),
            config=dict(run_config) if run_config is not None else None,
            id=_wandb_run_id(self.workdir),
            resume="allow",
        )

    @property
    def jsonl_path(self) -> Path:
        return self.workdir / JSONL_NAME

    def rewind(self, step: int) -> None:
        """Forget the rows after `step`: the run goes on from there (a resume that fell back
        from an unreadable newest checkpoint restores an older step than the one it opened with).
        """
        if self._file is None:
            return
        self._file.close()
        self._drop_rows_after(int(step))
        self._file = open(self.jsonl_path, "a", encoding="utf-8")

    def _drop_rows_after(self, step: int) -> None:
        path = self.jsonl_path
        if not path.exists():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                row_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the crash
            if row_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)  # atomic: a crash here leaves the old file or the new one

    def _tick(self, step: int) -> None:
        """Record wall time per step between successive steps seen by write/progress_line."""
        now = self._clock()
        if self._last_tick is not None:
            last_step, last_t = self._last_tick
            if step == last_step:
                return  # write and log_progress for one step: one interval, not two
            if step > last_step:
                self._step_times.append((now - last_t) / (step - last_step))
            else:
                self._step_times.clear()  # steps went back (a restart): old times don't apply
        self._last_tick = (step, now)

    def seconds_per_step(self) -> float | None:
        """Moving-average wall time per step, None until two distinct steps were seen."""
        if not self._step_times:
            return None
        return sum(self._step_times) / len(self._step_times)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append ``{"step": step, **metrics}`` to the JSONL and log each as a TB scalar."""
        if not self.enabled:
            return
        if self._closed:
            raise RuntimeError("MetricsWriter.write after close()")
        if "step" in metrics:
            raise ValueError("metrics must not contain the key 'step'; it is written from `step`")
        step = int(step)
        values = {k: _scalar(k, v) for k, v in metrics.items()}
        self._tick(step)
        row: dict[str, Any] = {"step": step}
        for k, v in values.items():
            row[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, global_step=step)
            self._tb.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def progress_line(
        self,
        step: int,
        metrics: Mapping[str, Any],
        keys: Sequence[str | tuple[str, str]] = DEFAULT_PROGRESS_KEYS,
    ) -> str:
        """``step 12/200 | reward 0.41 | acc 0.38 | len 31.2 | 1.23 s/step | ETA 3m51s``.

        ``keys`` are metric names or (name, label) pairs; names missing from ``metrics`` are
        skipped. Step time and ETA appear once two distinct steps have been seen.
        """
        if not self.enabled:
            return ""
        step = int(step)
        self._tick(step)
        total = f"/{self.total_steps}" if self.total_steps is not None else ""
        parts = [f"step {step}{total}"]
        for entry in keys:
            key, label = (entry, entry) if isinstance(entry, str) else entry
            if key in metrics:
                parts.append(f"{label} {format_number(_scalar(key, metrics[key]))}")
        sps = self.seconds_per_step()
        if sps is not None:
            if sps >= 0.1:
                parts.append(f"{format_number(sps)} s/step")
            else:
                parts.append(f"{format_number(sps * 1000)} ms/step")
            if self.total_steps is not None:
                parts.append(f"ETA {format_duration(max(self.total_steps - step, 0) * sps)}")
        return " | ".join(parts)

    def log_progress(
        self,
        step: int,
        metrics: Mapping[str, Any],
        keys: Sequence[str | tuple[str, str]] = DEFAULT_PROGRESS_KEYS,
    ) -> None:
        """Print the progress line (flushed, so it shows up promptly in captured logs)."""
        line = self.progress_line(step, metrics, keys)
        if line:
            print(line, flush=True)

    def close(self, *, exit_code: int | None = None) -> None:
        """Close every sink; ``exit_code`` != 0 marks the wandb run as failed."""
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=exit_code)

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # A run ended by an exception shows as failed in wandb rather than finished.
        self.close(exit_code=None if exc_type is None else 1)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a metrics JSONL, with ``null`` values read back as NaN.

    A last line cut off mid-write (the run was killed) is skipped with a warning; a malformed
    line anywhere else is an error, since that is not how this writer fails.
    """
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # no newline after it: the write never finished
                warnings.warn(f"{path}: skipping truncated last line {i + 1}", stacklevel=2)
                continue
            raise ValueError(f"{path}:{i + 1} is not valid JSON: {e}") from e
        rows.append({k: math.nan if v is None else v for k, v in row.items()})
    return rows


def series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric, sorted by step; a step logged twice keeps its last value.

    Repeated steps come from a run resumed from a checkpoint older than its last logged step;
    the later line is the one the resumed run's state produced.
    """
    by_step: dict[int, float] = {}
    for row in rows:
        if key in row:
            by_step[int(row["step"])] = float(row[key])
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def plot_curves(
    jsonl_path: str | os.PathLike[str],
    png_path: str | os.PathLike[str],
    keys: Sequence[str],
    *,
    title: str = "",
    xlabel: str = "RL step",
) -> list[str]:
    """Plot each metric in ``keys`` against step, one stacked subplot each, into a PNG.

    Keys that no row contains are skipped (returns the keys plotted); if none is present this
    raises ValueError listing the keys the file does have. NaN values show as gaps.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_jsonl(jsonl_path)
    present = [k for k in keys if any(k in r for r in rows)]
    if not present:
        available = sorted({k for r in rows for k in r} - {"step"})
        raise ValueError(
            f"none of {list(keys)} is in {jsonl_path}; it has {available or 'no metrics'}"
        )
    # A bare Figure on an Agg canvas: no pyplot global state, so a notebook's backend is untouched.
    fig = Figure(figsize=(7.0, 1.0 + 2.2 * len(present)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(present), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, present, strict=True):
        steps, values = series(rows, key)
        ax.plot(steps, values, linewidth=1.2, marker="." if len(steps) < 30 else None)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel(xlabel)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    return present
