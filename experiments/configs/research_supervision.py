"""Outcome vs process supervision: does a perfect process reward beat the outcome reward alone?

Arms (same base model per seed, same samples and updates per step): the reward is the final
answer only (R1-Zero); the fraction of right steps (a perfect process reward model, "Let's
Verify Step by Step" with an oracle), one number per sequence; both (0.5 / 0.5); and the same
two per step ("process per step", "both per step"): each step's verdict is credited to that
step's own tokens (DeepSeekMath's process supervision, `loss.process_weight`). Measured:
held-out greedy accuracy and process correctness after RL, training accuracy over steps (its
mean over the run is the sample-efficiency figure), the share of well-formed step lists,
accuracy by op count, and how often a final answer is written at all and how often the token
budget runs out.

Launch (3 seeds, each arm a separate process; shared arms run once):
  python -m experiments.research --config=experiments/configs/research_supervision.py
Expected on 2 CPU cores: one stage 1 (12 min quiet, ~35 min on a busy machine), then 15 runs
of ~4-6 min; results in experiments/results/research_supervision/.
"""

from experiments.configs import research


def get_config(arg: str | None = None):
    return research.get_config(arg)


def get_hyper(hyper):
    return hyper.product([research.seeds(hyper), research.arms(hyper, research.REWARD_ARMS)])


SUMMARY = {
    "title": "Outcome vs process supervision",
    "question": (
        "Is the outcome reward alone enough, or does a perfect process reward (fraction of right "
        "steps) learn faster and reason more faithfully?"
    ),
    "table": [
        ("accuracy before RL", "before.accuracy"),
        ("accuracy after RL", "after.accuracy"),
        ("process-correct after RL", "after.frac_process_correct"),
        ("step score after RL", "after.step_score"),
        ("right steps, wrong answer", "after.frac_right_steps_wrong_answer"),
        ("well-formed after RL", "after.frac_well_formed"),
        ("train acc. (mean over run)", "rollout.accuracy.mean"),
        ("train acc. (last 10 steps)", "rollout.accuracy.last10"),
        ("tokens after RL", "after.mean_response_tokens"),
        ("accuracy on 2-op problems after RL", "after.accuracy_by_ops.2"),
        ("accuracy on 4-op problems after RL", "after.accuracy_by_ops.4"),
        ("has an answer after RL", "after.frac_has_answer"),
        ("truncated after RL", "after.truncated_frac"),
        ("has an answer (rollouts, last 10)", "rollout.rollout_frac_has_answer.last10"),
    ],
    # shares of the held-out problems: their differences also get the pooled cases' exact test
    "cases": {
        p: "eval_size"
        for p in (
            "before.accuracy",
            "after.accuracy",
            "after.frac_process_correct",
            "after.frac_well_formed",
            "after.frac_has_answer",
            "after.truncated_frac",
        )
    },
    "changes": [("accuracy, after minus before RL", "before.accuracy", "after.accuracy")],
    "curves": [
        ("training accuracy (T=1)", "accuracy"),
        ("process-correct (rollouts)", "rollout_frac_process_correct"),
        ("response tokens", "response_length_mean"),
    ],
}
