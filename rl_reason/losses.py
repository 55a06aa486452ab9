"""GRPO-family losses as pure functions: group advantages, KL estimators, the clipped surrogate.

Axis letters: N sequences in a batch, grouped contiguously in groups of G samples of the same
prompt (P = N / G prompts); T completion positions; V vocabulary; D model width. ``mask_NT`` is 1
on completion tokens and 0 on prompt/padding positions.

One RL step uses this module as::

    adv_N = compute_advantages(rewards_N, group_size, estimator="grpo", valid=valid_N)
    norm = loss_normalizer(mask_NT, aggregation, max_len)        # once, for the whole batch
    for each microbatch b:                                       # or the whole batch at once
        logp = token_logprobs(logits_NTV, tokens_NT, chunk_size=512)
        loss_b, metrics_b = policy_loss(logp, old_logp, adv, mask, ..., normalizer=norm)
    # Σ_b loss_b and Σ_b ∇loss_b equal the whole-batch loss and gradient exactly;
    # merge_metrics(stacked metrics_b) equals the whole-batch metrics.

The code lives in `rl_reason.core` (advantages, objectives, logprobs); this module is its stable
public face. Advantage estimators, policy objectives and KL estimators are registries: a new
variant is one function under `register_advantage_estimator`, `register_policy_objective`,
`register_kl_estimator` or `register_correction` (sampler–trainer mismatch corrections,
`rl_reason.core.corrections`), selected by name (see the README's "Extending").

Papers cited below:
  [GRPO]  Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
          Language Models", arXiv:2402.03300.
  [DrGRPO] Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective",
          arXiv:2503.20783.
  [DAPO]  Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
          arXiv:2503.14476.
  [GSPO]  Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv:2507.18071.
  [RLOO]  Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
          Learning from Human Feedback in LLMs", arXiv:2402.14740 (after Kool et al. 2019).
  [PPO]   Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347.
  [CISPO] MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning
          Attention", arXiv:2506.13585 (section 3.1, eq. 4).
  [DualClip] Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement
          Learning", arXiv:1912.09729 (eq. 5).
  [REINFORCE++] Hu et al. 2025, "REINFORCE++: An Efficient RLHF Algorithm with Robustness to
          Both Prompt and Reward Models", arXiv:2501.03262.
  [GAE]   Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized
          Advantage Estimation", arXiv:1506.02438.
  [KL]    Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.
  [Gemma2] Gemma Team 2024, "Gemma 2: Improving Open Language Models at a Practical Size",
          arXiv:2408.00118.
"""

from rl_reason.core.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    gae,
    is_token_level,
    needs_critic,
    process_advantages,
    register_advantage_estimator,
    token_advantages,
    whiten,
)
from rl_reason.core.corrections import (
    CORRECTIONS,
    Correction,
    mismatch_correction,
    register_correction,
)
from rl_reason.core.logprobs import (
    AUTO_CHUNK_BYTES,
    auto_chunk_size,
    entropy,
    token_logprobs,
    token_logprobs_from_hidden,
)
from rl_reason.core.objectives import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    METRIC_NAMES,
    POLICY_OBJECTIVES,
    RATIO_LEVELS,
    SEQUENCE_METRICS,
    ObjectiveInputs,
    cispo,
    dual_clip,
    kl_penalty,
    loss_normalizer,
    merge_metrics,
    policy_loss,
    ppo_clip,
    register_kl_estimator,
    register_policy_objective,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "AUTO_CHUNK_BYTES",
    "CORRECTIONS",
    "Correction",
    "KL_ESTIMATORS",
    "METRIC_NAMES",
    "POLICY_OBJECTIVES",
    "RATIO_LEVELS",
    "SEQUENCE_METRICS",
    "ObjectiveInputs",
    "auto_chunk_size",
    "cispo",
    "compute_advantages",
    "dual_clip",
    "entropy",
    "gae",
    "is_token_level",
    "kl_penalty",
    "loss_normalizer",
    "merge_metrics",
    "mismatch_correction",
    "needs_critic",
    "policy_loss",
    "ppo_clip",
    "process_advantages",
    "register_advantage_estimator",
    "register_correction",
    "register_kl_estimator",
    "register_policy_objective",
    "token_advantages",
    "token_logprobs",
    "token_logprobs_from_hidden",
    "whiten",
]
