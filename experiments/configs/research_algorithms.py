"""Algorithm ablations: GRPO vs Dr. GRPO vs DAPO vs GSPO vs RLOO, KL on/off, group size 4/8/16,
and GRPO with one-step-off-policy pipelining.

Every arm samples 128 completions per step (the group-size arms trade prompts for samples) and
takes two minibatch updates per step; DAPO's dynamic sampling may sample up to 4 rounds to fill
its batch with informative groups (its extra rounds are reported). Measured: held-out accuracy,
and the response length of wrong answers (the length bias Dr. GRPO attributes to per-sequence
length normalisation), on held-out greedy completions and on the training rollouts.

Launch:
  python -m experiments.research --config=experiments/configs/research_algorithms.py
"""

from experiments.configs import research


def get_config(arg: str | None = None):
    return research.get_config(arg)


def get_hyper(hyper):
    return hyper.product([research.seeds(hyper), research.arms(hyper, research.ALGORITHM_ARMS)])


# The length-bias question at a budget where length can grow: DeepSeekMath's per-sequence mean
# against Dr. GRPO's constant normaliser, both at 160 tokens. Every other arm against GRPO.
REFERENCES = {"GRPO, per-sequence mean, 160 tokens": "Dr. GRPO, 160 tokens"}

SUMMARY = {
    "title": "Algorithm ablations",
    "reference": REFERENCES.get,
    "question": (
        "Which estimator / objective learns most in the same compute, and which lengthens wrong "
        "answers?"
    ),
    "table": [
        ("accuracy after RL", "after.accuracy"),
        ("train acc. (mean over run)", "rollout.accuracy.mean"),
        ("train acc. (last 10 steps)", "rollout.accuracy.last10"),
        ("wrong-answer tokens, held-out", "after.wrong_length_mean"),
        ("wrong-answer tokens, rollouts last 10", "rollout.rollout_wrong_length_mean.last10"),
        ("all tokens, rollouts last 10", "rollout.response_length_mean.last10"),
        ("clipped share, low (mean)", "rollout.clip_frac_low.mean"),
        ("clipped share, high (mean)", "rollout.clip_frac_high.mean"),
        ("KL to the base, median step (KL arm only)", "rollout.kl_ref.median"),
        ("sampling rounds (mean)", "rollout.sampling_rounds.mean"),
        ("seconds per RL step", "rollout.time_step.mean"),
    ],
    # a share of the held-out problems: its differences also get the pooled cases' exact test
    "cases": {"after.accuracy": "eval_size"},
    "curves": [
        ("training accuracy (T=1)", "accuracy"),
        ("wrong-answer tokens (rollouts)", "rollout_wrong_length_mean"),
        ("response tokens", "response_length_mean"),
    ],
}
