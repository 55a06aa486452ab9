"""Tasks: datasets (tfds builders), prompt templates and each task's verifier name.

``get_task(name, **kwargs)`` (see `rl_reason.tasks.registry`) gives a task by name, and
``register_task`` adds one (``jsonl`` reads JSON Lines files, no builder needed); the builders
are in `rl_reason.tasks.datasets`. Both are imported on first use, so that importing a task
module (e.g. ``rl_reason.tasks.arithmetic``) does not load tensorflow_datasets.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("get_task", "register_task"):
        from rl_reason.tasks import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
