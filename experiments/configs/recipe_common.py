"""The config skeleton the published-recipe configs share
(pipeline "recipe", rl_reason/pipelines/recipe.py).

Not a config itself: each recipe file calls `recipe_config(...)` with its sourced values and
`smoke(c, ...)` for its `:smoke` variant. Every section maps onto a checked dataclass
(recipe.ModelOptions, PromptOptions, DataOptions, LoraOptions, trainer.GRPOConfig,
sharding.MeshConfig), so a typo'd field stops the run before anything is built.
"""

from pathlib import Path

import ml_collections

from experiments.configs.common import grpo_section, metrics_section

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"


def recipe_config(
    *,
    workdir: str,
    task: str,
    task_params: dict | None = None,
    model: dict,
    prompt: dict,
    data: dict,
    grpo: dict,
    seed: int = 0,
) -> ml_collections.ConfigDict:
    """A full recipe config; unset GRPO fields keep trainer.GRPOConfig's defaults."""
    c = ml_collections.ConfigDict()
    c.pipeline = "recipe"
    c.workdir = workdir
    c.seed = seed
    c.smoke = False
    model_defaults = dict(path="", tiny="", dtype="bfloat16", param_dtype="float32", max_seq_len=0)
    c.model = ml_collections.ConfigDict({**model_defaults, **model})
    prompt_defaults = dict(format="r1_zero", system="", suffix="")
    c.prompt = ml_collections.ConfigDict({**prompt_defaults, **prompt})
    c.task = ml_collections.ConfigDict(
        dict(name=task, params=ml_collections.ConfigDict(dict(task_params or {})))
    )
    data_defaults = dict(
        data_dir="~/tensorflow_datasets",
        manual_dir="",
        train_split="train",
        eval_split="test",
        eval_data_dir="",
        eval_manual_dir="",
        eval_size=0,
    )
    c.data = ml_collections.ConfigDict({**data_defaults, **data})
    # Full fine-tuning, as in the cited papers; rank > 0 trains LoRA adapters instead.
    c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=32.0, targets="q,k,v,o,gate,up,down"))
    # FSDP over every device (the sampler's batch is split over data x fsdp either way).
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.metrics = metrics_section()
    # Modules imported before the run (and by the verifier workers) that register estimators,
    # objectives, verifiers or tasks (rl_reason/plugins.py).
    c.plugins = ()
    grpo_defaults = dict(
        checkpoint_every=20, checkpoint_keep=2, verifier_workers=8, verifier_timeout_s=10.0
    )
    c.grpo = grpo_section(**{**grpo_defaults, **grpo, "seed": seed})
    return c


def smoke(c: ml_collections.ConfigDict, *, family: str, data: dict) -> None:
    """2 GRPO steps on a tiny random model of `family` built in the workdir (CPU, float32).

    The overlong penalty makes rewards depend on length, so an untrained model's groups have
    reward variance and both steps make real updates.
    """
    c.smoke = True
    c.workdir = c.workdir + "_smoke"
    c.model.update(path="", tiny=family, dtype="float32", param_dtype="float32")
    c.data.update(data_dir="{workdir}/tfds", **data)
    c.mesh.update(data=-1, fsdp=1)
    c.grpo.update(
        steps=2,
        prompts_per_step=4,
        group_size=4,
        max_prompt_len=160,
        max_new_tokens=16,
        eval_every=0,
        eval_samples=2,
        checkpoint_every=1,
        verifier_workers=1,
        optim=dict(
            minibatches=1,
            microbatches=1,
            learning_rate=3e-3,
            warmup_steps=0,
        ),
        reward=dict(overlong_buffer=12),
    )
