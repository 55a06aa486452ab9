"""User modules that register variants: estimators, objectives, KL estimators, verifiers, tasks.

A config's ``plugins`` (a tuple of module names on the Python path) is imported by every
pipeline's ``run(config)`` before it builds anything, from the command line or in a notebook, so
the names the modules register pass the config's checks; the verifier pools' worker processes
import them as well, so a verifier registered by a plugin is found where verification runs:

    python -m experiments.train --config=experiments/configs/r1_zero_tiny.py \\
        --config.plugins="('my_lab.estimators',)" \\
        --config.grpo.loss.advantage_estimator=my_estimator
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from rl_reason import verifiers


def load(modules: Sequence[str]) -> list[str]:
    """Import each module (in order) here and, from now on, in every new verifier pool's
    workers; returns the names. A module that cannot be imported is a ValueError naming it."""
    if isinstance(modules, str):
        modules = (modules,)  # a single name given without the tuple around it
    names = []
    for name in modules:
        if not isinstance(name, str) or not name:
            raise ValueError(f"config.plugins: module names must be strings, got {name!r}")
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(
                f"config.plugins: cannot import {name!r} ({type(e).__name__}: {e}); a plugin is "
                "a module on the Python path (an installed package, or a module under the "
                "directory the command runs in)"
            ) from e
        names.append(name)
    verifiers.add_worker_imports(names)
    return names


def load_from(config) -> list[str]:
    """`load` of ``config.plugins`` (none when the config has no such field)."""
    return load(config.get("plugins", ()) or ())
