"""Tables and plots of an experiment from its run directories (regenerated at any time).

    summarize(load_experiment("experiments/configs/research_supervision.py"), out_dir)

writes into `out_dir`:

  results.json   per arm: the RL seeds found, each run's base seed (None for the shipped base)
                 and base model key, each table metric per seed, its mean and s.d.; and
                 each arm's difference from the first arm per metric with its 95% interval
                 (`difference`: paired over the seeds both arms have, else Welch's); a
                 share of counted cases named in ``spec["cases"]`` also gets the pooled
                 cases of each arm and Fisher's exact test on them (`pooled_cases`);
                 with ``spec["changes"]`` (name, from path, to path), each arm's change
                 between two of its table metrics (e.g. D over the first and the last 10
                 steps, recovery before and after RL), paired over its seeds; with
                 ``spec["chance"]``, a conditional share's cases pooled over seeds against
                 its chance level (`chance.py`)
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
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rl_reason.infra.metrics import read_jsonl, series
from rl_reason.pipelines.research import chance, runs, trend
from rl_reason.pipelines.research.sweep import Experiment

SMOOTH = 5
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
    results["differences"] = differences(results, spec)
    if spec.get("changes"):
        results["changes"] = changes(results, spec)
    if spec.get("against"):
        results["trends"] = _trends(arms, spec)
    if spec.get("chance"):
        results["chance"] = chance.against_chance(arms, spec, metric_value)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, allow_nan=True))
    (out_dir / "results.md").write_text(markdown_table(results, spec))
    if any(arms.values()):
        _plot_bars(results, spec, out_dir / "bars.png")
        if spec["curves"]:
            _plot_curves(arms, spec, out_dir / "curves.png")
        if spec.get("against"):
            _plot_against(arms, results, spec, out_dir / "against.png")
    return results


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
    `difference` does. With three seeds a
    paired t interval can exclude 0 on a handful of cases (one recovered case in 251 at every
    seed against none gives a near-zero s.d.); the pooled test asks whether the cases
    themselves could come from one share. It treats the cases as independent, ignoring the
    spread between base models, so it is used as a second condition, never on its own.
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


def _fmt_diff(d: Mapping[str, Any]) -> str:
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


def markdown_table(results: Mapping[str, Any], spec: Mapping[str, Any]) -> str:
    """Arms as rows, table metrics as columns; each cell mean ± s.d. (seeds)."""
    lines = [f"### {spec['title']}", "", spec["question"], ""]
    header = ["arm"] + [name.replace("|", "\\|") for name, _ in spec["table"]]
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
            cells += [_fmt_diff(by_path[path]) for _, path in spec["table"]]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "Mean difference [95% interval] (seeds): a paired t interval over the seeds both "
            "arms have, else Welch's; an arm with one seed gets its difference on that seed's base "
            "model, with no interval. An interval that holds 0 is no detectable difference; so "
            "is a share of counted cases whose cases, pooled over the seeds, do not differ by "
            "Fisher's exact test (p >= 0.05).",
        ]
    by_change = results.get("changes") or {}
    if by_change:
        lines += ["", "Changes within each arm (to minus from, paired over its seeds):", ""]
        lines.append("| arm | " + " | ".join(by_change) + " |")
        lines.append("|" + "---|" * (len(by_change) + 1))
        for label in results["arms"]:
            cells = [_fmt_diff(by_arm[label]) for by_arm in by_change.values()]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += chance.markdown(results.get("chance") or {})
    by_series = (results.get("trends") or {}).get("by_series") or {}
    if by_series:
        x_label, _, paths = spec["against"]
        names = {p: n for n, p in spec["table"]}
        lines += ["", f"Trend per 10x {x_label} (slope on log10):", ""]
        lines.append("| series | " + " | ".join(names[p] for p in paths) + " |")
        lines.append("|" + "---|" * (len(paths) + 1))
        for series, by_path in by_series.items():
            lines.append(f"| {series} | " + " | ".join(trend.fmt(by_path[p]) for p in paths) + " |")
        lines += [
            "",
            "Least-squares slope [95% t interval] (runs) over every run of the series, each its "
            "own base model and RL seed. An interval that holds 0 is no detectable trend.",
        ]
    return "\n".join(lines) + "\n"


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


def _plot_curves(arms: Mapping[str, list[dict]], spec: Mapping[str, Any], path: Path) -> None:
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


def _plot_bars(results: Mapping[str, Any], spec: Mapping[str, Any], path: Path) -> None:
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


def _plot_against(arms, results, spec, path: Path) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    x_label, x_path, paths = spec["against"]
    fig, axes = _figure(len(paths), 6.5, 2.4)
    for ax, y_path in zip(axes, paths, strict=True):
        series: dict[str, list[tuple[float, float, float]]] = {}
        for label, found in arms.items():
            xs = [metric_value(r["summary"], r["rows"], x_path) for r in found]
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
