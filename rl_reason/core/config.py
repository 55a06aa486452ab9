"""GRPOConfig: every knob of the GRPO loop, validated; and DAPO's soft overlong penalty."""

from __future__ import annotations

import dataclasses

import numpy as np

from rl_reason import losses
from rl_reason.core import update as train_step


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Every knob of the loop. Defaults follow DeepSeekMath's GRPO where it gives one."""

    steps: int = 100
    prompts_per_step: int = 16  # P
    group_size: int = 8  # G
    max_prompt_len: int = 128  # prompts are left-padded to this (fixed shapes, no recompiles)
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # Optimisation.
    learning_rate: float = 1e-6
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.99
    max_grad_norm: float | None = 1.0
    inner_iterations: int = 1  # mu: passes over each step's samples
    minibatches: int = 1  # optimizer updates per pass
    microbatches: int = 1  # gradient accumulation inside one update
    # Objective (rl_reason.losses).
    advantage_estimator: str = "grpo"  # a name in losses.ADVANTAGE_ESTIMATORS
    policy_objective: str = "ppo_clip"  # a name in losses.POLICY_OBJECTIVES
    aggregation: str = "token-mean"
    ratio_level: str = "token"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    logprob_chunk_size: int | None = None
    recompute_old_logprobs: bool = False
    # 1: sample step k+1's rollouts with the weights before step k's update, while step k
    # trains and step k+1's completions are verified (one-step-off-policy; the ratio is taken
    # against the sampler's log-probs). 0: on-policy.
    off_policy_steps: int = 0
    # DAPO options.
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    overlong_buffer: int = 0  # soft overlong penalty over the last `overlong_buffer` tokens
    overlong_penalty: float = 1.0
    mask_truncated: bool = False
    format_reward: float = 0.0  # weight of the `format` verifier added to the reward
    # Robustness.
    max_nonfinite_steps: int = 3
    # Evaluation and checkpoints.
    eval_every: int = 0  # 0: only before and after training
    eval_samples: int = 4  # k for mean@k / maj@k / pass@k
    eval_temperature: float = 1.0
    checkpoint_every: int = 0
    checkpoint_keep: int = 2
    verifier_workers: int = 2
    verifier_timeout_s: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps >= 0,
            "prompts_per_step": self.prompts_per_step >= 1,
            "group_size": self.group_size >= 2,
            "max_new_tokens": self.max_new_tokens >= 1,
            "inner_iterations": self.inner_iterations >= 1,
            "minibatches": self.minibatches >= 1,
            "microbatches": self.microbatches >= 1,
            "max_sampling_rounds": self.max_sampling_rounds >= 1,
            "overlong_buffer": 0 <= self.overlong_buffer < self.max_new_tokens,
            "eval_samples": self.eval_samples >= 1,
            "off_policy_steps": self.off_policy_steps in (0, 1),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            listed = ", ".join(f"{b}={getattr(self, b)!r}" for b in bad)
            raise ValueError(
                f"GRPOConfig: invalid {listed} (group_size needs >= 2: "
                "advantages are relative to the group)"
            )
        if self.off_policy_steps and self.dynamic_sampling:
            raise ValueError(
                "GRPOConfig: off_policy_steps=1 cannot be combined with dynamic_sampling (a "
                "refill round would have to wait for the update it should overlap)"
            )
        rows = self.prompts_per_step * self.group_size
        if rows % (self.minibatches * self.microbatches):
            raise ValueError(
                f"GRPOConfig: P*G = {rows} rows must split evenly into minibatches "
                f"({self.minibatches}) x microbatches ({self.microbatches})"
            )
        for name, value, valid in (
            ("advantage_estimator", self.advantage_estimator, losses.ADVANTAGE_ESTIMATORS),
            ("policy_objective", self.policy_objective, losses.POLICY_OBJECTIVES),
            ("aggregation", self.aggregation, losses.AGGREGATIONS),
            ("ratio_level", self.ratio_level, losses.RATIO_LEVELS),
            ("kl_estimator", self.kl_estimator, losses.KL_ESTIMATORS),
        ):
            if value not in valid:
                raise ValueError(f"GRPOConfig.{name}={value!r}; valid: {list(valid)}")

    @property
    def rows(self) -> int:
        return self.prompts_per_step * self.group_size

    def loss_config(self) -> train_step.LossConfig:
        return train_step.LossConfig(
            clip_eps_low=self.clip_eps_low,
            clip_eps_high=self.clip_eps_high,
            ratio_level=self.ratio_level,
            aggregation=self.aggregation,
            max_len=self.max_new_tokens,
            kl_coef=self.kl_coef,
            kl_estimator=self.kl_estimator,
            chunk_size=self.logprob_chunk_size,
            objective=self.policy_objective,
        )

    def optim_config(self) -> train_step.OptimConfig:
        updates = self.steps * self.inner_iterations * self.minibatches
        return train_step.OptimConfig(
            learning_rate=self.learning_rate,
            warmup_steps=self.warmup_steps,
            total_steps=max(updates, 1),
            schedule=self.lr_schedule,
            weight_decay=self.weight_decay,
            b1=self.adam_b1,
            b2=self.adam_b2,
            max_grad_norm=self.max_grad_norm,
        )


def overlong_penalty(
    lengths: np.ndarray, max_new_tokens: int, buffer: int, penalty: float
) -> np.ndarray:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to L_max - buffer, then
    linearly down to -penalty at L_max."""
    if buffer <= 0:
        return np.zeros(lengths.shape, np.float32)
    over = np.clip(lengths - (max_new_tokens - buffer), 0, buffer)
    return (-penalty * over / buffer).astype(np.float32)
