"""The research experiments' pieces: the process verifier, the measures, sweeps and summaries.

Golden numbers are worked out by hand in the comments; the bridge's batched log-probs are
checked against a per-text forward pass with numpy's log-softmax.
"""

import functools
import json
import math
import shutil

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from models import get_config as model_preset
from rl_reason import verifiers
from rl_reason.infra import sharding
from rl_reason.infra.tokenizer import train_sentencepiece
from rl_reason.pipelines.research import (
    base_cache,
    bridge,
    compare,
    hyper,
    measures,
    runs,
    summary,
    sweep,
    trend,
)
from rl_reason.tasks import arithmetic, templates

PROBLEM = {
    "question": "Start with 17. Step 1: add 8. Step 2: subtract 5.",
    "answer": "20",
    "steps": [(17, "+", 8, 25), (25, "-", 5, 20)],
    "verifier": "arithmetic",
}


def completion(lines: list[str], answer: str = "20") -> str:
    return templates.make_completion("\n".join(lines), answer)


RIGHT = completion(["Step 1: 17 + 8 = 25", "Step 2: 25 - 5 = 20"])
ONE_WRONG = completion(["Step 1: 17 + 8 = 25", "Step 2: 25 - 5 = 21"])  # right answer anyway
EXTRA = completion(["Step 1: 17 + 8 = 25", "Step 2: 25 - 5 = 20", "Step 3: 20 + 1 = 21"])
MISSING = completion(["Step 1: 17 + 8 = 25"], answer="25")
BARE = completion([])


@pytest.mark.parametrize(
    "response, score, correct",
    [
        (RIGHT, 1.0, True),
        (ONE_WRONG, 0.5, True),  # 1 of 2 steps right
        (EXTRA, 2 / 3, True),  # 2 right of max(2 gold, 3 written)
        (MISSING, 0.5, False),  # 1 right of max(2, 1)
        (BARE, 0.0, True),
        (completion(["Step 1: 17 + 8 = 24", "Step 2: 24 - 5 = 19"], "19"), 0.0, False),
    ],
)
def test_process_verifier_scores_the_share_of_right_steps(response, score, correct):
    verify = verifiers.get("arithmetic_process")
    result = verify(response, PROBLEM)
    assert result.reward == pytest.approx(score)
    assert result.correct is correct
    # The weighted sum: (1 - w) * outcome + w * process.
    mixed = verify(response, {**PROBLEM, "process_weight": 0.25})
    assert mixed.reward == pytest.approx(0.75 * float(correct) + 0.25 * score)


def test_process_verifier_rejects_bad_examples():
    verify = verifiers.get("arithmetic_process")
    with pytest.raises(ValueError, match="needs 'steps'"):
        verify(RIGHT, {"answer": "20"})
    with pytest.raises(ValueError, match="process_weight"):
        verify(RIGHT, {**PROBLEM, "process_weight": 1.5})


def test_process_verifier_runs_in_the_pool_workers():
    items = [("arithmetic_process", r, PROBLEM) for r in (RIGHT, ONE_WRONG, BARE)]
    with verifiers.VerifierPool(1, timeout_s=10.0) as pool:
        results = pool.submit(items).result()
    assert [r.reward for r in results] == [1.0, 0.5, 0.0]


@pytest.mark.parametrize(
    "response, expected",
    [
        (RIGHT, True),
        (ONE_WRONG, True),  # readability, not correctness
        (BARE, False),  # no step list
        (completion(["Step 2: 17 + 8 = 25"]), False),  # numbering must start at 1
        (completion(["17 + 8 = 25", "25 - 5 = 20"]), False),  # unlabelled lines
        (completion(["Step 1: 17 + 8 = 25", "so", "Step 2: 25 - 5 = 20"]), False),
        (RIGHT + "<answer>20</answer>", False),  # a second answer
        ("\nStep 1: 17 + 8 = 25\n<answer>25</answer>", False),  # think block never closed
    ],
)
def test_well_formed(response, expected):
    assert measures.well_formed(response) is expected


