"""Which checkpoint a recipe starts from: config.model.path, or a tiny model built for it.

Smoke runs set config.model.tiny to a family name instead of a path: a tiny random model of
that family (our `save_pretrained` of a random `Transformer`) and a byte-level BPE tokenizer
trained on the task's own rows are written to workdir/tiny_model and used as the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils

from rl_reason.infra import data as data_lib
from rl_reason.pipelines.recipe_data import held_out_examples, train_source
from rl_reason.pipelines.recipe_options import DataOptions, ModelOptions, PromptOptions
from rl_reason.pipelines.tiny_model import build_tiny_model
from rl_reason.rollout import envs
from rl_reason.tasks.templates import SPECIAL_TOKENS

TINY_DIR = "tiny_model"


def _tiny_corpus(task, examples: Sequence[Mapping[str, Any]], prompt: PromptOptions) -> list[str]:
    texts = ["system\nuser\nassistant\n", prompt.system, prompt.suffix, *SPECIAL_TOKENS]
    for ex in examples:
        texts += [task.prompt(ex), str(ex.get("answer", "")), str(ex.get("solution", ""))]
    return [t for t in texts if t]


def model_path(config, task, model: ModelOptions, prompt: PromptOptions, data: DataOptions) -> Path:
    """config.model.path, or the tiny model of config.model.tiny (built on first use)."""
    if model.path:
        path = Path(model.path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"config.model.path={model.path!r} is not a Hugging Face model directory (no "
                "config.json): download the checkpoint and point the path at its directory"
            )
        return path
    path = Path(config.workdir) / TINY_DIR
    if (path / "config.json").is_file():
        return path
    if jax.process_index() == 0:
        rows = data_lib.eval_examples(train_source(task, data), None, task=task)
        rows += held_out_examples(task, data)
        # A chat tool-call environment needs Qwen's tool tokens (one token each).
        env = config.grpo.get("multi_turn", {}).get("env", "")
        corpus = _tiny_corpus(task, rows, prompt)
        build_tiny_model(
            path, model.tiny, corpus, seed=config.seed, tool_tokens=env in envs.CHAT_TOOLS
        )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("rl_reason.pipelines.model_path.tiny_model")
    return path
