"""A recipe config's own sections as checked dataclasses: config.model, prompt, data, lora.

The GRPO options (config.grpo) are `rl_reason.trainer.GRPOConfig`; these are what a recipe
adds to them: which checkpoint, how a question becomes a prompt, where the task's dataset is
built, and whether LoRA adapters train instead of every weight.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from models import LoRAConfig
from models.lora import TARGETS
from rl_reason.pipelines import grpo_stage as grpo_run
from rl_reason.pipelines.tiny_model import TINY_FAMILIES

PROMPT_FORMATS = ("r1_zero", "chat")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """config.model: which checkpoint, and its numerics ("" / 0: as the checkpoint says)."""

    path: str = ""  # a local Hugging Face model directory
    tiny: str = ""  # smoke runs: a family (llama, qwen2, qwen3, gemma2) built into the workdir
    dtype: str = ""  # compute dtype
    param_dtype: str = ""  # storage dtype of the weights (full fine-tuning keeps float32 here)
    max_seq_len: int = 0

    def __post_init__(self) -> None:
        if bool(self.path) == bool(self.tiny):
            raise ValueError(
                "config.model: set exactly one of path (a local Hugging Face model directory) "
                f"and tiny (a family for smoke runs: {sorted(TINY_FAMILIES)}); got "
                f"path={self.path!r}, tiny={self.tiny!r}"
            )
        if self.tiny and self.tiny not in TINY_FAMILIES:
            raise ValueError(
                f"config.model.tiny={self.tiny!r} is not one of {sorted(TINY_FAMILIES)}"
            )
        if not 0 <= self.max_seq_len <= 1 << 22:
            raise ValueError(
                f"config.model.max_seq_len={self.max_seq_len} must be in [0, 2^22] (0: the "
                "checkpoint's own)"
            )


@dataclasses.dataclass(frozen=True)
class PromptOptions:
    """config.prompt: how a question becomes the prompt text."""

    format: str = "r1_zero"  # one of PROMPT_FORMATS
    system: str = ""  # chat: a system message ("" = none: the template's own default, if any)
    suffix: str = ""  # chat: text appended to the question in the user message

    def __post_init__(self) -> None:
        if self.format not in PROMPT_FORMATS:
            raise ValueError(f"config.prompt.format={self.format!r}; valid: {PROMPT_FORMATS}")
        if self.format == "r1_zero" and (self.system or self.suffix):
            raise ValueError(
                "config.prompt.system / suffix apply to the chat format only; the r1_zero "
                "format is the task's own template (set prompt.format='chat' to use them)"
            )


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """config.data: where the task's tfds dataset is built and which splits are used.

    Directories may start with ``~`` and contain ``{workdir}`` (replaced by config.workdir).
    """

    data_dir: str = "~/tensorflow_datasets"
    manual_dir: str = ""  # the downloaded files (gsm8k, math); "" for generated tasks
    train_split: str = "train"
    eval_split: str = "test"
    eval_data_dir: str = ""  # "" = data_dir
    eval_manual_dir: str = ""  # "" = manual_dir
    eval_size: int = 0  # the first N held-out examples; 0 = all

    def __post_init__(self) -> None:
        if self.eval_size < 0:
            raise ValueError(f"config.data.eval_size must be >= 0 (0 = all), got {self.eval_size}")
        if (
            self.eval_manual_dir
            and self.eval_manual_dir != self.manual_dir
            and self.eval_dir == self.data_dir
        ):
            # tfds keeps one prepared dataset per data_dir and reuses it for any files offered.
            raise ValueError(
                f"config.data.eval_manual_dir={self.eval_manual_dir!r} differs from manual_dir "
                f"{self.manual_dir!r}, so the held-out dataset needs its own eval_data_dir "
                "(tfds would reuse the training dataset built in data_dir)"
            )

    def in_workdir(self, workdir: str | Path) -> DataOptions:
        """These options with ``{workdir}`` replaced in every directory."""
        sub = {
            f.name: getattr(self, f.name).replace("{workdir}", str(workdir))
            for f in dataclasses.fields(self)
            if f.name.endswith("_dir")
        }
        return dataclasses.replace(self, **sub)

    @property
    def eval_dir(self) -> str:
        return self.eval_data_dir or self.data_dir

    @property
    def eval_files(self) -> str:
        return self.eval_manual_dir or self.manual_dir


@dataclasses.dataclass(frozen=True)
class LoraOptions:
    """config.lora: rank 0 trains every weight; rank > 0 trains LoRA adapters only."""

    rank: int = 0
    alpha: float = 32.0
    targets: str = ",".join(TARGETS)  # comma-separated names from models.lora.TARGETS

    def __post_init__(self) -> None:
        if not 0 <= self.rank <= 1 << 16:
            raise ValueError(
                f"config.lora.rank must be in [0, 2^16] (0 = no LoRA), got {self.rank}"
            )
        if not (math.isfinite(self.alpha) and 0 < self.alpha <= 1e6):
            raise ValueError(f"config.lora.alpha must be in (0, 1e6] (the scale), got {self.alpha}")
        unknown = [t.strip() for t in self.targets.split(",") if t.strip() not in TARGETS]
        if unknown:
            raise ValueError(f"config.lora.targets {unknown} are not in {list(TARGETS)}")

    def lora_config(self) -> LoRAConfig | None:
        if self.rank == 0:
            return None
        targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        return LoRAConfig(rank=self.rank, alpha=self.alpha, targets=targets)


def sections(config) -> tuple[ModelOptions, PromptOptions, DataOptions, LoraOptions]:
    """The recipe's config sections as checked dataclasses (unknown fields are errors)."""
    return (
        grpo_run.config_from(ModelOptions, config.model),
        grpo_run.config_from(PromptOptions, config.prompt),
        grpo_run.config_from(DataOptions, config.data).in_workdir(config.workdir),
        grpo_run.config_from(LoraOptions, config.lora),
    )
