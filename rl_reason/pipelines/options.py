"""Every option of a config checked when the config is read: before any data, model or compile.

`check(config)` reads each section its pipeline uses into its typed options (unknown fields,
wrong types and out-of-range values are errors), checks the mesh against the devices and the
batch against the mesh, and raises one ValueError that lists every bad field at once, each with
its bound and the reason for it. `RunContext.start` calls it first thing, so a bad option fails
in the first second of `python -m experiments.train`, not after stage 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from rl_reason.core.config import GRPOConfig, broken_rules, config_from, finite
from rl_reason.infra import sharding
from rl_reason.infra.metrics import MetricsConfig

Reader = Callable[[Any], Any]


class OptionsError(ValueError):
    """A config with bad options; the message lists each one."""


def _r1_zero_data(section) -> None:
    rules = {
        "corpus_size": (lambda v, c: v >= 1, ">= 1", "pretraining texts"),
        "eval_size": (lambda v, c: v >= 1, ">= 1", "held-out problems to evaluate on"),
        "rl_pool_size": (lambda v, c: v >= 1, ">= 1", "RL training problems"),
        "frac_worked": (lambda v, c: finite(v) and 0 <= v <= 1, "in [0, 1]", "a share"),
        "frac_template": (lambda v, c: finite(v) and 0 <= v <= 1, "in [0, 1]", "a share"),
        "frac_template_worked": (lambda v, c: finite(v) and 0 <= v <= 1, "in [0, 1]", "a share"),
    }
    if "frac_retry" in section:  # the self-correction configs' share of retried worked texts
        rules["frac_retry"] = (lambda v, c: finite(v) and 0 <= v <= 1, "in [0, 1]", "a share")
    _raise_broken("config.data", section, rules)


def _tool_data(section) -> None:
    rules = {
        "corpus_size": (lambda v, c: v >= 1, ">= 1", "pretraining texts"),
        "eval_size": (lambda v, c: v >= 1, ">= 1", "held-out problems to evaluate on"),
        "rl_pool_size": (lambda v, c: v >= 1, ">= 1", "RL training problems"),
        "frac_tool": (lambda v, c: finite(v) and 0 <= v <= 1, "in [0, 1]", "a share"),
    }
    _raise_broken("config.data", section, rules)


def _seed(name: str):
    def read(value) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"config.{name}={value!r} must be an int >= 0 (numpy seeds)")

    return read


def _tokenizer(section) -> None:
    rules = {
        "vocab_size": (
            lambda v, c: 64 <= v <= 1 << 20,
            "in [64, 2^20]",
            "the special tokens and digits need room",
        ),
        "train_texts": (lambda v, c: v >= 1, ">= 1", "texts the tokenizer is trained on"),
    }
    _raise_broken("config.tokenizer", section, rules)


def _model(section) -> None:
    from models import get_config

    overrides = dict(section.get("overrides") or {})
    try:
        cfg = get_config(section["preset"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"config.model.preset: {e}") from None
    fields = set(type(cfg).__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"config.model.overrides has no field(s) {unknown}; valid: {sorted(fields)}"
        )
    bad = [
        f"config.model.overrides.{k}={v!r} must be >= 1"
        for k, v in overrides.items()
        if isinstance(v, int) and not isinstance(v, bool) and v < 1
    ]
    if bad:
        raise ValueError("; ".join(bad))
    try:
        cfg.replace(**overrides)
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.model.overrides: {e}") from None


def _recipe_task(section) -> None:
    from rl_reason.tasks import get_task
    from rl_reason.tasks.bad_rows import check_max_bad_fraction

    params = dict(section.get("params") or {})
    try:
        if "max_bad_fraction" in params:
            check_max_bad_fraction(params["max_bad_fraction"])
        get_task(section["name"], **params)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"config.task: {e}") from None


def _raise_broken(path: str, section, rules) -> None:
    class _View:
        def __init__(self, values):
            self.__dict__.update(values)

    problems = broken_rules(_View(dict(section)), rules)
    if problems:
        raise ValueError("; ".join(f"{path}.{p}" for p in problems))


def _readers(pipeline: str) -> dict[str, Reader]:
    from rl_reason.pipelines import pretrain

    readers: dict[str, Reader] = {
        "grpo": lambda s: config_from(GRPOConfig, s, path="config.grpo"),
        "metrics": lambda s: config_from(MetricsConfig, s, path="config.metrics"),
        "mesh": lambda s: config_from(sharding.MeshConfig, s, path="config.mesh"),
    }
    if pipeline in ("r1_zero", "research", "pretrain_base"):
        from rl_reason.tasks import arithmetic

        readers.update(
            task=lambda s: config_from(arithmetic.ArithmeticConfig, s, path="config.task"),
            data=_r1_zero_data,
            tokenizer=_tokenizer,
            model=_model,
            pretrain=lambda s: config_from(pretrain.PretrainConfig, s, path="config.pretrain"),
        )
    if pipeline == "tool_arithmetic":
        from rl_reason.tasks import tool_arithmetic

        readers.update(
            task=lambda s: config_from(tool_arithmetic.ToolArithmeticConfig, s, path="config.task"),
            data=_tool_data,
            data_seed=_seed("data_seed"),
            tokenizer=_tokenizer,
            model=_model,
            pretrain=lambda s: config_from(pretrain.PretrainConfig, s, path="config.pretrain"),
        )
    if pipeline == "research":
        from rl_reason.pipelines.research import pipeline as research

        readers.update(
            reward=lambda s: config_from(research.RewardConfig, s, path="config.reward"),
            cold_start=lambda s: config_from(research.ColdStartConfig, s, path="config.cold_start"),
        )
    if pipeline == "recipe":
        from rl_reason.pipelines import recipe_options as ro

        readers.update(
            model=lambda s: config_from(ro.ModelOptions, s, path="config.model"),
            prompt=lambda s: config_from(ro.PromptOptions, s, path="config.prompt"),
            data=lambda s: config_from(ro.DataOptions, s, path="config.data"),
            lora=lambda s: config_from(ro.LoraOptions, s, path="config.lora"),
            task=_recipe_task,
        )
    return readers


def check(config) -> None:
    """Every section of `config` its pipeline reads, checked at once (see the module doc)."""
    problems, read = [], {}
    for name, reader in _readers(str(config.get("pipeline", ""))).items():
        if name not in config:
            continue
        try:
            read[name] = reader(config[name])
        except (ValueError, TypeError) as e:
            problems.append(str(e))
    if "seed" in config and not (isinstance(config.seed, int) and config.seed >= 0):
        problems.append(f"config.seed={config.seed!r} must be an int >= 0 (numpy seeds)")
    if "mesh" in read:
        problems += _mesh_problems(read["mesh"], read.get("grpo"))
    if problems:
        raise OptionsError(
            "bad options (set them in the config file or with --config.<section>.<field>):\n  - "
            + "\n  - ".join(problems)
        )


def _mesh_problems(mesh: sharding.MeshConfig, grpo: GRPOConfig | None) -> list[str]:
    try:
        data, fsdp, _ = mesh.shape(jax.device_count())
    except ValueError as e:
        return [f"config.mesh: {e}"]
    if grpo is None:
        return []
    shards, rows = data * fsdp, grpo.rows // grpo.optim.minibatches
    out = []
    if grpo.prompts_per_step % shards or rows % shards:
        out.append(
            f"config.grpo.prompts_per_step ({grpo.prompts_per_step}) and the rows per minibatch "
            f"({rows}) must split evenly over the {shards} batch shards (data x fsdp) of the "
            "mesh: change prompts_per_step, group_size or optim.minibatches, or config.mesh"
        )
    if grpo.prompts_per_step % jax.process_count():
        out.append(
            f"config.grpo.prompts_per_step ({grpo.prompts_per_step}) must split over the "
            f"{jax.process_count()} processes"
        )
    return out
