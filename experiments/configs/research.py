"""One arm of the research experiments: R1-Zero in miniature with what the experiments vary.

The defaults are the baseline arm every experiment shares: outcome-only reward, no cold start,
GRPO (token-mean, no KL, groups of 8). The experiment configs next to this file
(research_*.py) take this config and write their sweeps in `get_hyper`.

Launch one arm:
  python -m experiments.train --config=experiments/configs/research.py
  python -m experiments.train --config=experiments/configs/research.py \\
      --config.reward.mode=process --config.grpo.seed=1
  python -m experiments.train --config=experiments/configs/research.py:smoke     # ~30 s

The run directory is runs/research/s<seed>-r<RL seed>-<hash of the config> unless
--config.workdir is given; stage 1 (~12 min on 2 quiet CPU cores) is cached per stage-1 setting
in runs/research/base and shared by every arm at that seed (in every experiment). An arm then
takes ~4 min: 30 GRPO steps of 16 prompts x 8 samples (two minibatch updates each), greedy
held-out evaluation (256 problems) and the bridge measurement before and after.
"""

import ml_collections

from experiments.configs import r1_zero_tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "", "smoke"):
        raise ValueError(f"unknown config arg {arg!r}; valid: '' or 'smoke'")
    c = r1_zero_tiny.get_config(arg or None)
    with c.unlocked():
        c.pipeline = "research"
        c.workdir = ""  # "": runs_root/s<seed>-<hash>, shared by experiments with this arm
        c.runs_root = "runs/research"
        c.base_cache = ""  # "": runs_root/base
        c.reward = ml_collections.ConfigDict(dict(mode="outcome", process_weight=0.5))
        c.cold_start = ml_collections.ConfigDict(
            dict(
                examples=0,  # worked solutions for SFT before RL; 0 = R1-Zero (no SFT)
                source="worked",  # or "corpus": the same SFT on corpus texts (compute-matched)
                steps=40,
                batch_size=16,
                seq_len=256,
                learning_rate=1e-3,
                warmup_steps=5,
                weight_decay=0.01,
                max_grad_norm=1.0,
                seed=0,
            )
        )
        c.measure = ml_collections.ConfigDict(dict(bridge=True))
        if c.smoke:
            c.runs_root = "runs/research_smoke"
            c.grpo.update(
                steps=2,
                checkpoint_every=0,
                optim=dict(minibatches=2),
                reward=dict(overlong_buffer=16),
            )
            c.cold_start.update(steps=2, batch_size=4)
        else:
            # Two optimizer updates per step: the second is off-policy, so the clip range (PPO,
            # DAPO's clip-higher, GSPO's sequence ratio) acts; with one it never would.
            c.grpo.update(
                steps=30,
                eval_samples=1,
                checkpoint_every=15,
                optim=dict(minibatches=2),
            )
    c.lock()
    return c


SEEDS = (0, 1, 2)


def seeds(hyper) -> list:
    """The seeds of every experiment: each seed is its own base model (corpus, tokenizer,
    initialisation, pretraining) and its own RL and SFT seeds, so a difference between arms is
    measured against the spread of base models as well as of RL runs.

    The base models are cached per stage-1 setting (runs_root/base), so every experiment's arms
    at one seed share one base, and stage 1 runs once per seed (~12 min on 2 quiet CPU cores).
    The previous task's campaign used `hyper.rl_seeds(SEEDS)` (RL seeds on one base model);
    its results stay in experiments/results/research_*/ as run then.
    """
    return hyper.seeds(SEEDS)


