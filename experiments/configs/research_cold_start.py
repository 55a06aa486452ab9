"""Cold start vs zero: what a short SFT on worked solutions buys before outcome-only RL.

R1 starts RL from a model fine-tuned on a few thousand readable long chains of thought;
R1-Zero starts from the base model. Here: 40 SFT steps on 300 worked solutions written in the
RL template (prompt + "Step i: a op b = c" lines + answer), then the same GRPO run, vs GRPO
from the base model, and vs a compute-matched zero arm that spends the same 40 SFT steps on 300
texts of its own pretraining corpus. Each RL seed fine-tunes on its own 300 problems.
Measured: accuracy, response length and readability (the share of well-formed step lists:
nothing but numbered step lines in the think block, then one answer).

Launch:
  python -m experiments.research --config=experiments/configs/research_cold_start.py
"""

from experiments.configs import research


def get_config(arg: str | None = None):
    return research.get_config(arg)


def get_hyper(hyper):
    table = {
        "zero (R1-Zero)": research.BASELINE,
        "cold start (R1)": research.COLD_START,
        "zero + 40 SFT steps on corpus texts": research.COMPUTE_MATCHED_ZERO,
    }
    return hyper.product([research.seeds(hyper), research.arms(hyper, table)])


SUMMARY = {
    "title": "Cold start vs zero",
    "question": "Does a short SFT before RL mainly buy readability, or accuracy too?",
    "table": [
        ("accuracy before RL", "before.accuracy"),
        ("accuracy after RL", "after.accuracy"),
        ("well-formed before RL", "before.frac_well_formed"),
        ("well-formed after RL", "after.frac_well_formed"),
        ("process-correct after RL", "after.frac_process_correct"),
        ("tokens before RL", "before.mean_response_tokens"),
        ("tokens after RL", "after.mean_response_tokens"),
        ("train acc. (mean over run)", "rollout.accuracy.mean"),
    ],
    # shares of the held-out problems: their differences also get the pooled cases' exact test
    "cases": {
        p: "eval_size"
        for p in (
            "before.accuracy",
            "after.accuracy",
            "before.frac_well_formed",
            "after.frac_well_formed",
            "after.frac_process_correct",
        )
    },
    # what RL adds on top of each start (a cold start begins near the ceiling)
    "changes": [
        ("accuracy, after minus before RL", "before.accuracy", "after.accuracy"),
        ("well-formed, after minus before RL", "before.frac_well_formed", "after.frac_well_formed"),
    ],
    "curves": [
        ("training accuracy (T=1)", "accuracy"),
        ("response tokens", "response_length_mean"),
        ("well-formed (rollouts)", "rollout_frac_well_formed"),
    ],
}
