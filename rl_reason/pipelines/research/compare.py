"""Two arms compared over their seeds: the difference with its interval, the pooled cases'
exact test, the changes within an arm, and the rule that says when a difference is stated.

These are the statistics behind every research table (`summary.py` lays them out): a
difference is written only when its 95% interval excludes 0 and, for a share of counted cases,
when the cases pooled over the seeds differ by Fisher's exact test; otherwise the cell says
"no detectable difference". `chance.py` (a share against its chance level) and `trend.py` (a
metric against log model size) are the two other tests the summaries use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def difference(
    a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95
) -> dict[str, Any]:
    """mean(a) − mean(b) with its `level` interval, over finite values by seed.

    Over the seeds `_matched` picks: when they are shared and two or more (the same base model
    and RL seed, e.g. two arms of one sweep), the paired t interval; otherwise Welch's t
    interval (unequal variances, Welch–Satterthwaite degrees of freedom). NaN bounds when
    either side has fewer than two values.
    """
    from scipy import stats

    a = {s: v for s, v in a.items() if math.isfinite(v)}
    b = {s: v for s, v in b.items() if math.isfinite(v)}
    nan = math.nan
    a, b, paired = _matched(a, b)
    if paired and len(a) >= 2:
        d = np.asarray([a[s] - b[s] for s in a], np.float64)
        half = stats.t.ppf(0.5 + level / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
        mean = float(d.mean())
        return {
            "mean": mean,
            "low": mean - half,
            "high": mean + half,
            "n": d.size,
            "method": "paired t",
        }
    x, y = np.asarray(list(a.values())), np.asarray(list(b.values()))
    if x.size < 2 or y.size < 2:
        mean = float(x.mean() - y.mean()) if x.size and y.size else nan
        return {"mean": mean, "low": nan, "high": nan, "n": min(x.size, y.size), "method": "none"}
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1)) if se > 0 else 1.0
    half = stats.t.ppf(0.5 + level / 2, df) * se
    mean = float(x.mean() - y.mean())
    return {
        "mean": mean,
        "low": mean - half,
        "high": mean + half,
        "n": min(x.size, y.size),
        "method": "Welch t",
    }


def _matched(a: Mapping[int, Any], b: Mapping[int, Any]) -> tuple[dict, dict, bool]:
    """The seeds two arms are compared over, and whether they are paired: the seeds both have
    when they share two or more, or when one arm has a single seed that the other shares (its
    difference on that base model, not one base against the mean of several, which would mix
    the spread of base models in); otherwise each arm's own."""
    shared = sorted(set(a) & set(b))
    if len(shared) >= 2 or (shared and min(len(a), len(b)) < 2):
        return {s: a[s] for s in shared}, {s: b[s] for s in shared}, True
    return dict(a), dict(b), False


def pooled_cases(
    a: Mapping[int, tuple[float, float]], b: Mapping[int, tuple[float, float]]
) -> dict[str, Any] | None:
    """Each arm's cases pooled over seeds, and Fisher's exact test of equal shares.

    `a` and `b` map seed -> (share, number of cases), e.g. an injection recovery rate of one
    base model and its number of injected cases. Over the seeds `_matched` picks, as
    `difference` does. With three seeds a paired t interval can exclude 0 on a handful of
    cases (one recovered case in 251 at every seed against none gives a near-zero s.d.); the
    pooled test asks whether the cases themselves could come from one share. It treats the
    cases as independent, ignoring the spread between base models, so it is used as a second
    condition, never on its own.
    """
    from scipy import stats

    def finite(m):
        return {s: v for s, v in m.items() if all(math.isfinite(x) for x in v) and v[1] > 0}

    a, b, _ = _matched(finite(a), finite(b))
    if not a or not b:
        return None
    k_a = int(sum(round(p * n) for p, n in a.values()))
    n_a = int(sum(n for _, n in a.values()))
    k_b = int(sum(round(p * n) for p, n in b.values()))
    n_b = int(sum(n for _, n in b.values()))
    p = float(stats.fisher_exact([[k_a, n_a - k_a], [k_b, n_b - k_b]]).pvalue)
    return {"k_a": k_a, "n_a": n_a, "k_b": k_b, "n_b": n_b, "p_fisher": p}


def _by_seed(entry: Mapping[str, Any], path: str) -> dict[int, float]:
    return dict(zip(entry["seeds"], entry["metrics"][path]["values"], strict=True))


