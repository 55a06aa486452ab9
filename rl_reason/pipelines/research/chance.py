"""A conditional share of held-out problems set against its chance level, cases pooled.

Some measures have a known level that says "nothing to see": P(correct | a wrong step) sits
near Σp² (the chance that a wrong chain lands on the gold answer) when a wrong step leaves the
answer to luck. Its per-seed values rest on a handful of problems each (a run whose steps are
all right has none), so an interval over seeds says little; here the cases are pooled over the
seeds and an exact two-sided binomial test asks whether they could come from the chance level.

``spec["chance"]`` lists (name, rate path, condition path, chance path): the rate is a share of
the problems that meet the condition, and the condition is itself a share of the run's
held-out set (``eval_size`` problems), so a run's cases are round(condition × eval_size) and
its successes round(rate × cases). The chance level is the mean of the chance path over the
seeds that have cases. Like `compare.pooled_cases`, the test treats cases as independent and
ignores the spread between base models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def pooled_against(
    runs: Sequence[tuple[float, float, float]], level: float = 0.05
) -> dict[str, Any] | None:
    """`runs`: per seed (rate, cases, chance). None when no seed has a case."""
    from scipy import stats

    usable = [
        (r, n, c)
        for r, n, c in runs
        if math.isfinite(n) and n >= 0.5 and math.isfinite(r) and math.isfinite(c)
    ]
    if not usable:
        return None
    k = int(sum(round(r * round(n)) for r, n, _ in usable))
    n = int(sum(round(n) for _, n, _ in usable))
    chance = float(sum(c for *_, c in usable) / len(usable))
    p = float(stats.binomtest(k, n, chance).pvalue)
    return {
        "k": k,
        "n": n,
        "seeds": len(usable),
        "share": k / n,
        "chance": chance,
        "p_binom": p,
        "differs": p < level,
    }


def against_chance(
    found: Mapping[str, list[dict]], spec: Mapping[str, Any], value
) -> dict[str, Any]:
    """Per entry of ``spec["chance"]`` and arm: `pooled_against` over the arm's runs.

    `found` maps arm -> its runs (each with "summary" and "rows"); `value(summary, rows,
    path)` reads one metric of one run (`summary.metric_value`).
    """
    out: dict[str, Any] = {}
    for name, rate_path, cond_path, chance_path in spec.get("chance", ()):
        out[name] = {}
        for label, runs in found.items():
            triples = []
            for r in runs:
                s, rows = r["summary"], r["rows"]
                size = float(s.get("eval_size") or math.nan)
                triples.append(
                    (
                        value(s, rows, rate_path),
                        value(s, rows, cond_path) * size,
                        value(s, rows, chance_path),
                    )
                )
            out[name][label] = pooled_against(triples)
    return out


def fmt(t: Mapping[str, Any] | None) -> str:
    if t is None:
        return "– (no cases)"
    verdict = "differs from chance" if t["differs"] else "no detectable difference from chance"
    return (
        f"{t['k']}/{t['n']} = {t['share']:.3f} vs {t['chance']:.3f} ({t['seeds']} seeds), "
        f"binomial p = {t['p_binom']:.2g}: {verdict}"
    )


def markdown(by_name: Mapping[str, Mapping[str, Any]]) -> list[str]:
    if not by_name:
        return []
    lines = ["", "Against chance (cases pooled over seeds, exact two-sided binomial test):", ""]
    lines.append("| arm | " + " | ".join(by_name) + " |")
    lines.append("|" + "---|" * (len(by_name) + 1))
    labels = list(next(iter(by_name.values())))
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(fmt(t[label]) for t in by_name.values()) + " |")
    return lines
