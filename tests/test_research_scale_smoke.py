"""The scale and self-correction experiments' smoke variants: model sizes as arms, the retry
corpus, the error-injection measure, shared 0% runs and the plot against parameters."""

import json

import pytest

from rl_reason.pipelines.research import base_cache, pipeline, runs, summary, sweep

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
    # One run, the retry arm: its 0% twin is the scale run, checked above by its directory.
    point = retry_points["retries (10%) @ tiny"]
    result = pipeline.run(point.config)
    written = json.loads((point.workdir / runs.SUMMARY_FILE).read_text())
    for stage in ("injection_before", "injection_after"):
        inj = written[stage]
        rates = [inj[f"injection_{k}_rate"] for k in ("follow", "recovery", "other")]
        assert sum(rates) == pytest.approx(1.0) and inj["injection_cases"] > 0
        assert 0.0 <= inj["injection_retry_rate"] <= 1.0
    assert written["stage1"]["num_params"] > 0 and "pretrain_plateau_drop" in written["stage1"]
    assert result["settings"]["data"]["frac_retry"] == 0.1
    # The retry corpus is another base model than the 0% arm's.
    plain = retry_points["no retries (0%) @ tiny"].config
    assert base_cache.stage1_key(plain) != result["stage1"]["key"]
    assert base_cache.stage1_key(point.config) == result["stage1"]["key"]
    results = summary.summarize(retry, tmp_path / "summary", seeds=[0])
    assert (tmp_path / "summary" / "against.png").stat().st_size > 1000
    finished = {label for label, arm in results["arms"].items() if arm["seeds"]}
    assert finished == {"retries (10%) @ tiny"}
    # The injection rates carry their counted cases, for the pooled test of differences.
    recovery = results["arms"]["retries (10%) @ tiny"]["metrics"][
        "injection_after.injection_recovery_rate"
    ]
    assert recovery["cases"] == [written["injection_after"]["injection_cases"]]
