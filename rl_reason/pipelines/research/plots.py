"""The figures of a research summary (`summary.summarize` writes them beside results.json).

  curves.png   each curve metric per RL step: mean over seeds (each seed smoothed first),
               shaded ± 1 s.d. across seeds
  bars.png     each table metric as bars with ± 1 s.d. error bars and the seeds as dots
  against.png  metrics against a size (log scale), one line per series, mean ± 1 s.d.

matplotlib is imported inside the functions: a summary is the only user, and the training
entry points that import this package should not pay for it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rl_reason.infra.metrics import series

SMOOTH = 5


def _figure(n_panels: int, width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height * n_panels + 0.8))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(n_panels, 1, squeeze=False)[:, 0]


def _smooth(values: np.ndarray, window: int = SMOOTH) -> np.ndarray:
    out = np.full(values.shape, np.nan)
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        part = part[np.isfinite(part)]
        if part.size:
            out[i] = part.mean()
    return out


def curves(arms: Mapping[str, list[dict]], spec: Mapping[str, Any], path: Path) -> None:
    fig, axes = _figure(len(spec["curves"]), 7.5, 2.4)
    for ax, (name, key) in zip(axes, spec["curves"], strict=True):
        for label, found in arms.items():
            curves = []
            for r in found:
                steps, values = series(r["rows"], key)
                if steps.size:
                    curves.append((steps, _smooth(values)))
            if not curves:
                continue
            n = min(len(s) for s, _ in curves)
            steps = curves[0][0][:n]
            stack = np.stack([v[:n] for _, v in curves])
            with warnings.catch_warnings():  # steps where no seed has a value stay NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(stack, axis=0)
                sd = np.nanstd(stack, axis=0, ddof=1) if len(curves) > 1 else np.zeros(n)
            (line,) = ax.plot(steps, mean, label=f"{label} ({len(curves)})", linewidth=1.4)
            ax.fill_between(steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.18)
        ax.set_ylabel(name, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    axes[-1].set_xlabel(f"RL step (each seed smoothed over {SMOOTH} steps; band ± 1 s.d.)")
    fig.suptitle(spec["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def bars(results: Mapping[str, Any], spec: Mapping[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = list(results["arms"])
    n = len(spec["table"])
    ncols = min(4, n)
    nrows = -(-n // ncols)
    width = max(2.0, 0.45 * len(labels) + 1.2)
    fig = Figure(figsize=(width * ncols, 2.7 * nrows + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    x = np.arange(len(labels))
    for ax, (name, key) in zip(axes, spec["table"], strict=False):
        ms = [results["arms"][a]["metrics"][key] for a in labels]
        means = np.asarray([m["mean"] for m in ms], np.float64)
        sds = np.asarray([m["sd"] for m in ms], np.float64)
        ax.bar(x, np.nan_to_num(means), yerr=np.nan_to_num(sds), capsize=3, alpha=0.7)
        for i, m in enumerate(ms):
            pts = [v for v in m["values"] if math.isfinite(v)]
            ax.plot([i] * len(pts), pts, "k.", markersize=4)
        ax.set_title(name, fontsize=8)
        ax.set_xticks(x, labels, fontsize=7, rotation=35, ha="right")
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(f"{spec['title']}: mean ± s.d. over seeds (dots: seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def against(arms, results, spec, path: Path, value: Callable[..., float]) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    x_label, x_path, paths = spec["against"]
    fig, axes = _figure(len(paths), 6.5, 2.4)
    for ax, y_path in zip(axes, paths, strict=True):
        series: dict[str, list[tuple[float, float, float]]] = {}
        for label, found in arms.items():
            xs = [value(r["summary"], r["rows"], x_path) for r in found]
            m = results["arms"][label]["metrics"][y_path]
            if not found or not m["n"]:
                continue
            name = label.split(" @ ")[0]
            series.setdefault(name, []).append((float(np.nanmean(xs)), m["mean"], m["sd"]))
        for name, pts in series.items():
            x, y, sd = (np.asarray(v) for v in zip(*sorted(pts), strict=True))
            ax.errorbar(x, y, yerr=sd, marker="o", capsize=3, label=name)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel(next(n for n, p in spec["table"] if p == y_path), fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[-1].set_xlabel(f"{x_label} (log scale); mean ± 1 s.d. over seeds")
    fig.suptitle(spec["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
