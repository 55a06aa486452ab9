"""What a GRPO step reports: rewards, lengths, the update's statistics, timings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rl_reason.core.config import GRPOConfig
from rl_reason.core.record import Rollout


def step_metrics(
    cfg: GRPOConfig,
    parts: Sequence[Rollout],
    host: Mapping[str, Any],
    train: Mapping[str, float],
    counters: Mapping[str, float],
    times: Mapping[str, float],
    round_stats: Sequence[Mapping[str, float]],
) -> dict[str, float]:
    """The step's metrics: `host` holds the batch's [B] rewards, correct, lengths, truncated
    (and the sampler-trainer gaps when rescored), `train` the updates' means, `counters` the
    learning rate, skipped updates and sampling rounds, `times` the perf_counter readings
    t0 / sampled / trained."""
    rewards = host["rewards"].reshape(-1, cfg.group_size)
    verify = sum(r.verify_seconds for r in parts)
    verify_wait = sum(r.verify_wait_seconds for r in parts)
    generated = sum(int(r.lengths.sum()) for r in parts)
    sample_time = times["sampled"] - times["t0"]
    metrics = {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "accuracy": float(host["correct"].mean()),
        "zero_std_groups": float(np.mean(rewards.max(1) == rewards.min(1))),
        "response_length_mean": float(host["lengths"].mean()),
        "response_length_min": float(host["lengths"].min()),
        "response_length_max": float(host["lengths"].max()),
        "truncated_frac": float(host["truncated"].mean()),
        "clip_frac_low": train["clip_frac_low"],
        "clip_frac_high": train["clip_frac_high"],
        "ratio_mean": train["ratio_mean"],
        "kl_ref": train["kl_ref"],
        "kl_old": train["approx_kl_old"],
        "entropy": train["entropy"],
        "loss": train["loss"],
        "grad_norm": train["grad_norm"],
        "learning_rate": counters["learning_rate"],
        "nonfinite_updates": counters["nonfinite_updates"],
        "sampling_rounds": counters["sampling_rounds"],
        **{k: v for k, v in counters.items() if k == "verifier_workers_replaced"},
        "time_sample_verify": sample_time,
        "time_verify": verify,
        "time_verify_hidden": max(verify - verify_wait, 0.0),
        "time_train": times["trained"] - times["sampled"],
        "time_step": times["trained"] - times["t0"],
        "generated_tokens_per_s": generated / max(sample_time, 1e-9),
    }
    counts = [r.engine_counts for r in parts if r.engine_counts is not None]
    if counts:
        # Mean fraction of the engine's decoded slots that held a live sample.
        slots = sum(int(c[0]) for c in counts)
        metrics["slot_occupancy"] = sum(int(c[1]) for c in counts) / max(slots, 1)
    streamed = [r.streamed_frac for r in parts if r.streamed_frac is not None]
    if streamed:
        metrics["verify_streamed_frac"] = float(np.mean(streamed))
    for r in parts:
        metrics.update(r.partial_stats or {})
    turn_stats = [r.turn_stats for r in parts if r.turn_stats is not None]
    # Multi-turn: tool calls, turns, model vs observation tokens, and the reasons (a reason a
    # round did not see counts 0 in it).
    for name in sorted({n for st in turn_stats for n in st}):
        metrics[f"mt_{name}"] = float(np.mean([st.get(name, 0.0) for st in turn_stats]))
    scored = [r for r in parts if r.step_mask is not None]
    if scored:
        # Process supervision per step: the scored steps per sample and their mean reward.
        n_steps = sum(float(r.step_mask.sum()) for r in scored)
        metrics["process_steps_mean"] = n_steps / sum(r.step_mask.shape[0] for r in scored)
        total = sum(float(r.step_rewards.sum()) for r in scored)
        metrics["process_step_reward_mean"] = total / n_steps if n_steps else float("nan")
    if cfg.loss.correction != "none":
        metrics["mismatch_token_frac"] = train["mismatch_token_frac"]
        metrics["mismatch_seq_frac"] = train["mismatch_seq_frac"]
    # PPO's critic: value_loss, value_explained_variance, value_clip_frac, value_grad_norm, ...
    metrics.update({k: v for k, v in train.items() if k.startswith("value_")})
    if "logprob_gap" in host:
        metrics["logprob_gap_sampler_trainer"] = float(
            np.mean([float(g) for g in host["logprob_gap"]])
        )
    for name in round_stats[0] if round_stats else ():
        metrics[f"rollout_{name}"] = float(np.mean([s[name] for s in round_stats]))
    return metrics
