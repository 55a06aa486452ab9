"""Countdown (TinyZero's setting): combine 3-4 given numbers with + - * / to hit a target.

A problem is a list of numbers and a target that an expression using every number exactly once
reaches (the ``countdown`` verifier requires each given number exactly as often as given)::

    {"question": "Using the numbers [44, 19, 35], create an equation that equals 98. ...",
     "answer": "44 + 19 + 35" (one witness expression), "numbers": [44, 19, 35],
     "target": 98, "verifier": "countdown"}

Generation: draw how many numbers (uniform in [min_count, max_count]), then the numbers
(uniform in [min_number, max_number]); combine two random items with a random operation until
one is left, keeping every intermediate value a non-negative integer (the larger minus the
smaller; division only when exact, in either order); the result is the target if it lies in
[min_target, max_target], else try another expression, then other numbers of the same count.
Every target therefore has a witness by construction. The train and test splits are drawn
from separate streams of the seed, distinct within each split and disjoint between them (by
numbers as a multiset and target).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from rl_reason.tasks.builder_base import Builder, Example

VERIFIER = "countdown"
NAME = "countdown"
OPS = "+-*/"
# Stream ids for np.random.SeedSequence spawn keys: the splits never share draws.
_TEST_STREAM, _TRAIN_STREAM = 0, 1
_TREES_PER_DRAW = 16


@dataclasses.dataclass(frozen=True)
class CountdownConfig:
    """Problem distribution (defaults: TinyZero's 3-4 numbers below 100)."""

    min_count: int = 3
    max_count: int = 4
    min_number: int = 1
    max_number: int = 99
    min_target: int = 1
    max_target: int = 99

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int | np.integer) or isinstance(value, bool):
                raise TypeError(f"CountdownConfig.{field.name} must be an int, got {value!r}")
        if not 2 <= self.min_count <= self.max_count:
            raise ValueError(
                f"CountdownConfig needs 2 <= min_count <= max_count, got {self.min_count}, "
                f"{self.max_count}"
            )
        if not 1 <= self.min_number <= self.max_number:
            raise ValueError(
                f"CountdownConfig needs 1 <= min_number <= max_number, got {self.min_number}, "
                f"{self.max_number}"
            )
        if not 0 <= self.min_target <= self.max_target:
            raise ValueError(
                f"CountdownConfig needs 0 <= min_target <= max_target, got {self.min_target}, "
                f"{self.max_target}"
            )


def question_text(numbers: list[int], target: int) -> str:
    """The TinyZero instruction, worded for this verifier (every number, expression only)."""
    return (
        f"Using the numbers {numbers}, create an equation that equals {target}. You can use "
        "basic arithmetic operations (+, -, *, /) and each number exactly once. Give only the "
        "expression, for example (1 + 2) / 3."
    )


def _combine(rng: np.random.Generator, numbers: list[int]) -> tuple[int, str] | None:
    """A random expression over all ``numbers``: ``(value, text)``, or None if it has no
    integer value with non-negative intermediates."""
    # items: (value, text, is_leaf); texts of compound operands get parentheses.
    items = [(n, str(n), True) for n in numbers]
    while len(items) > 1:
        i = int(rng.integers(len(items)))
        j = int(rng.integers(len(items) - 1))
        j += j >= i
        a, b = items[i], items[j]
        op = OPS[int(rng.integers(len(OPS)))]
        # Subtract the smaller from the larger and divide whichever way is exact: more draws
        # succeed, and the expressions stay natural (no negative intermediates).
        if (op == "-" and a[0] < b[0]) or (op == "/" and (b[0] == 0 or a[0] % b[0])):
            a, b = b, a
        if op == "+":
            value = a[0] + b[0]
        elif op == "-":
            value = a[0] - b[0]
        elif op == "*":
            value = a[0] * b[0]
        elif b[0] and a[0] % b[0] == 0:
            value = a[0] // b[0]
        else:
            return None
        text_a = a[1] if a[2] else f"({a[1]})"
        text_b = b[1] if b[2] else f"({b[1]})"
        items = [item for k, item in enumerate(items) if k not in (i, j)]
        items.append((value, f"{text_a} {op} {text_b}", False))
    return items[0][0], items[0][1]


def generate_problem(rng: np.random.Generator, cfg: CountdownConfig = CountdownConfig()) -> Example:
    """One problem with a witness (see the module docstring)."""
    # The count is drawn once, so that it stays uniform although larger sets are rejected
    # more often.
    count = int(rng.integers(cfg.min_count, cfg.max_count + 1))
    for _ in range(10_000):
        numbers = [int(n) for n in rng.integers(cfg.min_number, cfg.max_number + 1, size=count)]
        for _ in range(_TREES_PER_DRAW):
            combined = _combine(rng, numbers)
            if combined is not None and cfg.min_target <= combined[0] <= cfg.max_target:
                target, witness = combined
                return {
                    "question": question_text(numbers, target),
                    "answer": witness,
                    "numbers": numbers,
                    "target": target,
                    "verifier": VERIFIER,
                }
    raise ValueError(
        f"No reachable target in [{cfg.min_target}, {cfg.max_target}] found in 10,000 draws "
        f"of {count} numbers from {cfg}: widen the target range or change the number range"
    )


