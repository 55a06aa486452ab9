"""A recipe's dataset: the task of config.task and its training and held-out splits.

The task's tfds builder prepares each split on first use (under config.data's directories);
with several processes, process 0 prepares it before the others open it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils

from rl_reason.infra import data as data_lib
from rl_reason.pipelines.recipe_options import DataOptions


def make_task(config):
    """The dataset task of config.task (name and builder parameters)."""
    from rl_reason.tasks import get_task

    return get_task(config.task.name, **dict(config.task.params))


def _expand(path: str) -> Path | None:
    return Path(path).expanduser() if path else None


def data_source(task, split: str, data_dir: str, manual_dir: str) -> Sequence[Any]:
    """A split of the task's dataset; with several processes, process 0 builds it first."""

    def open_split():
        return task.data_source(split, data_dir=_expand(data_dir), manual_dir=_expand(manual_dir))

    if jax.process_count() == 1:
        return open_split()
    # Builders write to temporary names and rename: one process builds, the others then find it
    # prepared (a shared disk) or build their own copy (local disks), never concurrently.
    if jax.process_index() == 0:
        source = open_split()
    multihost_utils.sync_global_devices(f"rl_reason.pipelines.recipe_data:{split}")
    return source if jax.process_index() == 0 else open_split()


def train_source(task, data: DataOptions) -> Sequence[Any]:
    return data_source(task, data.train_split, data.data_dir, data.manual_dir)


def held_out_examples(
    task, data: DataOptions, *, split: str | None = None, n: int | None = None
) -> list[dict]:
    """The first n (default data.eval_size; 0 = all) usable examples of the held-out split."""
    source = data_source(task, split or data.eval_split, data.eval_dir, data.eval_files)
    n = data.eval_size if n is None else n
    return data_lib.eval_examples(source, n or None, task=task)
