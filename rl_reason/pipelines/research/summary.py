"""Tables and plots of an experiment from its run directories (regenerated at any time).

This module reads the runs and lays out the results; the statistics are `compare.py`'s and the
figures `plots.py`'s.

    summarize(load_experiment("experiments/configs/research_supervision.py"), out_dir)

writes into `out_dir`:

  results.json   per arm: the RL seeds found, each run's base seed (None for the shipped base)
                 and base model key, each table metric per seed, its mean and s.d.; and
                 each arm's difference from the first arm per metric with its 95% interval
                 (`compare.difference`: paired over the seeds both arms have, else Welch's); a
                 share of counted cases named in ``spec["cases"]`` also gets the pooled
                 cases of each arm and Fisher's exact test on them (`compare.pooled_cases`);
                 with ``spec["changes"]`` (name, from path, to path), each arm's change
                 between two of its table metrics (e.g. D over the first and the last 10
                 steps, recovery before and after RL), paired over its seeds; with
                 ``spec["chance"]``, a conditional share's cases pooled over seeds against
                 its chance level (`chance.py`); where arms "<series> @ <point>" have a
                 reference of another series at the same point, each series against that
                 series pooled over the points (`compare.series_differences`)
  results.md     the table, "mean ± s.d. (n seeds)" per cell, then the differences, each
                 "mean [low, high] (n)" and marked "no detectable difference" when the
                 interval holds 0, or when the pooled cases' test does not reject (p >= 0.05)
  curves.png     each curve metric per RL step: mean over seeds (5-step moving average of each
                 seed first), shaded ± 1 s.d. across seeds
  bars.png       each table metric as bars with ± 1 s.d. error bars and the seeds as dots
  against.png    with ``spec["against"]`` (label, path, table paths): those metrics against
                 the path's value (e.g. the model's parameters, log scale), one line per series
                 (arms labelled "<series> @ <point>"), mean ± 1 s.d. over seeds; results.json
                 and results.md then hold each series' slope per decade with its interval
                 (`trend.py`)

Table metrics are paths: ``after.accuracy`` (a field of summary.json, nested with dots) or
``rollout.<metric>.<mean|median|first10|last10>`` (a per-step metric of metrics.jsonl: mean or
median over all steps, mean over the first ten or the last ten), or
``rollout.<metric>.acc<lo>-<hi>``: its mean over the steps whose training accuracy lies in
[lo%, hi%), which compares runs that learn at different speeds at matched accuracy rather
than at the same step (NaN for a run that never enters the band).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rl_reason.infra.metrics import read_jsonl, series
from rl_reason.pipelines.research import chance, compare, plots, runs, trend
from rl_reason.pipelines.research.sweep import Experiment

AGGREGATES = ("mean", "median", "first10", "last10", "acc<lo>-<hi>")
_BAND = re.compile(r"acc(\d+)-(\d+)")


def metric_value(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], path: str) -> float:
    """One table metric of one run (NaN when the run lacks it)."""
    head, _, rest = path.partition(".")
    if head == "rollout":
        key, _, agg = rest.rpartition(".")
        band = _BAND.fullmatch(agg)
        if not key or not (agg in AGGREGATES or band):
            raise ValueError(f"{path!r}: use rollout.<metric>.<{'|'.join(AGGREGATES)}>")
        steps, values = series(rows, key)
        if band:
            lo, hi = int(band[1]) / 100, int(band[2]) / 100
            acc = dict(zip(*series(rows, "accuracy"), strict=True))
            part = values[[lo <= acc.get(s, math.nan) < hi for s in steps]]
        else:
            part = {"first10": values[:10], "last10": values[-10:]}.get(agg, values)
        part = part[np.isfinite(part)]
        if not part.size:
            return math.nan
        return float(np.median(part) if agg == "median" else part.mean())
    node: Any = summary
    for name in path.split("."):
        if not isinstance(node, Mapping) or name not in node:
            return math.nan
        node = node[name]
    return math.nan if node is None else float(node)


def _mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if math.isfinite(x)], np.float64)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def collect(
    exp: Experiment, seeds: Sequence[int] | None = None, records: str | Path | None = None
) -> dict[str, list[dict]]:
    """arm label -> the finished runs of that arm: {seed, workdir, summary, rows}.

    A run is read from its directory, else from its record under `records`; `workdir` says
    which was read.
    """
    arms: dict[str, list[dict]] = {}
    for p in exp.points(seeds):
        arms.setdefault(p.label, [])
        where = runs.finished(p.workdir, records)
        if where is None:
            continue
        summary = json.loads((where / runs.SUMMARY_FILE).read_text())
        rows = read_jsonl(where / "metrics.jsonl")
        arms[p.label].append(
            {
                "seed": p.seed,
                # a base pretrained per seed has that seed; the shipped base has none
                "base_seed": p.base_seed if p.config.base == "scratch" else None,
                "workdir": str(where),
                "summary": summary,
                "rows": rows,
            }
        )
    return arms


def _trends(arms: Mapping[str, list[dict]], spec: Mapping[str, Any]) -> dict[str, Any]:
    _, x_path, paths = spec["against"]
    per_run = {
        label: [
            (
                metric_value(r["summary"], r["rows"], x_path),
                {p: metric_value(r["summary"], r["rows"], p) for p in paths},
            )
            for r in found
        ]
        for label, found in arms.items()
    }
    return {"x": x_path, "by_series": trend.trends(per_run, paths)}


def _fmt(mean: float, sd: float, n: int) -> str:
    if n == 0:
        return "–"
    digits = 1 if abs(mean) >= 10 else 3
    return f"{mean:.{digits}f} ± {sd:.{digits}f} ({n})"


def summarize(
    exp: Experiment,
    out_dir: str | Path,
    seeds: Sequence[int] | None = None,
    records: str | Path | None = None,
) -> dict[str, Any]:
    """Writes results.json, results.md, curves.png and bars.png; returns the results dict.

    With `records`, every finished run directory first leaves its record there (a campaign
    begun before records existed gets them), and runs without a directory are read from it.
    """
    spec = exp.summary_spec
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if records is not None:
        for p in exp.points(seeds):
            if runs.is_done(p.workdir):
                runs.write_record(p.workdir, records)
    arms = collect(exp, seeds, records)
    results: dict[str, Any] = {
        "experiment": exp.name,
        "title": spec["title"],
        "question": spec["question"],
        "arms": {},
    }
    for label, found in arms.items():
        entry: dict[str, Any] = {
            "seeds": [r["seed"] for r in found],
            "base_seeds": [r["base_seed"] for r in found],
            "base_models": [r["summary"].get("stage1", {}).get("key") for r in found],
            "workdirs": [r["workdir"] for r in found],
            "wall_seconds": [r["summary"].get("wall_seconds") for r in found],
            "metrics": {},
        }
        for name, path in spec["table"]:
            values = [metric_value(r["summary"], r["rows"], path) for r in found]
            mean, sd, n = _mean_sd(values)
            entry["metrics"][path] = {
                "label": name,
                "values": values,
                "mean": mean,
                "sd": sd,
                "n": n,
            }
            count_path = spec.get("cases", {}).get(path)
            if count_path:
                entry["metrics"][path]["cases"] = [
                    metric_value(r["summary"], r["rows"], count_path) for r in found
                ]
        results["arms"][label] = entry
    results["differences"] = compare.differences(results, spec)
    pooled_series = compare.series_differences(results, spec)
    if pooled_series:
        results["series_differences"] = pooled_series
    if spec.get("changes"):
        results["changes"] = compare.changes(results, spec)
    if spec.get("against"):
        results["trends"] = _trends(arms, spec)
    if spec.get("chance"):
        results["chance"] = chance.against_chance(arms, spec, metric_value)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, allow_nan=True))
    (out_dir / "results.md").write_text(markdown_table(results, spec))
    if any(arms.values()):
        plots.bars(results, spec, out_dir / "bars.png")
        if spec["curves"]:
            plots.curves(arms, spec, out_dir / "curves.png")
        if spec.get("against"):
            plots.against(arms, results, spec, out_dir / "against.png", metric_value)
    return results


def markdown_table(results: Mapping[str, Any], spec: Mapping[str, Any]) -> str:
    """Arms as rows, table metrics as columns; each cell mean ± s.d. (seeds)."""
    lines = [f"### {spec['title']}", "", spec["question"], ""]
    names = [name.replace("|", "\\|") for name, _ in spec["table"]]
    header = ["arm"] + names
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for label, entry in results["arms"].items():
        cells = [label]
        for _, path in spec["table"]:
            m = entry["metrics"][path]
            cells.append(_fmt(m["mean"], m["sd"], m["n"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean ± s.d. over seeds (number of seeds in brackets)."]
    diffs = results.get("differences") or {}
    if diffs:
        refs = diffs.get("references") or {}
        single = set(refs.values()) <= {diffs["reference"]}
        if single:
            lines += ["", f"Differences from {diffs['reference']}:", ""]
        else:
            lines += ["", "Differences, each arm minus its reference arm:", ""]
            header = ["arm", "reference"] + header[1:]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for label, by_path in diffs["arms"].items():
            cells = [label] + ([] if single else [refs[label]])
            cells += [compare.fmt_diff(by_path[path]) for _, path in spec["table"]]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "Mean difference [95% interval] (seeds): a paired t interval over the seeds both "
            "arms have, else Welch's; an arm with one seed gets its difference on that seed's base "
            "model, with no interval. An interval that holds 0 is no detectable difference; so "
            "is a share of counted cases whose cases, pooled over the seeds, do not differ by "
            "Fisher's exact test (p >= 0.05).",
        ]
    by_series_diff = results.get("series_differences") or {}
    if by_series_diff:
        lines += ["", "Each series minus its reference series, over all its points:", ""]
        lines.append("| series | reference | points | " + " | ".join(names) + " |")
        lines.append("|" + "---|" * (len(spec["table"]) + 3))
        for series, d in by_series_diff.items():
            cells = [series, d["reference"], ", ".join(d["points"])]
            cells += [compare.fmt_diff(d["metrics"][path]) for _, path in spec["table"]]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "Paired over every (point, seed) both series have; the pooled cases likewise.",
        ]
    by_change = results.get("changes") or {}
    if by_change:
        lines += ["", "Changes within each arm (to minus from, paired over its seeds):", ""]
        lines.append("| arm | " + " | ".join(by_change) + " |")
        lines.append("|" + "---|" * (len(by_change) + 1))
        for label in results["arms"]:
            cells = [compare.fmt_diff(by_arm[label]) for by_arm in by_change.values()]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += chance.markdown(results.get("chance") or {})
    by_series = (results.get("trends") or {}).get("by_series") or {}
    if by_series:
        x_label, _, paths = spec["against"]
        label_of = {p: n for n, p in spec["table"]}
        lines += ["", f"Trend per 10x {x_label} (slope on log10):", ""]
        lines.append("| series | " + " | ".join(label_of[p] for p in paths) + " |")
        lines.append("|" + "---|" * (len(paths) + 1))
        for series, by_path in by_series.items():
            lines.append(f"| {series} | " + " | ".join(trend.fmt(by_path[p]) for p in paths) + " |")
        lines += [
            "",
            "Least-squares slope [95% t interval] (runs) over every run of the series, each its "
            "own base model and RL seed. An interval that holds 0 is no detectable trend.",
        ]
    return "\n".join(lines) + "\n"
