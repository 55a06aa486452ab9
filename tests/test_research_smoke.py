"""Every research experiment's smoke variant end to end: the arms, the shared base model, the
measures, the sweep runner as separate processes, and the summaries."""

import json
import math
import subprocess
import sys
import textwrap

import pytest

from rl_reason.infra.metrics import read_jsonl
from rl_reason.pipelines.research import held_out, pipeline, runs, summary, sweep

EXPERIMENTS = ["supervision", "fidelity", "bridge", "cold_start", "algorithms"]
# One arm per experiment that exercises what is new in it (the baseline covers fidelity/bridge).
ARMS = [
    ("supervision", "outcome"),
    ("supervision", "both"),
    ("cold_start", "cold start (R1)"),
    ("algorithms", "DAPO"),  # (its other arms are loss options, tests/test_losses.py's)
]
# What each experiment finds done after ARMS ran: the baseline and the cold start are shared.
FINISHED = {
    "supervision": {"outcome", "both"},
    "fidelity": {"outcome", "both"},
    "bridge": {"outcome", "both", "cold start + outcome"},
    "cold_start": {"zero (R1-Zero)", "cold start (R1)"},
    "algorithms": {"GRPO", "DAPO"},
}


def _json(x) -> str:
    return json.dumps(x, sort_keys=True)


def _experiment(name, runs_root):
    return sweep.load_experiment(f"experiments/configs/research_{name}.py", "smoke", runs_root)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("research")
    done = {}
    for name, label in ARMS:
        (point,) = [p for p in _experiment(name, str(root)).points([0]) if p.label == label]
        done[label] = (point, pipeline.run(point.config))
    return root, done


@pytest.mark.slow
def test_smoke_arms_measure_everything_and_share_the_base(smoke_runs):
    root, done = smoke_runs
    for label, (point, _) in done.items():
        written = json.loads((point.workdir / runs.SUMMARY_FILE).read_text())
        assert written["rl_steps"] == point.config.grpo.steps == 2, label
        for stage in ("before", "after"):
            ev = written[stage]
            for key in ("accuracy", "frac_process_correct", "frac_well_formed", "step_score"):
                assert 0.0 <= ev[key] <= 1.0, (label, stage, key)
            assert ev["frac_correct"] == pytest.approx(ev["accuracy"])  # two paths, one verdict
            assert ev["length_mean"] == pytest.approx(ev["mean_response_tokens"], abs=1.0)
            for key in ("truncated_frac", "frac_has_answer", "frac_wrote_steps", "answer_chance"):
                assert 0.0 <= ev[key] <= 1.0, (label, stage, key)
            assert "deviation_rate" in ev and "correct_given_deviated" in ev
            by_ops = ev["accuracy_by_ops"]
            assert sum(by_ops[k] * ev[f"frac_ops{k}"] for k in by_ops) == pytest.approx(
                ev["accuracy"]
            )
            # The completions behind the figures, one line per held-out problem.
            lines = held_out.read_jsonl(point.workdir / written["held_out_completions"][stage])
            assert len(lines) == written["eval_size"]
            assert sum(r["correct"] for r in lines) / len(lines) == pytest.approx(ev["accuracy"])
            # A completion that closed its answer stopped there: it cannot have run out.
            unclosed = sum(not r["completion"].endswith("</answer>") for r in lines) / len(lines)
            assert ev["truncated_frac"] <= unclosed + 1e-9
        assert written["held_out_completions"]["after"] == "held_out/step000002.jsonl"
        for stage in ("bridge_before", "bridge_after"):
            bridge = written[stage]
            assert all(bridge[f"ppl_{c}"] > 1.0 for c in ("none", "own", "gold"))
            assert all(bridge[f"nll_median_{c}"] > 0.0 for c in ("none", "own", "gold"))
            causal = [bridge[f"causal_{k}_rate"] for k in ("follow", "recovery", "other")]
            assert sum(causal) == pytest.approx(1.0), (label, stage)
            assert 0.0 <= bridge["prefix1_accuracy"] <= 1.0
        rows = read_jsonl(point.workdir / "metrics.jsonl")
        assert len(rows) == 2
        for row in rows:
            assert row["rollout_frac_correct"] == pytest.approx(row["accuracy"]), label
            for key in (
                "rollout_wrong_step_given_correct",
                "rollout_frac_well_formed",
                "rollout_deviation_rate",
                "rollout_frac_has_answer",
                "rollout_frac_correct_wrote_steps",
            ):
                assert key in row
        assert (point.workdir / "curves.png").stat().st_size > 1000

    outcome, both = done["outcome"][1], done["both"][1]
    cold = done["cold start (R1)"][1]
    assert outcome["stage1"]["cache_hit"] is False
    assert all(done[label][1]["stage1"]["cache_hit"] for label in done if label != "outcome")
    # The cached base model is the same model: equal evaluations before RL (no cold start).
    for stage in ("before", "bridge_before"):  # (as JSON: NaN ratios compare equal)
        assert _json(both[stage]) == _json(outcome[stage]), stage
    assert both["settings"]["reward"]["mode"] == "both"
    # The cold start fine-tunes that base before RL.
    assert cold["cold_start"]["steps"] == 2
    assert cold["bridge_before"]["nll_gold"] != outcome["bridge_before"]["nll_gold"]
    dapo_rows = read_jsonl(done["DAPO"][0].workdir / "metrics.jsonl")
    assert all(1 <= r["sampling_rounds"] <= 4 for r in dapo_rows)


@pytest.mark.slow
def test_smoke_summaries_of_every_experiment(smoke_runs, tmp_path):
    root, done = smoke_runs
    for name in EXPERIMENTS:
        exp = _experiment(name, str(root))
        results = summary.summarize(exp, tmp_path / name, seeds=[0])
        table = (tmp_path / name / "results.md").read_text()
        assert exp.summary_spec["title"] in table
        assert (tmp_path / name / "bars.png").exists()
        finished = {label for label, arm in results["arms"].items() if arm["seeds"]}
        assert finished == FINISHED[name], name  # the runs shared across experiments
    acc = results["arms"]["DAPO"]["metrics"]["after.accuracy"]
    assert acc["values"] == [done["DAPO"][1]["after"]["accuracy"]] and acc["n"] == 1
    assert math.isnan(results["arms"]["RLOO"]["metrics"]["after.accuracy"]["mean"])


@pytest.mark.slow
def test_sweep_command_runs_an_arm_as_its_own_process(smoke_runs, tmp_path):
    root, _ = smoke_runs
    config = tmp_path / "research_one.py"
    config.write_text(
        textwrap.dedent(
            """
            from experiments.configs import research

            get_config = research.get_config

            def get_hyper(hyper):
                return hyper.product(
                    [hyper.seeds([0]), hyper.arm("process", {"config.reward.mode": "process"})]
                )

            SUMMARY = {"title": "one arm", "question": "?", "curves": [],
                       "table": [("accuracy", "after.accuracy")]}
            """
        )
    )
    cmd = [
        sys.executable,
        "-m",
        "experiments.research",
        f"--config={config}:smoke",
        f"--runs_root={root}",
        f"--results_root={tmp_path / 'results'}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (point,) = sweep.load_experiment(config, "smoke", str(root)).points()
    written = json.loads((point.workdir / runs.SUMMARY_FILE).read_text())
    assert written["settings"]["reward"]["mode"] == "process"
    assert written["stage1"]["cache_hit"] is True  # the base model of the in-process runs
    assert (
        "| process | " in (tmp_path / "results" / "research_one_smoke" / "results.md").read_text()
    )
    # Run again: the point is done, nothing runs.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and ": done" in again.stdout
