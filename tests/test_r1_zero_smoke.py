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


@pytest.mark.slow
def test_r1_zero_tiny_smoke_with_every_loop_option(tmp_path):
    """DAPO dynamic sampling, truncation masking, KL to the reference, recomputed old log-probs,
    a format reward, mu = 2 passes, 2 minibatches x 2 microbatches: the loop still holds."""
    config = r1_zero_tiny.get_config("smoke")
    with config.unlocked():
        config.workdir = str(tmp_path)
        config.grpo.update(
            dynamic_sampling=True,
            max_sampling_rounds=3,
            mask_truncated=True,
            kl_coef=0.05,
            recompute_old_logprobs=True,
            format_reward=0.1,
            inner_iterations=2,
            minibatches=2,
            microbatches=2,
            advantage_estimator="rloo",
            aggregation="seq-mean-token-sum-norm",
            checkpoint_every=0,
        )
    summary = r1_zero.run(config)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(rows) == config.grpo.steps
    for row in rows:
        assert 1 <= row["sampling_rounds"] <= 3
        assert math.isfinite(row["loss"]) and math.isfinite(row["kl_ref"])
        assert row["nonfinite_updates"] == 0
    # Four updates per step (2 passes x 2 minibatches) move the policy away from the frozen
    # reference, so its KL grows from 0.
    assert rows[-1]["kl_ref"] > 0
    assert summary["rl_param_change_l2"] > 0
