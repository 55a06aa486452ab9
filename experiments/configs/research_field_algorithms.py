"""The algorithms the field runs, on the same task and budget as GRPO: PPO with a learned critic
(GAE), REINFORCE++ and REINFORCE++-baseline, CISPO, and GRPO fed by a bfloat16 sampler with and
without truncated importance sampling (TIS, cap 2) against the float32 trainer.

Every arm samples 16 prompts x 8 completions per step and takes two minibatch updates per step,
30 steps from the shared base model (`research.py`). The bfloat16 arms sample in bfloat16 from
the float32 weights and train in float32; their held-out evaluation is float32 like every arm's.

Launch:
  python -m experiments.research --config=experiments/configs/research_field_algorithms.py
"""

from experiments.configs import research


def get_config(arg: str | None = None):
    return research.get_config(arg)


def get_hyper(hyper):
    return hyper.product([research.seeds(hyper), research.arms(hyper, research.FIELD_ARMS)])


SUMMARY = {
    "title": "The field's algorithms",
    "question": (
        "Do PPO with a critic, REINFORCE++, CISPO learn as much as GRPO in the same compute, and "
        "does a bfloat16 sampler cost accuracy that TIS wins back?"
    ),
    "table": [
        ("accuracy before RL", "before.accuracy"),
        ("accuracy after RL", "after.accuracy"),
        ("train acc. (mean over run)", "rollout.accuracy.mean"),
        ("train acc. (last 10 steps)", "rollout.accuracy.last10"),
        ("all tokens, rollouts last 10", "rollout.response_length_mean.last10"),
        ("clipped share, low (mean)", "rollout.clip_frac_low.mean"),
        ("sampler-trainer gap per token (TIS arm)", "rollout.logprob_gap_sampler_trainer.mean"),
        ("tokens TIS truncated (mean)", "rollout.mismatch_token_frac.mean"),
        ("value loss, last 10 (PPO)", "rollout.value_loss.last10"),
        ("seconds per RL step", "rollout.time_step.mean"),
    ],
    # a share of the held-out problems: its differences also get the pooled cases' exact test
    "cases": {p: "eval_size" for p in ("before.accuracy", "after.accuracy")},
    "curves": [
        ("training accuracy (T=1)", "accuracy"),
        ("response tokens", "response_length_mean"),
    ],
}
