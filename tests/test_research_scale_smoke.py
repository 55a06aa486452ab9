"""The scale and self-correction experiments' smoke variants: model sizes as arms, the retry
corpus, the error-injection measure, shared 0% runs and the plot against parameters."""

import json

import pytest

from rl_reason.pipelines.research import pipeline, runs, summary, sweep

pytestmark = pytest.mark.slow


def _experiment(name, root):
    return sweep.load_experiment(f"experiments/configs/research_{name}.py", "smoke", str(root))


def test_scale_and_self_correction_smoke(tmp_path):
    scale, retry = _experiment("scale", tmp_path), _experiment("self_correction", tmp_path)
    scale_points = {p.label: p for p in scale.points([0])}
    retry_points = {p.label: p for p in retry.points([0])}
    assert set(scale_points) == {"outcome @ tiny", "outcome @ small"}
    # The 0% arm of self-correction is the scale run itself: one directory.
    assert retry_points["no retries (0%) @ tiny"].workdir == scale_points["outcome @ tiny"].workdir
    done = {}
    for label in ("no retries (0%) @ tiny", "retries (10%) @ tiny"):
        point = retry_points[label]
        done[label] = pipeline.run(point.config)
        written = json.loads((point.workdir / runs.SUMMARY_FILE).read_text())
        for stage in ("injection_before", "injection_after"):
            inj = written[stage]
            rates = [inj[f"injection_{k}_rate"] for k in ("follow", "recovery", "other")]
            assert sum(rates) == pytest.approx(1.0) and inj["injection_cases"] > 0, label
            assert 0.0 <= inj["injection_retry_rate"] <= 1.0
        assert written["stage1"]["num_params"] > 0 and "pretrain_plateau_drop" in written["stage1"]
    plain, retried = done["no retries (0%) @ tiny"], done["retries (10%) @ tiny"]
    # The retry corpus is another base model.
    assert plain["stage1"]["key"] != retried["stage1"]["key"]
    assert retried["settings"]["data"]["frac_retry"] == 0.1
    for exp in (scale, retry):
        results = summary.summarize(exp, tmp_path / exp.name, seeds=[0])
        assert (tmp_path / exp.name / "against.png").stat().st_size > 1000
        finished = {label for label, arm in results["arms"].items() if arm["seeds"]}
        assert finished == ({"outcome @ tiny"} if exp is scale else set(done))
