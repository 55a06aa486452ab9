"""The default experiment end to end in smoke mode: the loop's invariants and its outputs."""

import json
import math

import pytest

from experiments.configs import r1_zero_tiny
from rl_reason import r1_zero
from rl_reason.metrics import read_jsonl


@pytest.mark.slow
def test_r1_zero_tiny_smoke(tmp_path):
    config = r1_zero_tiny.get_config("smoke")
    with config.unlocked():
        config.workdir = str(tmp_path)
    summary = r1_zero.run(config)

    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["rl_steps"] == config.grpo.steps
    for stage in ("before", "after"):
        assert set(written[stage]) == {"accuracy", "mean_response_tokens", "frac_with_steps"}
        assert 0.0 <= written[stage]["accuracy"] <= 1.0
    assert written["wall_seconds"] > 0

    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, config.grpo.steps + 1))
    for row in rows:
        for key in (
            "reward_mean",
            "accuracy",
            "zero_std_groups",
            "response_length_mean",
            "truncated_frac",
            "clip_frac_low",
            "clip_frac_high",
            "kl_ref",
            "entropy",
            "grad_norm",
            "learning_rate",
            "time_sample_verify",
            "time_train",
            "generated_tokens_per_s",
            "loss",
        ):
            assert key in row, key
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
    # The overlong penalty gives the smoke run reward variance: the policy really moved.
    assert any(r["grad_norm"] > 0 for r in rows)
    assert summary["rl_param_change_l2"] > 0
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert list((tmp_path / "tb").iterdir())
    assert (tmp_path / "tokenizer.model").exists()
    assert (tmp_path / "checkpoints").exists()
