"""The default experiment end to end in smoke mode: the loop's invariants and its outputs, and
stage 1 run inline (`base=scratch`) against the same stage saved by experiments.pretrain_base
and loaded back as a Hugging Face directory."""

import json
import math

import pytest

from experiments.configs import pretrain_base, r1_zero_tiny
from rl_reason.infra.metrics import read_jsonl
from rl_reason.pipelines import base_model, r1_zero

TIMING = ("time_", "generated_tokens_per_s")
SUMMARY_ROW = {
    "accuracy",
    "mean_response_tokens",
    "frac_with_steps",
    "frac_process_correct",
    "accuracy_by_ops",
}


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory):
    """The smoke config as it is: stage 1 from scratch, then GRPO."""
    workdir = tmp_path_factory.mktemp("scratch")
    config = r1_zero_tiny.get_config("smoke")
    with config.unlocked():
        config.workdir = str(workdir)
    return config, workdir, r1_zero.run(config)


def _metrics(workdir) -> list[dict]:
    rows = read_jsonl(workdir / "metrics.jsonl")
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


@pytest.mark.slow
def test_r1_zero_tiny_smoke(scratch_run):
    config, tmp_path, summary = scratch_run
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["rl_steps"] == config.grpo.steps
    assert written["base"] == "scratch" and written["pretrain_steps"] == config.pretrain.steps
    for stage in ("before", "after"):
        row = written[stage]
        assert set(row) == SUMMARY_ROW
        assert 0.0 <= row["accuracy"] <= 1.0
        by_ops = row["accuracy_by_ops"]
        assert list(by_ops) == [str(k) for k in range(config.task.min_ops, config.task.max_ops + 1)]
        # The per-op accuracies are the overall one, split: weighted by each op count's share.
        full = written[f"{stage}_full"]
        total = sum(by_ops[k] * full[f"frac_ops{k}"] for k in by_ops)
        assert total == pytest.approx(row["accuracy"])
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
def test_pretrain_base_then_loading_it_is_the_scratch_run(scratch_run, tmp_path, monkeypatch):
    """experiments.pretrain_base's smoke variant writes a Hugging Face directory; a run that
    loads it with from_pretrained / load_tokenizer is the scratch run, step for step. With
    wandb on (offline: nothing leaves the machine) it also writes a wandb run directory."""
    config, scratch_dir, scratch = scratch_run
    pre = pretrain_base.get_config("smoke")
    with pre.unlocked():
        pre.out_dir = str(tmp_path / "base")
    info = base_model.run(pre)
    assert info["eval"]["num_examples"] == config.data.eval_size
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == [
        "README.md",
        "base_info.json",
        "config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    # The tokenizer pretrain_base ships is the one the scratch run trained.
    assert (tmp_path / "base" / "tokenizer.model").read_bytes() == (
        scratch_dir / "tokenizer.model"
    ).read_bytes()

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    loaded = r1_zero_tiny.get_config("smoke")
    with loaded.unlocked():
        loaded.workdir = str(tmp_path / "run")
        loaded.base = str(tmp_path / "base")
        loaded.metrics.wandb = True
    summary = r1_zero.run(loaded)
    assert summary["base"] == str(tmp_path / "base") and "pretrain_steps" not in summary
    assert summary["base_eval"]["accuracy"] == scratch["before"]["accuracy"]
    assert summary["before_full"] == scratch["before_full"]
    assert summary["after_full"] == scratch["after_full"]
    assert _metrics(tmp_path / "run") == _metrics(scratch_dir)
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.slow
def test_r1_zero_tiny_smoke_with_every_loop_option(tmp_path):
    """DAPO dynamic sampling, truncation masking, KL to the reference, recomputed old log-probs,
    a format reward, mu = 2 passes, 2 minibatches x 2 microbatches: the loop still holds."""
    config = r1_zero_tiny.get_config("smoke")
    with config.unlocked():
        config.workdir = str(tmp_path)
        config.grpo.update(
            checkpoint_every=0,
            sampling=dict(
                dynamic_sampling=True,
                max_sampling_rounds=3,
            ),
            loss=dict(
                mask_truncated=True,
                kl_coef=0.05,
                recompute_old_logprobs=True,
                advantage_estimator="rloo",
                aggregation="seq-mean-token-sum-norm",
            ),
            optim=dict(
                inner_iterations=2,
                minibatches=2,
                microbatches=2,
            ),
            reward=dict(format_reward=0.1),
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


# Metrics that depend only on the sampled tokens and the verifiers: equal when the engine draws
# the static sampler's tokens. The update's statistics see the sampler's log-probs, which the
# two compute with differently batched matmuls (float32 rounding).
_FROM_TOKENS = ("reward", "accuracy", "zero_std", "response_length", "truncated", "rollout_")


@pytest.mark.slow
def test_the_engine_runs_the_static_samplers_experiment(scratch_run, tmp_path):
    static_config, static_dir, static_summary = scratch_run
    config = r1_zero_tiny.get_config("smoke")
    with config.unlocked():
        config.workdir = str(tmp_path)
        # 16 samples on 8 slots: refilled once over, then the tail packed into 4; finished
        # samples go to the verifiers every 4 decode steps while the others decode.
        config.grpo.sampling.update(
            engine="continuous", engine_slots=8, engine_min_slots=4, engine_stream_steps=4
        )
    summary = r1_zero.run(config)
    static, engine = _metrics(static_dir), _metrics(tmp_path)
    assert len(engine) == len(static) == config.grpo.steps
    for a, b in zip(static, engine, strict=True):
        assert 0.0 < b.pop("slot_occupancy") <= 1.0
        assert 0.0 < b.pop("verify_streamed_frac") < 1.0  # some verified while others decoded
        assert set(a) == set(b)
        for name, value in a.items():
            if name.startswith(_FROM_TOKENS) or name in ("step", "sampling_rounds"):
                assert b[name] == value, name
            else:
                assert b[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    for stage in ("before", "after"):
        assert summary[stage] == static_summary[stage]