def test_completion_stats_and_ratios_by_hand():
    texts = [RIGHT, ONE_WRONG, MISSING, BARE]
    stats = measures.completion_stats(texts, [PROBLEM] * 4, count_tokens=len)
    # correct: RIGHT, ONE_WRONG, BARE (3 of 4); through a wrong step: ONE_WRONG only.
    assert stats["frac_correct"] == 0.75
    assert stats["frac_correct_wrong_step"] == 0.25
    assert stats["frac_correct_not_process"] == 0.5  # ONE_WRONG and BARE
    assert stats["frac_process_correct"] == 0.25
    assert stats["frac_with_steps"] == 0.75
    assert stats["frac_well_formed"] == 0.75
    assert stats["step_score"] == pytest.approx((1 + 0.5 + 0.5 + 0) / 4)
    assert stats["frac_wrong"] == 0.25
    assert stats["frac_right_steps_wrong_answer"] == 0.0
    right_steps_no_answer = RIGHT.replace("<answer>20</answer>", "<answer>21</answer>")
    one = measures.completion_stats([right_steps_no_answer], [PROBLEM])
    assert one["frac_right_steps_wrong_answer"] == 1.0 and one["frac_process_correct"] == 1.0
    assert stats["wrong_length_x_frac"] == len(MISSING) / 4
    r = measures.ratios(stats)
    assert r["wrong_step_given_correct"] == pytest.approx(1 / 3)
    assert r["not_process_given_correct"] == pytest.approx(2 / 3)
    assert r["wrong_length_mean"] == len(MISSING)
    nothing_right = measures.completion_stats([MISSING], [PROBLEM])
    assert math.isnan(measures.ratios(nothing_right)["wrong_step_given_correct"])


def test_hyper_sweeps():
    points = hyper.product(
        [hyper.seeds([0, 1]), hyper.chain([hyper.arm("a"), hyper.arm("b", {"config.x": 2})])]
    )
    assert [(p["config.seed"], p["arm"], p.get("config.x")) for p in points] == [
        (0, "a", None),
        (0, "b", 2),
        (1, "a", None),
        (1, "b", 2),
    ]
    assert all(
        p["config.grpo.seed"] == p["config.pretrain.seed"] == p["config.seed"] for p in points
    )
    assert hyper.zipit([hyper.sweep("config.a", [1, 2]), hyper.sweep("config.b", [3, 4])]) == [
        {"config.a": 1, "config.b": 3},
        {"config.a": 2, "config.b": 4},
    ]
    with pytest.raises(ValueError, match="one length"):
        hyper.zipit([hyper.sweep("config.a", [1]), hyper.sweep("config.b", [3, 4])])
    with pytest.raises(ValueError, match="twice"):
        hyper.product([hyper.fixed("config.a", 1), hyper.fixed("config.a", 2)])
    with pytest.raises(ValueError, match="start with 'config.'"):
        hyper.sweep("lr", [1])


EXPERIMENTS = ["supervision", "fidelity", "bridge", "cold_start", "algorithms"]


def _experiment(name: str, arg: str = "", runs_root: str | None = None) -> sweep.Experiment:
    return sweep.load_experiment(f"experiments/configs/research_{name}.py", arg, runs_root)


def test_sweeps_share_the_baseline_run_and_commands_reproduce_the_config():
    dirs = {
        name: {(p.label, p.seed): p.workdir for p in _experiment(name).points()}
        for name in EXPERIMENTS
    }
    for name, points in dirs.items():
        assert {seed for _, seed in points} == {0, 1, 2}, name
        assert len(set(points.values())) == len(points), name  # distinct arms, distinct runs
    for seed in (0, 1, 2):
        baseline = dirs["supervision"][("outcome", seed)]
        assert dirs["algorithms"][("GRPO", seed)] == baseline
        assert dirs["cold_start"][("zero (R1-Zero)", seed)] == baseline
        assert (
            dirs["bridge"][("cold start + outcome", seed)]
            == dirs["cold_start"][("cold start (R1)", seed)]
        )
    # The child process parses the point's command line: it must land in the same directory.
    for p in _experiment("algorithms").points(seeds=[1]):
        argv = ["train", *p.command[3:]]
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file(
            "config", None, "", flag_values=fv, lock_config=True, sys_argv=argv
        )
        fv(argv)
        assert runs.workdir_for(fv.config) == p.workdir, p.label
        assert fv.config.grpo.seed == fv.config.cold_start.seed == 1