# The arms the experiments share, as sweep overrides. Equal overrides give equal configs, hence
# one run directory: the baseline runs once per seed and every experiment that has it reads it.
BASELINE: dict = {}
REWARD_ARMS = {
    "outcome": {"config.reward.mode": "outcome"},
    "process": {"config.reward.mode": "process"},
    "both": {"config.reward.mode": "both", "config.reward.process_weight": 0.5},
    # Process supervision per step: each step's verdict on that step's own tokens.
    "process per step": {"config.reward.mode": "process_steps"},
    "both per step": {"config.reward.mode": "both_steps", "config.reward.process_weight": 0.5},
}
COLD_START = {"config.cold_start.examples": 300}
# The zero arm with the cold start's extra SFT steps, spent on texts of its own corpus.
COMPUTE_MATCHED_ZERO = {"config.cold_start.examples": 300, "config.cold_start.source": "corpus"}
ALGORITHM_ARMS = {
    "GRPO": {},
    # Dr. GRPO: no std division, and a constant normaliser (N x max_len) instead of lengths.
    "Dr. GRPO": {
        "config.grpo.loss.advantage_estimator": "dr_grpo",
        "config.grpo.loss.aggregation": "seq-mean-token-sum-norm",
    },
    # DAPO: clip-higher, dynamic sampling (drop groups with equal rewards, refill), token-mean.
    "DAPO": {
        "config.grpo.loss.clip_eps_high": 0.28,
        "config.grpo.sampling.dynamic_sampling": True,
        "config.grpo.loss.aggregation": "token-mean",
    },
    # GSPO: a sequence-level ratio (length-normalised), per-sequence mean, the paper's clip range.
    "GSPO": {
        "config.grpo.loss.ratio_level": "sequence",
        "config.grpo.loss.aggregation": "seq-mean-token-mean",
        "config.grpo.loss.clip_eps_low": 3e-4,
        "config.grpo.loss.clip_eps_high": 4e-4,
    },
    "RLOO": {"config.grpo.loss.advantage_estimator": "rloo"},
    "KL 0.04": {"config.grpo.loss.kl_coef": 0.04},
    # Same samples per step (P x G = 128) for every group size.
    "G=4": {"config.grpo.group_size": 4, "config.grpo.prompts_per_step": 32},
    "G=16": {"config.grpo.group_size": 16, "config.grpo.prompts_per_step": 8},
    # G=16 at the baseline's 16 prompts (twice the samples per step): G alone varies.
    "G=16, 16 prompts": {"config.grpo.group_size": 16, "config.grpo.prompts_per_step": 16},
    # GRPO as DeepSeekMath writes it: each sequence's token mean, then the mean over sequences
    # (the length normalisation Dr. GRPO removes), at the baseline's budget and at one where
    # responses can grow.
    "GRPO, per-sequence mean": {"config.grpo.loss.aggregation": "seq-mean-token-mean"},
    "GRPO, per-sequence mean, 160 tokens": {
        "config.grpo.loss.aggregation": "seq-mean-token-mean",
        "config.grpo.max_new_tokens": 160,
    },
    "Dr. GRPO, 160 tokens": {
        "config.grpo.loss.advantage_estimator": "dr_grpo",
        "config.grpo.loss.aggregation": "seq-mean-token-sum-norm",
        "config.grpo.max_new_tokens": 160,
    },
    # One-step-off-policy pipelining: step k+1 is sampled with the weights before step k's update.
    "GRPO, 1-step off-policy": {"config.grpo.off_policy_steps": 1},
}

# The algorithms other frameworks run, beside GRPO: PPO with a critic, REINFORCE++ (with its
# per-token KL to the base folded into the return, OpenRLHF's default beta), CISPO, and a
# bfloat16 sampler feeding a float32 trainer with and without truncated importance sampling.
FIELD_ARMS = {
    "GRPO": {},
    # PPO with a learned critic (GAE, gamma = lambda = 1): the default experiment's critic.
    "PPO, critic": {"config.grpo.loss.advantage_estimator": "gae"},
    "REINFORCE++": {
        "config.grpo.loss.advantage_estimator": "reinforce_pp",
        "config.grpo.loss.reward_kl_coef": 0.01,
    },
    "REINFORCE++-baseline": {
        "config.grpo.loss.advantage_estimator": "reinforce_pp_baseline",
        "config.grpo.loss.reward_kl_coef": 0.01,
    },
    "CISPO": {"config.grpo.loss.objective": "cispo"},
    "GRPO, bf16 sampler": {"config.grpo.sampling.compute_dtype": "bfloat16"},
    "GRPO, bf16 sampler + TIS": {
        "config.grpo.sampling.compute_dtype": "bfloat16",
        "config.grpo.loss.recompute_old_logprobs": True,
        "config.grpo.loss.correction": "tis_token",
    },
}


def arms(hyper, table: dict) -> list:
    return hyper.chain([hyper.arm(label, overrides) for label, overrides in table.items()])
