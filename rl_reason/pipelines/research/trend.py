"""Trend of a metric against the log of a size (e.g. parameters), over every run of a series.

Across model sizes the question is not whether two sizes differ but whether a metric moves
with scale: the least-squares slope of the metric on log10(size), per run (each run its own
base model and RL seed, so the runs are independent draws), with its t interval on n - 2
degrees of freedom. An interval that holds 0 is no detectable trend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def slope_per_decade(
    sizes: Sequence[float], values: Sequence[float], level: float = 0.95
) -> dict[str, Any]:
    """OLS slope of `values` on log10(`sizes`) with its `level` interval (NaN bounds when
    fewer than three finite points or a single size)."""
    from scipy import stats

    pts = [(s, v) for s, v in zip(sizes, values, strict=True) if s > 0 and math.isfinite(v)]
    out = {"slope": math.nan, "low": math.nan, "high": math.nan, "n": len(pts)}
    out["method"] = "OLS on log10(size), t interval"
    if len(pts) < 2:
        return out
    x = np.log10(np.asarray([p[0] for p in pts], np.float64))
    y = np.asarray([p[1] for p in pts], np.float64)
    if np.ptp(x) == 0:
        return out
    fit = stats.linregress(x, y)
    out["slope"] = float(fit.slope)
    if len(pts) >= 3:
        half = stats.t.ppf(0.5 + level / 2, len(pts) - 2) * fit.stderr
        out["low"], out["high"] = float(fit.slope - half), float(fit.slope + half)
    return out


def trends(
    runs_by_arm: Mapping[str, list[tuple[float, Mapping[str, float]]]], paths: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """series -> metric path -> `slope_per_decade` over the runs of the series' arms.

    `runs_by_arm`: arm label ("<series> @ <size label>") -> [(size, {path: value})] per run.
    """
    by_series: dict[str, list[tuple[float, Mapping[str, float]]]] = {}
    for label, found in runs_by_arm.items():
        by_series.setdefault(label.split(" @ ")[0], []).extend(found)
    return {
        series: {
            path: slope_per_decade([s for s, _ in found], [m[path] for _, m in found])
            for path in paths
        }
        for series, found in by_series.items()
    }


def fmt(t: Mapping[str, Any]) -> str:
    if not math.isfinite(t["slope"]):
        return "–"
    if not math.isfinite(t["low"]):
        return f"{t['slope']:+.3f} (n = {t['n']}, no interval)"
    cell = f"{t['slope']:+.3f} [{t['low']:+.3f}, {t['high']:+.3f}] ({t['n']})"
    return cell + (" no detectable trend" if t["low"] <= 0 <= t["high"] else "")
