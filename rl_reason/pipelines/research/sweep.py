"""Run an experiment's sweep: every point of its `get_hyper` as a separate process, in turn.

    exp = load_experiment("experiments/configs/research_supervision.py", arg="")
    for point in exp.points(seeds=[0]):
        point.label, point.seed, point.workdir, point.command
    run_sweep(exp)                      # skips points whose summary.json exists

A point's command is ``python -m experiments.train --config=FILE[:ARG] --config.k=v ...``, so
every arm can be rerun by hand from its log. A point's `seed` is its RL seed (`grpo.seed`) and
its `base_seed` the seed of its base model and data (`config.seed`). Points run sorted by
(base_seed, seed): the first arm of each base pretrains and caches it, the others load it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_collections

from rl_reason.infra.metrics import format_duration
from rl_reason.pipelines.research import hyper, runs


@dataclasses.dataclass(frozen=True)
class Point:
    label: str
    seed: int  # the RL seed, config.grpo.seed
    base_seed: int  # the base model's and the data's, config.seed
    overrides: dict[str, Any]  # "config.a.b" -> value
    config: ml_collections.ConfigDict
    workdir: Path
    command: list[str]


def _format(value: Any) -> str:
    # absl parses the override text with the field's type; repr keeps floats exact.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]):
    """A copy of `config` with dotted ``config.a.b`` overrides set (types as the field's)."""
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked deep copy
    for name, value in overrides.items():
        *parents, leaf = name.removeprefix("config.").split(".")
        node = config
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise ValueError(f"sweep sets {name}, which the config does not have")
        old = node[leaf]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        node[leaf] = value
    config.lock()
    return config


class Experiment:
    """An experiment config file: its config, its sweep and its summary spec."""

    def __init__(self, path: str | Path, arg: str = "", runs_root: str | None = None):
        self.path = Path(path)
        self.arg = arg
        self.runs_root = runs_root
        self.name = self.path.stem
        self.module = _import(self.path)
        for attr in ("get_config", "get_hyper", "SUMMARY"):
            if not hasattr(self.module, attr):
                raise ValueError(f"{self.path} defines no {attr}: is it an experiment config?")

    @property
    def summary_spec(self) -> dict[str, Any]:
        return self.module.SUMMARY

    def base_config(self) -> ml_collections.ConfigDict:
        config = self.module.get_config(self.arg or None)
        if self.runs_root is not None:
            config = apply_overrides(config, {"config.runs_root": self.runs_root})
        return config

    def points(self, seeds: Iterable[int] | None = None) -> list[Point]:
        base = self.base_config()
        wanted = None if seeds is None else set(seeds)
        out = []
        for raw in self._sweep():
            raw = dict(raw)
            label = str(raw.pop(hyper.ARM, "default"))
            config = apply_overrides(base, raw)
            if wanted is not None and config.grpo.seed not in wanted:
                continue
            flags = dict(raw)
            if self.runs_root is not None:
                flags["config.runs_root"] = self.runs_root
            spec = f"{self.path}:{self.arg}" if self.arg else str(self.path)
            command = [sys.executable, "-m", "experiments.train", f"--config={spec}"]
            command += [f"--{k}={_format(v)}" for k, v in flags.items()]
            workdir = runs.workdir_for(config)
            out.append(Point(label, config.grpo.seed, config.seed, raw, config, workdir, command))
        labels = {(p.label, p.seed) for p in out}
        if len(labels) != len(out):
            raise ValueError(f"{self.path}: two sweep points share an arm label and RL seed")
        return sorted(out, key=_order)  # stable: arm order kept within a seed

    def _sweep(self) -> list[dict]:
        # get_hyper(hyper) or get_hyper(hyper, arg): a sweep may differ in smoke mode.
        fn = self.module.get_hyper
        if len(inspect.signature(fn).parameters) > 1:
            return fn(hyper, self.arg)
        return fn(hyper)


def _order(p: Point) -> tuple[int, int]:
    return p.base_seed, p.seed


def _import(path: Path) -> ModuleType:
    if not path.exists():
        raise FileNotFoundError(f"no experiment config at {path}")
    spec = importlib.util.spec_from_file_location(f"_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_experiment(path: str | Path, arg: str = "", runs_root: str | None = None) -> Experiment:
    return Experiment(path, arg, runs_root)


# Every research experiment, in the order `--all` runs them (configs in experiments/configs/).
EXPERIMENTS = (
    "research_supervision",
    "research_fidelity",
    "research_bridge",
    "research_cold_start",
    "research_algorithms",
    "research_field_algorithms",
    "research_scale",
    "research_self_correction",
)


def select_experiments(
    config: str | None, every: bool, runs_root: str | None, config_dir: str | Path
) -> list[Experiment]:
    """The experiments a command names: one config ``FILE[:ARG]``, or ``every`` one."""
    if every == bool(config):
        raise ValueError("pass exactly one of --config=FILE[:ARG] or --all")
    specs = [str(Path(config_dir) / f"{n}.py") for n in EXPERIMENTS] if every else [config]
    out = []
    for spec in specs:
        path, _, arg = spec.partition(":")
        out.append(load_experiment(path, arg, runs_root))
    return out


def check_arms(exps: Sequence[Experiment], arms: Iterable[str]) -> None:
    """Raises ValueError, listing the arms, for a label that none of `exps` has."""
    known = {p.label for exp in exps for p in exp.points()}
    if unknown := set(arms) - known:
        raise ValueError(f"no arm {sorted(unknown)}; the arms are {sorted(known)}")


def run_sweep(
    exps: Sequence[Experiment] | Experiment,
    *,
    seeds: Iterable[int] | None = None,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
    records: str | Path | None = None,
    arms: Iterable[str] | None = None,
) -> list[tuple[Point, str]]:
    """Runs every point not done yet, one process at a time; returns (point, status) pairs.

    With several experiments their points run seed by seed across all of them (a stopped
    campaign then has every experiment at the same number of seeds), each distinct run once.
    `seeds` selects RL seeds and `arms` arm labels (a label no experiment has is an error, so
    a typo does not silently run nothing). With `records` (a directory), a point whose record
    is there counts as done, and each run that finishes leaves its record there
    (`runs.write_record`).
    Status: "done" (already had a summary), "ran", "failed (rc N)" or "dry run".
    """
    exps = [exps] if isinstance(exps, Experiment) else list(exps)
    seeds = None if seeds is None else list(seeds)
    todo: dict[Path, Point] = {}
    for exp in exps:
        for p in exp.points(seeds):
            todo.setdefault(p.workdir, p)
    if arms is not None:
        check_arms(exps, arms)
        todo = {w: p for w, p in todo.items() if p.label in set(arms)}
    ordered = sorted(todo.values(), key=_order)
    results, seconds = [], []
    for i, p in enumerate(ordered, 1):
        head = f"[sweep {i}/{len(ordered)}] {p.label} seed {p.seed} -> {p.workdir}"
        if runs.finished(p.workdir, records):
            echo(f"{head}: done")
            results.append((p, "done"))
            continue
        echo(f"{head}\n  {' '.join(p.command)}")
        if dry_run:
            results.append((p, "dry run"))
            continue
        p.workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(p.workdir / "run.log", "a") as log:
            rc = subprocess.call(p.command, stdout=log, stderr=subprocess.STDOUT)
        status = "ran" if rc == 0 and runs.is_done(p.workdir) else f"failed (rc {rc})"
        if status == "ran" and records is not None:
            runs.write_record(p.workdir, records)
        seconds.append(time.perf_counter() - t0)
        left = sum(not runs.finished(q.workdir, records) for q in ordered[i:])
        eta = f", ETA {format_duration(left * sum(seconds) / len(seconds))}" if left else ""
        echo(
            f"{head}: {status} in {seconds[-1]:.0f}s, {left} to run{eta} (log {p.workdir}/run.log)"
        )
        results.append((p, status))
    return results