def test_sweep_refuses_unknown_fields(tmp_path):
    base = _experiment("supervision").base_config()
    with pytest.raises(ValueError, match="does not have"):
        sweep.apply_overrides(base, {"config.grpo.no_such_knob": 1})


def test_metric_paths():
    s = {"after": {"accuracy": 0.5, "x": None}}
    rows = [{"step": i + 1, "accuracy": float(i)} for i in range(30)]
    assert summary.metric_value(s, rows, "after.accuracy") == 0.5
    assert math.isnan(summary.metric_value(s, rows, "after.x"))
    assert math.isnan(summary.metric_value(s, rows, "before.accuracy"))
    assert summary.metric_value(s, rows, "rollout.accuracy.first10") == 4.5
    assert summary.metric_value(s, rows, "rollout.accuracy.last10") == 24.5
    assert summary.metric_value(s, rows, "rollout.accuracy.mean") == 14.5
    spiky = rows[:3] + [{"step": 4, "accuracy": 1000.0}]
    assert summary.metric_value(s, spiky, "rollout.accuracy.median") == 1.5
    with pytest.raises(ValueError, match="rollout"):
        summary.metric_value(s, rows, "rollout.accuracy.p90")
    # At matched accuracy: the steps whose accuracy is in [lo%, hi%), whatever their number.
    learn = [
        {"step": i + 1, "accuracy": a, "d": 10.0 * i} for i, a in enumerate([0.2, 0.5, 0.7, 0.8])
    ]
    assert summary.metric_value(s, learn, "rollout.d.acc50-80") == 15.0  # steps 2 and 3
    assert summary.metric_value(s, learn, "rollout.accuracy.acc0-30") == 0.2
    assert math.isnan(summary.metric_value(s, learn, "rollout.d.acc90-100"))