def differences(results: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    """Every arm but the first against its reference: the first arm (the experiment's
    reference arm), or the arm that ``spec["reference"](label)`` names where it names one
    (e.g. each size's retry arm against its own size's control)."""
    labels = list(results["arms"])
    if len(labels) < 2:
        return {}
    pick = spec.get("reference") or (lambda _: None)
    out: dict[str, Any] = {"reference": labels[0], "arms": {}, "references": {}}
    for label in labels[1:]:
        ref_label = pick(label) or labels[0]
        if ref_label not in results["arms"]:
            raise ValueError(f"{label!r}: its reference arm {ref_label!r} is not in the sweep")
        arm, ref = results["arms"][label], results["arms"][ref_label]
        out["references"][label] = ref_label
        out["arms"][label] = {path: _compare(arm, path, ref, path) for _, path in spec["table"]}
    return out


def series_differences(results: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    """Each series against its reference series, pooled over the points both have.

    Arms labelled "<series> @ <point>" whose reference (``spec["reference"]``) is an arm of
    another series at the same point (e.g. each size's retry arm against its own size's
    control) form pairs; here the runs of every point count together, each (point, seed) one
    pair, so a difference too small for three seeds at one size can show over all sizes.
    Returns {series: {"reference": series, "points": [...], "metrics": {path: difference}}};
    empty when no arm pairs so.
    """
    pick = spec.get("reference") or (lambda _: None)
    pairs: dict[tuple[str, str], list[str]] = {}
    for label in results["arms"]:
        ref = pick(label)
        if ref is None or " @ " not in label or ref not in results["arms"] or " @ " not in ref:
            continue
        (series, point), (ref_series, ref_point) = label.split(" @ ", 1), ref.split(" @ ", 1)
        if point == ref_point and series != ref_series:
            pairs.setdefault((series, ref_series), []).append(point)
    out: dict[str, Any] = {}
    for (series, ref_series), points in pairs.items():
        arm = _over_points(results, series, points)
        ref = _over_points(results, ref_series, points)
        out[series] = {
            "reference": ref_series,
            "points": points,
            "metrics": {path: _compare(arm, path, ref, path) for _, path in spec["table"]},
        }
    return out


def _over_points(results: Mapping[str, Any], series: str, points: list[str]) -> dict[str, Any]:
    """One entry holding a series' runs at every point, each keyed "<point>/<seed>"."""
    entries = [results["arms"][f"{series} @ {point}"] for point in points]
    merged: dict[str, Any] = {
        "seeds": [f"{p}/{s}" for p, e in zip(points, entries, strict=True) for s in e["seeds"]],
        "metrics": {},
    }
    for path in entries[0]["metrics"]:
        metric = {"values": [v for e in entries for v in e["metrics"][path]["values"]]}
        if all("cases" in e["metrics"][path] for e in entries):
            metric["cases"] = [c for e in entries for c in e["metrics"][path]["cases"]]
        merged["metrics"][path] = metric
    return merged


def _compare(entry_a, path_a, entry_b, path_b) -> dict[str, Any]:
    """`difference` of path_a in entry_a minus path_b in entry_b, with the pooled cases when
    both are shares of counted cases."""
    m_a, m_b = entry_a["metrics"][path_a], entry_b["metrics"][path_b]
    d = difference(_by_seed(entry_a, path_a), _by_seed(entry_b, path_b))
    if "cases" in m_a and "cases" in m_b:
        d["pooled"] = pooled_cases(
            *[
                {s: (v, n) for s, v, n in zip(e["seeds"], m["values"], m["cases"], strict=True)}
                for e, m in ((entry_a, m_a), (entry_b, m_b))
            ]
        )
    return d


def changes(results: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    """Per arm, each ``spec["changes"]`` entry (name, from path, to path): to − from within
    the arm's own runs, paired over its seeds (e.g. D in the last 10 RL steps minus the first
    10, or injection recovery after RL minus before)."""
    table = {path for _, path in spec["table"]}
    out: dict[str, Any] = {}
    for name, src, dst in spec["changes"]:
        missing = {src, dst} - table
        if missing:
            raise ValueError(f"change {name!r}: {sorted(missing)} not in the table")
        out[name] = {
            label: _compare(entry, dst, entry, src) for label, entry in results["arms"].items()
        }
    return out


def fmt_diff(d: Mapping[str, Any]) -> str:
    if not math.isfinite(d["mean"]):
        return "–"
    digits = 1 if abs(d["mean"]) >= 10 else 3
    if not math.isfinite(d["low"]):
        return f"{d['mean']:+.{digits}f} (n = {d['n']}, no interval)"
    cell = f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}] ({d['n']})"
    if detectable(d):
        return cell
    pooled = d.get("pooled")
    if d["low"] <= 0 <= d["high"] or not pooled:
        return cell + " no detectable difference"
    return cell + (
        f"; pooled cases {pooled['k_a']}/{pooled['n_a']} vs {pooled['k_b']}/{pooled['n_b']}"
        f", Fisher p = {pooled['p_fisher']:.2f}: no detectable difference"
    )


def detectable(d: Mapping[str, Any]) -> bool:
    """A difference is stated only when its interval excludes 0 and, for a share of counted
    cases, the pooled cases' exact test rejects equal shares at 5%."""
    if not (math.isfinite(d["low"]) and math.isfinite(d["high"])):
        return False
    if d["low"] <= 0 <= d["high"]:
        return False
    pooled = d.get("pooled")
    return not (pooled and pooled["p_fisher"] >= 0.05)
