"""Sweeps written next to a config, big_vision style: lists of {"config.field": value} points.

An experiment config defines ``get_hyper(hyper)`` with this module as ``hyper``::

    def get_hyper(hyper):
        return hyper.product([
            hyper.seeds([0, 1, 2]),
            hyper.chain([
                hyper.arm("outcome", {"config.reward.mode": "outcome"}),
                hyper.arm("process", {"config.reward.mode": "process"}),
            ]),
        ])

Each point is one run: its ``config.*`` keys override the config's fields and its ``arm`` key
(not a config field) names the arm in tables and plots.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

ARM = "arm"
RL_SEED_FIELDS = ("config.grpo.seed", "config.cold_start.seed")
SEED_FIELDS = ("config.seed", "config.pretrain.seed", *RL_SEED_FIELDS)

Point = dict[str, Any]


def _check_name(name: str) -> None:
    if name != ARM and not name.startswith("config."):
        raise ValueError(f"sweep key {name!r} must be 'arm' or start with 'config.'")


def sweep(name: str, values: Iterable[Any]) -> list[Point]:
    """One point per value of `name`."""
    _check_name(name)
    return [{name: v} for v in values]


def fixed(name: str, value: Any) -> list[Point]:
    """A single point setting `name`."""
    return sweep(name, [value])


def arm(label: str, overrides: Mapping[str, Any] | None = None) -> list[Point]:
    """A single point: the arm called `label` with these overrides."""
    overrides = dict(overrides or {})
    for name in overrides:
        _check_name(name)
    return [{ARM: label, **overrides}]


def seeds(values: Iterable[int]) -> list[Point]:
    """One point per seed, setting every seed field (data, model init, pretraining, RL, SFT):
    each seed has its own base model, pretrained by the run (the shipped base is seed 0's)."""
    points = zipit([sweep(name, list(values)) for name in SEED_FIELDS])
    return [{**p, "config.base": "scratch"} for p in points]


def rl_seeds(values: Iterable[int]) -> list[Point]:
    """One point per seed of what follows stage 1 (RL sampling and problem order, SFT): the
    seeds share one base model and its data."""
    return zipit([sweep(name, list(values)) for name in RL_SEED_FIELDS])


def _merge(points: Sequence[Point]) -> Point:
    out: Point = {}
    for p in points:
        clash = {k for k in set(out) & set(p) if out[k] != p[k]}
        if clash:
            raise ValueError(f"sweeps set {sorted(clash)} twice with different values")
        out.update(p)
    return out


def product(lists: Sequence[Sequence[Point]]) -> list[Point]:
    """Every combination, the first list varying slowest."""
    return [_merge(combo) for combo in itertools.product(*lists)]


def chain(lists: Sequence[Sequence[Point]]) -> list[Point]:
    """The lists one after another."""
    return [dict(p) for points in lists for p in points]


def zipit(lists: Sequence[Sequence[Point]]) -> list[Point]:
    """Point i merges point i of every list (all lists the same length)."""
    lengths = {len(x) for x in lists}
    if len(lengths) > 1:
        raise ValueError(f"zipit needs lists of one length, got {sorted(lengths)}")
    return [_merge(combo) for combo in zip(*lists, strict=True)]