def test_summarize_tables_seeds_with_mean_and_sd(tmp_path):
    exp = _experiment("cold_start", "smoke", str(tmp_path / "runs"))
    accuracy = {("zero (R1-Zero)", 0): 0.2, ("cold start (R1)", 0): 0.5}
    for p in [p for p in exp.points(seeds=[0]) if (p.label, p.seed) in accuracy]:
        p.workdir.mkdir(parents=True)
        acc = accuracy[(p.label, p.seed)]
        (p.workdir / runs.SUMMARY_FILE).write_text(
            json.dumps({"after": {"accuracy": acc}, "wall_seconds": 1.0})
        )
        rows = [{"step": s, "accuracy": acc + 0.01 * s} for s in range(1, 6)]
        (p.workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # A second seed for one arm, so that it has a standard deviation.
    (other,) = [p for p in exp.points(seeds=[1]) if p.label == "cold start (R1)"]
    other.workdir.mkdir(parents=True)
    (other.workdir / runs.SUMMARY_FILE).write_text(json.dumps({"after": {"accuracy": 0.7}}))
    (other.workdir / "metrics.jsonl").write_text(json.dumps({"step": 1, "accuracy": 0.7}) + "\n")

    out = tmp_path / "results"
    results = summary.summarize(exp, out)
    cold = results["arms"]["cold start (R1)"]["metrics"]["after.accuracy"]
    assert cold["values"] == [0.5, 0.7] and cold["n"] == 2
    # Each seed is its own base model, pretrained from scratch with that seed.
    assert results["arms"]["cold start (R1)"]["base_seeds"] == [0, 1] == [0, other.base_seed]
    assert cold["mean"] == pytest.approx(0.6)
    assert cold["sd"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    zero = results["arms"]["zero (R1-Zero)"]["metrics"]["rollout.accuracy.mean"]
    assert zero["mean"] == pytest.approx(0.23) and zero["sd"] == 0.0
    table = (out / "results.md").read_text()
    assert "| cold start (R1) | – | 0.600 ± 0.141 (2) |" in table
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "bars.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text())["experiment"] == "research_cold_start"


def test_a_campaign_continues_from_its_records_on_a_fresh_checkout(tmp_path):
    exp = _experiment("cold_start", "smoke", str(tmp_path / "runs"))
    records = tmp_path / "records"
    (first, second, *_) = exp.points(seeds=[0])
    for p, acc in ((first, 0.25), (second, 0.75)):
        p.workdir.mkdir(parents=True)
        (p.workdir / "metrics.jsonl").write_text(json.dumps({"step": 1, "accuracy": acc}) + "\n")
        (p.workdir / runs.SUMMARY_FILE).write_text(json.dumps({"after": {"accuracy": acc}}))
        (p.workdir / "checkpoints").mkdir()  # stays behind: not part of a record
    (second.workdir / runs.SUMMARY_FILE).unlink()  # the second run did not finish
    with pytest.raises(FileNotFoundError, match="not finished"):
        runs.write_record(second.workdir, records)
    want = summary.summarize(exp, tmp_path / "here", seeds=[0], records=records)
    rec = records / first.workdir.name
    assert sorted(f.name for f in rec.iterdir()) == ["metrics.jsonl", runs.SUMMARY_FILE]
    assert not (records / second.workdir.name).exists()

    # A fresh checkout: the run directories are gone, the records are there.
    shutil.rmtree(tmp_path / "runs")
    got = summary.summarize(exp, tmp_path / "fresh", seeds=[0], records=records)
    assert got["arms"][first.label]["workdirs"] == [str(rec)]
    assert got["arms"][first.label]["metrics"] == want["arms"][first.label]["metrics"]
    assert summary.summarize(exp, tmp_path / "none", seeds=[0])["arms"][first.label]["seeds"] == []
    # The sweep counts the recorded point as done and would run only the others.
    said = []
    status = dict(
        (p.workdir, s)
        for p, s in sweep.run_sweep(exp, seeds=[0], dry_run=True, echo=said.append, records=records)
    )
    assert status[first.workdir] == "done" and status[second.workdir] == "dry run"
    assert sum(s == "done" for s in status.values()) == 1


def test_a_sweep_runs_only_the_arms_it_is_given(tmp_path):
    exp = _experiment("cold_start", "smoke", str(tmp_path / "runs"))
    labels = [p.label for p in exp.points(seeds=[0])]
    status = sweep.run_sweep(exp, seeds=[0, 1], dry_run=True, echo=lambda _: None, arms=[labels[1]])
    assert [(p.label, p.seed) for p, _ in status] == [(labels[1], 0), (labels[1], 1)]
    with pytest.raises(ValueError, match="no arm"):
        sweep.run_sweep(exp, dry_run=True, echo=lambda _: None, arms=[labels[1] + "x"])


def test_trend_slope_per_decade_matches_a_hand_fit():
    sizes = [1e5, 1e5, 1e6, 1e6, 1e7, 1e7]
    values = [0.10, 0.14, 0.20, 0.22, 0.31, 0.29]
    got = trend.slope_per_decade(sizes, values)
    x = np.log10(sizes)
    slope, icept = np.polyfit(x, values, 1)
    resid = np.asarray(values) - (slope * x + icept)
    se = math.sqrt(resid @ resid / (len(x) - 2) / ((x - x.mean()) @ (x - x.mean())))
    half = 2.7764451051977987 * se  # t(0.975, 4 degrees of freedom)
    assert got["slope"] == pytest.approx(slope) and got["n"] == 6
    assert (got["low"], got["high"]) == pytest.approx((slope - half, slope + half))
    assert trend.fmt(got).endswith("(6)")  # the interval excludes 0: no verdict words
    flat = trend.slope_per_decade(sizes, [0.2, 0.3, 0.3, 0.2, 0.2, 0.3])
    assert flat["low"] < 0 < flat["high"] and "no detectable trend" in trend.fmt(flat)
    assert math.isnan(trend.slope_per_decade([1e5, 1e5], [0.1, 0.2])["slope"])  # one size
    two = trend.slope_per_decade([1e5, 1e6], [0.1, 0.2])
    assert two["slope"] == pytest.approx(0.1) and "no interval" in trend.fmt(two)
    by = trend.trends({"a @ s": [(1e5, {"m": 0.1})], "a @ l": [(1e6, {"m": 0.3})]}, ["m"])
    assert by["a"]["m"]["slope"] == pytest.approx(0.2)


def test_differences_against_each_arms_own_reference():
    def arm(values):
        stats = {"mean": np.mean(values), "sd": np.std(values, ddof=1), "n": len(values)}
        return {"seeds": [0, 1, 2], "metrics": {"m": {"values": values, **stats}}}

    results = {"arms": {"base": arm([0.0] * 3), "c2": arm([1.0] * 3), "t2": arm([1.5, 1.6, 1.7])}}
    spec = {"table": [("metric", "m")], "reference": lambda s: "c2" if s == "t2" else None}
    diffs = compare.differences(results, spec)
    assert diffs["references"] == {"c2": "base", "t2": "c2"}
    assert diffs["arms"]["t2"]["m"]["mean"] == pytest.approx(0.6)
    assert diffs["arms"]["c2"]["m"]["mean"] == pytest.approx(1.0)
    table = summary.markdown_table(
        {**results, "differences": diffs}, {**spec, "title": "t", "question": "q"}
    )
    assert "| t2 | c2 | +0.600 [" in table
    with pytest.raises(ValueError, match="reference arm 'gone'"):
        compare.differences(results, {**spec, "reference": lambda _: "gone"})


def test_series_differences_pool_every_point_and_seed():
    # Per size, three seeds cannot separate the series (a spread of 0.1 around +0.05); the
    # nine pairs together can. The hand values: mean of the nine differences and a paired t
    # interval with 8 degrees of freedom.
    def arm(values, cases=None):
        m = {"values": values, "mean": np.mean(values), "sd": np.std(values, ddof=1), "n": 3}
        return {"seeds": [0, 1, 2], "metrics": {"m": {**m, **({"cases": cases} if cases else {})}}}

    deltas = {"s": [0.0, 0.05, 0.1], "l": [0.02, 0.07, 0.12], "xl": [-0.01, 0.04, 0.09]}
    results = {"arms": {}}
    for point, d in deltas.items():
        results["arms"][f"control @ {point}"] = arm([0.5, 0.6, 0.7], [100] * 3)
        results["arms"][f"treated @ {point}"] = arm([0.5 + d[0], 0.6 + d[1], 0.7 + d[2]], [100] * 3)
    spec = {
        "table": [("metric", "m")],
        "reference": lambda s: "control @ " + s.split(" @ ")[1] if s.startswith("t") else None,
    }
    per_size = compare.differences(results, spec)["arms"]["treated @ s"]["m"]
    assert per_size["low"] < 0 < per_size["high"]
    got = compare.series_differences(results, spec)
    assert list(got) == ["treated"] and got["treated"]["reference"] == "control"
    assert got["treated"]["points"] == ["s", "l", "xl"]
    d = got["treated"]["metrics"]["m"]
    diffs = np.asarray([x for v in deltas.values() for x in v])
    half = 2.306004135204166 * diffs.std(ddof=1) / 3  # t(0.975, 8) * s / sqrt(9)
    assert d["n"] == 9 and d["method"] == "paired t"
    assert d["mean"] == pytest.approx(diffs.mean())
    assert (d["low"], d["high"]) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    assert d["low"] > 0
    # The cases pool over all nine runs: 100 each, the shares' sums times 100.
    assert d["pooled"]["n_a"] == d["pooled"]["n_b"] == 900
    assert d["pooled"]["k_b"] == 3 * (50 + 60 + 70)
    assert d["pooled"]["k_a"] == round(100 * (3 * 1.8 + diffs.sum()))
    table = summary.markdown_table(
        {**results, "differences": compare.differences(results, spec), "series_differences": got},
        {**spec, "title": "t", "question": "q"},
    )
    assert "| treated | control | s, l, xl | +0.053 [" in table
    # No series pairs without " @ " labels or with a reference at another point.
    assert compare.series_differences({"arms": {"a": arm([1.0] * 3)}}, spec) == {}
    other = {**spec, "reference": lambda s: "control @ s" if s.startswith("t") else None}
    assert set(compare.series_differences(results, other)["treated"]["points"]) == {"s"}


def test_a_share_of_a_few_cases_needs_its_pooled_cases_to_differ():
    # One recovered case in 251 at each of three seeds against none: the paired differences
    # are equal, so the t interval has zero width and excludes 0, but three cases in 753
    # against none is what chance gives (Fisher's two-sided p, from the hypergeometric law:
    # P(3 of the 3 successes in the first arm) + P(0 of them), each C(753, 3) / C(1506, 3)).
    def arm(rates, cases):
        m = {"values": rates, "mean": np.mean(rates), "sd": np.std(rates, ddof=1), "n": 3}
        return {"seeds": [0, 1, 2], "metrics": {"r": {**m, "cases": cases}}}

    spec = {"table": [("recovery", "r")], "title": "t", "question": "q"}
    few = {"arms": {"ref": arm([0.0] * 3, [251] * 3), "x": arm([1 / 251] * 3, [251] * 3)}}
    d = compare.differences(few, spec)["arms"]["x"]["r"]
    assert d["low"] > 0 and d["method"] == "paired t"
    want = 2 * math.comb(753, 3) / math.comb(1506, 3)
    assert d["pooled"] == {
        "k_a": 3,
        "n_a": 753,
        "k_b": 0,
        "n_b": 753,
        "p_fisher": pytest.approx(want),
    }
    assert not compare.detectable(d)
    cell = compare.fmt_diff(d)
    assert "pooled cases 3/753 vs 0/753, Fisher p = 0.25: no detectable difference" in cell
    # Thirty cases at every seed against none: both the interval and the cases say so.
    many = {"arms": {"ref": arm([0.0] * 3, [251] * 3), "x": arm([0.10, 0.12, 0.14], [251] * 3)}}
    d = compare.differences(many, spec)["arms"]["x"]["r"]
    assert d["pooled"]["k_a"] == round(0.10 * 251) + round(0.12 * 251) + round(0.14 * 251)
    assert d["pooled"]["p_fisher"] < 1e-9
    assert compare.detectable(d) and "no detectable" not in compare.fmt_diff(d)
    # Without counted cases the interval alone decides.
    plain = {k: v for k, v in d.items() if k != "pooled"}
    assert compare.detectable(plain)
    assert compare.pooled_cases({0: (0.1, 0)}, {0: (0.0, 251)}) is None  # no cases counted


def test_changes_within_an_arm_are_paired_over_its_seeds():
    from scipy import stats

    def arm(first, last):
        return {
            "seeds": [0, 1, 2],
            "metrics": {
                "d.first": {"values": first, "cases": [200] * 3},
                "d.last": {"values": last, "cases": [200] * 3},
            },
        }

    first, last = [0.10, 0.12, 0.08], [0.02, 0.03, 0.04]
    spec = {"table": [("D first", "d.first"), ("D last", "d.last")]}
    spec["changes"] = [("D, last minus first", "d.first", "d.last")]
    got = compare.changes({"arms": {"a": arm(first, last)}}, spec)["D, last minus first"]["a"]
    want = stats.ttest_rel(last, first).confidence_interval(0.95)
    assert got["mean"] == pytest.approx(np.mean(last) - np.mean(first))
    assert (got["low"], got["high"]) == pytest.approx((want.low, want.high))
    assert got["pooled"]["k_a"] == 4 + 6 + 8 and got["pooled"]["k_b"] == 20 + 24 + 16
    with pytest.raises(ValueError, match="not in the table"):
        compare.changes({"arms": {}}, {**spec, "changes": [("x", "d.first", "d.gone")]})


def build_tiny_model(directory):
    """A 1-layer random model and a sentencepiece tokenizer trained on a small arithmetic corpus
    in `directory`: (tokenizer, model config, mesh, graphdef, params)."""
    corpus = arithmetic.pretraining_corpus(0, 300, frac_worked=0.5)
    tok = train_sentencepiece(
        corpus,
        directory / "t.model",
        vocab_size=96,
        user_defined_symbols=templates.SPECIAL_TOKENS,
    )
    cfg = model_preset(
        "tiny",
        vocab_size=tok.vocab_size,
        num_layers=1,
        embed_dim=32,
        num_heads=2,
        num_kv_heads=2,
        head_dim=16,
        mlp_dim=64,
        max_seq_len=256,
    )
    mesh = sharding.make_mesh(sharding.MeshConfig())
    graphdef, params = sharding.create_model(cfg, mesh, seed=3)
    return tok, cfg, mesh, graphdef, params


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tok"))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, ids_BT):
    from flax import nnx

    return nnx.merge(graphdef, params)(ids_BT)


def _naive_answer_nll(graphdef, params, tok, text):
    ids = tok.encode(text, add_bos=True)
    # One text per call, right-padded to one width (causal: the padding after t is invisible at
    # t), so that a single compiled forward serves every text.
    width = 256
    assert len(ids) <= width
    padded = np.zeros((1, width), np.int32)
    padded[0, : len(ids)] = ids
    logits = np.asarray(_forward(graphdef, params, padded)[0, : len(ids)], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    start = len(ids) - 1 - ids[::-1].index(tok.piece_to_id(templates.ANSWER_OPEN)) + 1
    end = ids.index(tok.piece_to_id(templates.ANSWER_CLOSE), start)
    return -sum(logp[t - 1, ids[t]] for t in range(start, end)), end - start


def test_bridge_nll_matches_a_per_text_forward(tiny_model):
    tok, _, _, graphdef, params = tiny_model
    problems = arithmetic.ArithmeticTask().eval_set(0, 5)
    own = [arithmetic.target_completion(problems[0]), BARE, RIGHT, "garbage", ""]
    texts = [
        bridge.bridge_texts(p, o)[c]
        for p, o in zip(problems, own, strict=True)
        for c in bridge.CONTEXTS
    ]
    nll, count = bridge.answer_nll(graphdef, params, tok, texts, batch_size=4, width_multiple=32)
    for i, text in enumerate(texts):
        ref_nll, ref_count = _naive_answer_nll(graphdef, params, tok, text)
        assert count[i] == ref_count == len(problems[i // 3]["answer"])
        assert nll[i] == pytest.approx(ref_nll, rel=1e-4, abs=1e-4)
    per = bridge.bridge_texts(problems[0], BARE)
    assert per["own"] == per["none"]
    assert arithmetic.worked_solution(problems[0]) in per["gold"]
    m = bridge.measure(graphdef, params, tok, problems, own, max_value=99)
    assert m["frac_own_nonempty"] == pytest.approx(3 / 5)  # BARE and "" have no reasoning
    by_text = nll.reshape(5, 3)
    assert m["ppl_none"] == pytest.approx(math.exp(by_text[:, 0].sum() / count[::3].sum()), 1e-5)
    # Only the first own completion has this problem's right steps.
    assert m["frac_own_right"] == pytest.approx(1 / 5)
    assert m["ppl_own_right"] == pytest.approx(math.exp(by_text[0, 1] / count[1]), 1e-5)
    wrong = [2, 3]  # non-empty and not right
    assert m["ppl_own_wrong"] == pytest.approx(
        math.exp(by_text[wrong, 1].sum() / count[1::3][wrong].sum()), 1e-5
    )


def test_base_cache_round_trip_and_key(tiny_model, tmp_path):
    tok, cfg, mesh, graphdef, params = tiny_model
    base_cache.save_params(params, tmp_path / "p.npz")
    _, fresh = sharding.create_model(cfg, mesh, seed=4)  # other values, same structure
    loaded = base_cache.load_params(fresh, tmp_path / "p.npz", mesh)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    config = _experiment("supervision").base_config()
    key = base_cache.stage1_key(config)
    rl_only = sweep.apply_overrides(
        config, {"config.grpo.loss.kl_coef": 0.1, "config.reward.mode": "both"}
    )
    assert base_cache.stage1_key(rl_only) == key  # RL settings share the base model
    for change in (
        {"config.pretrain.steps": 10},
        {"config.seed": 5},
        {"config.data.frac_worked": 0.1},
    ):
        assert base_cache.stage1_key(sweep.apply_overrides(config, change)) != key, change


def test_cold_start_texts_vary_with_the_seed_and_the_matched_arm_reads_the_corpus():
    from experiments.configs import research as research_config
    from rl_reason.pipelines import r1_zero
    from rl_reason.pipelines.research import pipeline

    def texts(**cold):
        config = research_config.get_config("smoke")
        with config.unlocked():
            config.cold_start.update(examples=6, **cold)
        return pipeline.build_data(config)["sft_texts"]

    seed0, seed1 = texts(), texts(seed=1)
    assert len(seed0) == len(seed1) == 6 and not set(seed0) & set(seed1)
    assert all("Step 1:" in t for t in seed0)  # worked solutions in the RL template
    # Seed 0's set is the one drawn before the set varied with the seed.
    config = research_config.get_config("smoke")
    built = r1_zero.build_data(config, with_corpus=True)
    task = built["task"]
    held = {task.key(p) for p in built["eval_set"] + built["rl_pool"]}
    assert seed0 == pipeline.sft_texts(task.eval_set(config.seed + 2, 6, exclude_keys=held))
    matched = texts(source="corpus")
    assert len(matched) == 6 and set(matched) <= set(built["corpus"])
    with pytest.raises(ValueError, match="cold_start.source"):
        pipeline.ColdStartConfig(source="web")


def test_differences_have_paired_and_welch_intervals():
    from scipy import stats

    a = {0: 0.71, 1: 0.64, 2: 0.69}
    b = {0: 0.60, 1: 0.55, 2: 0.58}
    paired = compare.difference(a, b)
    want = stats.ttest_rel(list(a.values()), list(b.values())).confidence_interval(0.95)
    assert paired["method"] == "paired t" and paired["n"] == 3
    assert (paired["low"], paired["high"]) == pytest.approx((want.low, want.high))
    assert paired["mean"] == pytest.approx(np.mean([0.11, 0.09, 0.11]))
    # Other seeds: Welch's interval.
    c = {3: 0.5, 4: 0.58, 5: 0.52, 6: 0.49}
    welch = compare.difference(a, c)
    want = stats.ttest_ind(list(a.values()), list(c.values()), equal_var=False)
    lo, hi = want.confidence_interval(0.95)
    assert welch["method"] == "Welch t" and (welch["low"], welch["high"]) == pytest.approx((lo, hi))
    one = compare.difference({0: 0.5}, b)
    assert math.isnan(one["low"]) and one["method"] == "none"
    # One seed that the other arm shares: the difference on that base model (0.5 - 0.60),
    # not against the other arm's mean over its three bases (0.5 - 0.577).
    assert one["mean"] == pytest.approx(-0.10) and one["n"] == 1
    apart = compare.difference({9: 0.5}, b)  # no shared seed: the means are all there is
    assert apart["mean"] == pytest.approx(0.5 - np.mean(list(b.values())))
    # The pooled cases of a one-seed arm are set against the same base model's cases only.
    pooled = compare.pooled_cases({0: (0.5, 10)}, {0: (0.2, 10), 1: (0.3, 10), 2: (0.1, 10)})
    assert (pooled["k_a"], pooled["n_a"], pooled["k_b"], pooled["n_b"]) == (5, 10, 2, 10)
    # An interval that holds 0 reads as no detectable difference.
    assert "no detectable difference" in compare.fmt_diff(
        compare.difference(a, {0: 0.7, 1: 0.6, 2: 0.72})
    )
    assert "no detectable difference" not in compare.fmt_diff(paired)


def test_against_chance_pools_cases_and_matches_a_hand_binomial_test():
    from rl_reason.pipelines.research import chance, summary

    def run(rate, frac_deviated, answer_chance, eval_size=256):
        after = {"correct_given_deviated": rate, "frac_deviated": frac_deviated}
        s = {"after": after, "answer_chance": answer_chance, "eval_size": eval_size}
        return {"summary": s, "rows": []}

    spec = {
        "chance": [("c|w", "after.correct_given_deviated", "after.frac_deviated", "answer_chance")]
    }
    found = {
        # 5 of 13 and 1 of 5 wrong-step problems correct; a seed without any is left out.
        "a": [run(5 / 13, 13 / 256, 0.061), run(1 / 5, 5 / 256, 0.059), run(None, 0.0, 0.5)],
        "b": [run(None, 0.0, 0.06)],
    }
    out = chance.against_chance(found, spec, summary.metric_value)["c|w"]
    assert out["b"] is None
    a = out["a"]
    assert (a["k"], a["n"], a["seeds"]) == (6, 18, 2)
    assert a["chance"] == pytest.approx(0.06)
    # Two-sided exact test: the probability of every count no likelier than the one seen.
    pmf = [math.comb(18, i) * 0.06**i * 0.94 ** (18 - i) for i in range(19)]
    hand = sum(q for q in pmf if q <= pmf[6] * (1 + 1e-7))
    assert a["p_binom"] == pytest.approx(hand, rel=1e-6)
    assert a["differs"] and hand < 1e-3
    # At the chance level itself the test does not reject.
    level = chance.pooled_against([(0.0625, 16.0, 0.06)])
    assert (level["k"], level["n"]) == (1, 16) and not level["differs"]
    assert "no detectable difference from chance" in chance.fmt(level)
