"""Where a research run lives: a directory named by a hash of everything that shapes its result.

Two experiments that contain the same arm (say outcome-only GRPO with seed 1, the baseline of
several ablations) compute the same hash, so the arm runs once and both summaries read it.
Fields that only say where things go (`workdir`, `runs_root`, `base_cache`) are left out.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

# Where a run is stored and reported, not what it computes: left out of its directory's hash.
LOCATION_FIELDS = ("workdir", "runs_root", "base_cache", "metrics")
SUMMARY_FILE = "summary.json"


def run_settings(config) -> dict[str, Any]:
    settings = config.to_dict()
    for name in LOCATION_FIELDS:
        settings.pop(name, None)
    if not settings.get("plugins", True):
        settings.pop("plugins")  # none: the hash of the runs made before the field existed
    grpo = settings.get("grpo", {})
    if "critic" in grpo and not _uses_critic(grpo):
        grpo.pop("critic")  # unused without PPO's critic (and the runs before it existed)
    return settings


def _uses_critic(grpo: dict[str, Any]) -> bool:
    from rl_reason import losses

    name = grpo.get("loss", {}).get("advantage_estimator", "grpo")
    return name in losses.ADVANTAGE_ESTIMATORS and losses.needs_critic(name)


def run_key(config) -> str:
    blob = json.dumps(run_settings(config), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def workdir_for(config) -> Path:
    """`config.workdir` if set, else ``<runs_root>/s<seed>-r<RL seed>-<key>``."""
    if config.workdir:
        return Path(config.workdir)
    return Path(config.runs_root) / f"s{config.seed}-r{config.grpo.seed}-{run_key(config)}"


def base_cache_for(config) -> Path:
    """`config.base_cache` if set, else ``<runs_root>/base``."""
    return Path(config.base_cache) if config.base_cache else Path(config.runs_root) / "base"


def is_done(workdir: str | Path) -> bool:
    return (Path(workdir) / SUMMARY_FILE).exists()