def problem_key(problem: Example) -> tuple[tuple[int, ...], int]:
    """Identity of a problem: its numbers as a multiset and its target."""
    return tuple(sorted(int(n) for n in problem["numbers"])), int(problem["target"])


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))


def _draw_distinct(
    rng: np.random.Generator, n: int, cfg: CountdownConfig, exclude: Collection[Any]
) -> list[Example]:
    problems, seen = [], set()
    budget = 100 * n + 1000
    for _ in range(budget):
        if len(problems) == n:
            break
        problem = generate_problem(rng, cfg)
        key = problem_key(problem)
        if key in exclude or key in seen:
            continue
        seen.add(key)
        problems.append(problem)
    if len(problems) < n:
        raise ValueError(
            f"Found only {len(problems)} of {n} distinct countdown problems in {budget} draws "
            f"from {cfg}: the problem space is too small; widen the ranges or ask for fewer"
        )
    return problems


def generate_splits(
    seed: int, num_train: int, num_test: int, cfg: CountdownConfig = CountdownConfig()
) -> dict[str, list[Example]]:
    """``{"train": [...], "test": [...]}``: deterministic in ``seed``, disjoint, each distinct.

    The test split does not depend on ``num_train``, so growing the training set keeps the
    test set.
    """
    test = _draw_distinct(_rng(seed, _TEST_STREAM), num_test, cfg, ())
    test_keys = {problem_key(p) for p in test}
    train = _draw_distinct(_rng(seed, _TRAIN_STREAM), num_train, cfg, test_keys)
    return {"train": train, "test": test}


@dataclasses.dataclass(eq=False, kw_only=True)
class CountdownBuilderConfig(tfds.core.BuilderConfig):
    """A `CountdownConfig` plus the seed and split sizes; make one with `countdown_config`."""

    seed: int = 0
    num_train: int = 10_000
    num_test: int = 1_000
    min_count: int = 3
    max_count: int = 4
    min_number: int = 1
    max_number: int = 99
    min_target: int = 1
    max_target: int = 99

    def problem_config(self) -> CountdownConfig:
        return CountdownConfig(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(CountdownConfig)}
        )

    def params(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "num_train": self.num_train,
            "num_test": self.num_test,
            **dataclasses.asdict(self.problem_config()),
        }


def countdown_config(
    *, seed: int = 0, num_train: int = 10_000, num_test: int = 1_000, **problem: int
) -> CountdownBuilderConfig:
    """A builder config named after its parameters, so that different ones never share a
    data directory. ``problem``: `CountdownConfig` fields."""
    unknown = set(problem) - {f.name for f in dataclasses.fields(CountdownConfig)}
    if unknown:
        raise TypeError(
            f"unknown countdown parameters {sorted(unknown)}; valid: seed, num_train, num_test, "
            f"{', '.join(f.name for f in dataclasses.fields(CountdownConfig))}"
        )
    cfg = CountdownConfig(**problem)
    minimum = {"seed": 0, "num_train": 1, "num_test": 1}
    for name, value in (("seed", seed), ("num_train", num_train), ("num_test", num_test)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum[name]:
            raise ValueError(f"countdown {name} must be an int >= {minimum[name]}, got {value!r}")
    name = (
        f"s{seed}_n{num_train}-{num_test}_c{cfg.min_count}-{cfg.max_count}"
        f"_x{cfg.min_number}-{cfg.max_number}_t{cfg.min_target}-{cfg.max_target}"
    )
    return CountdownBuilderConfig(
        name=name,
        description=f"countdown problems, seed {seed}: {cfg}",
        seed=seed,
        num_train=num_train,
        num_test=num_test,
        **dataclasses.asdict(cfg),
    )


class Countdown(Builder, skip_registration=True):
    """Countdown problems generated from a seed (see the module docstring)."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = "Countdown: reach a target from 3-4 numbers with + - * / (TinyZero)."
    BUILDER_CONFIGS = [countdown_config()]

    def _features(self) -> tfds.features.FeaturesDict:
        return tfds.features.FeaturesDict(
            {
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "numbers": tfds.features.Sequence(np.int64),
                "target": np.int64,
                "verifier": tfds.features.Text(),
            }
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        config = self.builder_config
        self.info.metadata["params"] = config.params()
        splits = generate_splits(
            config.seed, config.num_train, config.num_test, config.problem_config()
        )
        return {split: self._generate_examples(problems) for split, problems in splits.items()}

    def _generate_examples(self, problems: list[Example]):
        yield from enumerate(problems)
