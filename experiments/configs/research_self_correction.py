"""Self-correction: does outcome-only RL teach a model to retry a wrong step?

The seed credits outcome-only RL with "stepwise self-correction", but the task's corpus never
shows a step being retried. Here a share of the worked corpus texts (`data.frac_retry`, 10%)
writes one step wrong and then retries it ("Wait. Step i: ..."), against a 0% control (the
research_scale runs themselves), at each model size of research_scale, 3 base seeds each, then
the same outcome-only GRPO. Measured by error injection (`research/injection.py`): the context
holds k right steps and one wrong one, the policy continues greedily, and its answer recovers
(the true answer), follows (the wrong chain's value) or neither; and how often it retries the
wrong step, before and after RL.

Launch (the 0% arms are research_scale's runs, shared):
  python -m experiments.research --config=experiments/configs/research_self_correction.py
"""

from experiments.configs import research, research_scale

FRAC_RETRY = 0.1


def get_config(arg: str | None = None):
    return research_scale.get_config(arg)


def get_hyper(hyper, arg: str = ""):
    sizes = research_scale.SMOKE_SIZES if arg == "smoke" else research_scale.SIZES
    table = {
        **research_scale.size_arms(sizes, "no retries (0%)"),
        **research_scale.size_arms(
            sizes, f"retries ({FRAC_RETRY:.0%})", {"config.data.frac_retry": FRAC_RETRY}
        ),
    }
    return hyper.product([hyper.seeds(research.SEEDS), research.arms(hyper, table)])


def own_size_control(label: str) -> str | None:
    """A retry arm is compared with the 0% arm of its own size; the 0% arms with the first."""
    if not label.startswith("retries"):
        return None
    return "no retries (0%) @ " + label.split(" @ ")[1]


SUMMARY = {
    "title": "Self-correction",
    "reference": own_size_control,
    "cases": research_scale.CASES,
    "changes": [
        (
            f"injection {what}, after minus before RL",
            f"injection_before.injection_{what}_rate",
            f"injection_after.injection_{what}_rate",
        )
        for what in ("recovery", "follow", "retry")
    ],
    "question": (
        "After outcome-only RL, does a model whose corpus shows retried steps recover from an "
        "injected error more often than one whose corpus never does, and does RL change it?"
    ),
    "table": [
        ("parameters", "stage1.num_params"),
        ("accuracy after RL", "after.accuracy"),
        ("injection recovery before RL", "injection_before.injection_recovery_rate"),
        ("injection recovery after RL", "injection_after.injection_recovery_rate"),
        ("injection follow before RL", "injection_before.injection_follow_rate"),
        ("injection follow after RL", "injection_after.injection_follow_rate"),
        ("retries the wrong step, before RL", "injection_before.injection_retry_rate"),
        ("retries the wrong step, after RL", "injection_after.injection_retry_rate"),
        ("recovery when it retried, after RL", "injection_after.injection_recovery_given_retry"),
        ("retries per completion, last 10", "rollout.rollout_retries_mean.last10"),
        ("repairs per completion, last 10", "rollout.rollout_repairs_mean.last10"),
    ],
    "curves": [
        ("training accuracy (T=1)", "accuracy"),
        ("retries per completion (rollouts)", "rollout_retries_mean"),
    ],
    "against": (
        "parameters",
        "stage1.num_params",
        [
            "injection_after.injection_recovery_rate",
            "injection_after.injection_retry_rate",
        ],
    ),
}
