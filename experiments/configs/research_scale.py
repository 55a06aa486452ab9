"""Scale: does outcome-only RL keep the reasoning process more faithful in larger models?

The seed claims that "as long as the model truly scales up", outcome-oriented RL lets
deviations in the process correct themselves. Three model sizes spanning ~43x in parameters
(SIZES: 68,400, 875,136 and 2.91M), each pretrained from scratch on the same corpus for its
own number of steps (chosen to reach a plateau; each run reports
`stage1.pretrain_plateau_drop`, the relative drop of the mean loss between the last two
tenths of pretraining), 3 base seeds per size (each its own base model and RL seed), then
the same outcome-only GRPO. Measured against log(parameters): accuracy, process-correct
completions, the deviation rate D (first vs last 10 RL steps, and over the steps at training
accuracy 50-80%, matched across sizes since they learn at different speeds) and the
error-injection recovery rate (`research/injection.py`) before and after RL.

Launch (9 stage-1 runs and 9 RL runs; on the 2-core machine stage 1 took 8 min at 0.07M,
11-12 min at 0.9M (31 min on a shared machine) and 76 min at 3M; the rest of a run 1-4 min):
  python -m experiments.research --config=experiments/configs/research_scale.py
"""

from experiments.configs import research

# label -> (model overrides, pretraining steps)
SIZES = {
    "0.07M": (  # 68,400 parameters with the 172-piece vocabulary its corpus supports
        dict(num_layers=2, embed_dim=48, num_heads=2, num_kv_heads=2, head_dim=24, mlp_dim=144),
        4000,
    ),
    "0.9M": ({}, 2000),  # the shipped base's architecture (4 layers, width 128)
    "3M": (
        dict(num_layers=6, embed_dim=192, num_heads=6, num_kv_heads=6, head_dim=32, mlp_dim=576),
        3000,
    ),
}
SMOKE_SIZES = {
    "tiny": (dict(num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=2, head_dim=16), 20),
    "small": (dict(), 20),
}


def get_config(arg: str | None = None):
    """The research arm with the error-injection measure and the corpus's retry share (0 here;
    research_self_correction varies it), so the two experiments share their 0% runs. The
    bridge is not measured: neither experiment reads it."""
    config = research.get_config(arg)
    with config.unlocked():
        config.measure.bridge = False
        config.measure.injection = True
        config.data.frac_retry = 0.0
    return config


def size_arms(sizes: dict, prefix: str = "outcome", extra: dict | None = None) -> dict:
    """One arm per model size, labelled "<prefix> @ <size>" (a series of the against plot)."""
    table = {}
    for label, (overrides, steps) in sizes.items():
        arm = {f"config.model.overrides.{k}": v for k, v in overrides.items()}
        table[f"{prefix} @ {label}"] = {**arm, "config.pretrain.steps": steps, **(extra or {})}
    return table


def get_hyper(hyper, arg: str = ""):
    sizes = SMOKE_SIZES if arg == "smoke" else SIZES
    return hyper.product([hyper.seeds(research.SEEDS), research.arms(hyper, size_arms(sizes))])


TABLE = [
    ("parameters", "stage1.num_params"),
    ("pretraining loss, last tenth", "stage1.pretrain_loss_last_tenth"),
    ("plateau drop (last two tenths)", "stage1.pretrain_plateau_drop"),
    ("accuracy before RL", "before.accuracy"),
    ("accuracy after RL", "after.accuracy"),
    ("process-correct after RL", "after.frac_process_correct"),
    ("D, first 10 steps", "rollout.rollout_deviation_rate.first10"),
    ("D, last 10 steps", "rollout.rollout_deviation_rate.last10"),
    # Sizes learn at different speeds, so D is also compared at matched training accuracy:
    # over the steps whose accuracy (T = 1) is in [50%, 80%), which every size passes through.
    ("D at train acc. 50-80%", "rollout.rollout_deviation_rate.acc50-80"),
    ("D after RL (held-out)", "after.deviation_rate"),
    ("injection recovery before RL", "injection_before.injection_recovery_rate"),
    ("injection recovery after RL", "injection_after.injection_recovery_rate"),
    ("injection follow after RL", "injection_after.injection_follow_rate"),
    ("train acc. (mean over run)", "rollout.accuracy.mean"),
]

# Table metrics that are shares of counted cases (held-out problems, injected errors): their
# differences also get the pooled cases' exact test (compare.pooled_cases).
CASES = {
    **{p: "eval_size" for p in ("before.accuracy", "after.accuracy", "after.frac_process_correct")},
    **{
        f"injection_{when}.injection_{what}_rate": f"injection_{when}.injection_cases"
        for when in ("before", "after")
        for what in ("recovery", "follow", "retry")
    },
}

SUMMARY = {
    "title": "Scale",
    "question": (
        "Do larger models deviate less in their process under outcome-only RL, and recover "
        "more often from an injected error?"
    ),
    "table": TABLE,
    "cases": CASES,
    "changes": [
        (
            "D, last 10 minus first 10 steps",
            "rollout.rollout_deviation_rate.first10",
            "rollout.rollout_deviation_rate.last10",
        ),
        (
            "injection recovery, after minus before RL",
            "injection_before.injection_recovery_rate",
            "injection_after.injection_recovery_rate",
        ),
    ],
    "curves": [
        ("training accuracy (T=1)", "accuracy"),
        ("D (rollouts)", "rollout_deviation_rate"),
    ],
    "against": (
        "parameters",
        "stage1.num_params",
        [
            "after.accuracy",
            "rollout.rollout_deviation_rate.last10",
            "rollout.rollout_deviation_rate.acc50-80",
            "injection_after.injection_recovery_rate",
        ],
    ),
}
