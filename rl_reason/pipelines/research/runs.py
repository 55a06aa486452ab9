"""Where a research run lives: a directory named by a hash of everything that shapes its result.

Two experiments that contain the same arm (say outcome-only GRPO with seed 1, the baseline of
several ablations) compute the same hash, so the arm runs once and both summaries read it.
Fields that only say where things go (`workdir`, `runs_root`, `base_cache`) are left out.

A run directory holds checkpoints and cached base models and stays out of version control. A
campaign of many hours outlives the machine it started on, so each finished run also leaves a
*record*: its `summary.json` and `metrics.jsonl` (what the summaries read) copied to
``<records root>/<run directory name>``, committed next to the results. A point whose record
exists counts as run, and its summary is read from the record when its directory is gone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

# Where a run is stored and reported, not what it computes: left out of its directory's hash.
LOCATION_FIELDS = ("workdir", "runs_root", "base_cache", "metrics")
SUMMARY_FILE = "summary.json"
RECORD_FILES = (SUMMARY_FILE, "metrics.jsonl")


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


def record_for(workdir: str | Path, records: str | Path) -> Path:
    return Path(records) / Path(workdir).name


def finished(workdir: str | Path, records: str | Path | None = None) -> Path | None:
    """Where a finished run's summary lives: its directory, else its record; None if neither."""
    if is_done(workdir):
        return Path(workdir)
    if records is not None and is_done(record_for(workdir, records)):
        return record_for(workdir, records)
    return None


def write_record(workdir: str | Path, records: str | Path) -> Path:
    """Copies a finished run's record files to ``<records>/<name>`` (replacing an older copy
    only file by file, each whole: a copy is written aside and renamed over)."""
    workdir = Path(workdir)
    if not is_done(workdir):
        raise FileNotFoundError(f"{workdir} has no {SUMMARY_FILE}: the run has not finished")
    dest = record_for(workdir, records)
    dest.mkdir(parents=True, exist_ok=True)
    # summary.json is written last by a run, and a record counts as finished by it: copy it last.
    for name in reversed(RECORD_FILES):
        src = workdir / name
        if src.exists():
            tmp = dest / f".{name}.tmp"
            shutil.copyfile(src, tmp)
            tmp.replace(dest / name)
    return dest
