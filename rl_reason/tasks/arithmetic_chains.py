"""The synthetic arithmetic chains of `rl_reason.tasks.arithmetic` as a tfds dataset.

An example is a `arithmetic.generate_problem` dict::

    {"question": "Start with 17. Step 1: add 8. Step 2: subtract 5.", "answer": "20",
     "steps": [(17, "+", 8, 25), (25, "-", 5, 20)], "verifier": "arithmetic"}

stored with ``steps`` as a sequence of ``{"a", "op", "b", "result"}`` (the ``arithmetic`` task
in `rl_reason.tasks.registry` turns them back into tuples when reading).

The test split is ``ArithmeticTask(cfg).eval_set(seed, num_test)``; the train split is
``num_train`` further distinct problems from the same stream with the test problems excluded,
so the splits are disjoint, each is distinct, and the test split does not depend on
``num_train``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from rl_reason.tasks import arithmetic
from rl_reason.tasks.builder_base import Builder, Example

NAME = "arithmetic_chains"
_DEFAULTS = arithmetic.ArithmeticConfig()


@dataclasses.dataclass(eq=False, kw_only=True)
class ArithmeticChainsConfig(tfds.core.BuilderConfig):
    """An `arithmetic.ArithmeticConfig` plus the seed and split sizes; make one with
    `arithmetic_chains_config`."""

    seed: int = 0
    num_train: int = 10_000
    num_test: int = 1_000
    min_ops: int = _DEFAULTS.min_ops
    max_ops: int = _DEFAULTS.max_ops
    max_value: int = _DEFAULTS.max_value
    ops: str = _DEFAULTS.ops
    max_factor: int = _DEFAULTS.max_factor

    def problem_config(self) -> arithmetic.ArithmeticConfig:
        return arithmetic.ArithmeticConfig(
            **{
                f.name: getattr(self, f.name)
                for f in dataclasses.fields(arithmetic.ArithmeticConfig)
            }
        )

    def params(self) -> dict[str, int | str]:
        return {
            "seed": self.seed,
            "num_train": self.num_train,
            "num_test": self.num_test,
            **dataclasses.asdict(self.problem_config()),
        }


_OP_NAMES = {"+": "add", "-": "sub", "*": "mul"}


def arithmetic_chains_config(
    *, seed: int = 0, num_train: int = 10_000, num_test: int = 1_000, **problem: int | str
) -> ArithmeticChainsConfig:
    """A builder config named after its parameters, so that different ones never share a data
    directory. ``problem``: `arithmetic.ArithmeticConfig` fields (validated by it)."""
    fields = [f.name for f in dataclasses.fields(arithmetic.ArithmeticConfig)]
    unknown = set(problem) - set(fields)
    if unknown:
        raise TypeError(
            f"unknown arithmetic_chains parameters {sorted(unknown)}; valid: seed, num_train, "
            f"num_test, {', '.join(fields)}"
        )
    cfg = arithmetic.ArithmeticConfig(**problem)
    minimum = {"seed": 0, "num_train": 1, "num_test": 1}
    for name, value in (("seed", seed), ("num_train", num_train), ("num_test", num_test)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum[name]:
            raise ValueError(
                f"arithmetic_chains {name} must be an int >= {minimum[name]}, got {value!r}"
            )
    ops = "-".join(_OP_NAMES[op] for op in cfg.ops)
    name = (
        f"s{seed}_n{num_train}-{num_test}_ops{cfg.min_ops}-{cfg.max_ops}_v{cfg.max_value}"
        f"_{ops}_f{cfg.max_factor}"
    )
    return ArithmeticChainsConfig(
        name=name,
        description=f"arithmetic chains, seed {seed}: {cfg}",
        seed=seed,
        num_train=num_train,
        num_test=num_test,
        **dataclasses.asdict(cfg),
    )


def generate_splits(
    seed: int, num_train: int, num_test: int, cfg: arithmetic.ArithmeticConfig = _DEFAULTS
) -> dict[str, list[Example]]:
    """``{"train": [...], "test": [...]}`` (see the module docstring)."""
    task = arithmetic.ArithmeticTask(cfg)
    test = task.eval_set(seed, num_test)
    test_keys = {task.key(p) for p in test}
    # The same stream again: its first problems are the test ones, excluded, so train is what
    # the stream gives after them.
    train = task.eval_set(seed, num_train, exclude_keys=test_keys)
    return {"train": train, "test": test}


def _record(problem: Example) -> Example:
    a, ops, b, results = zip(*problem["steps"], strict=True)
    return {
        "question": problem["question"],
        "answer": problem["answer"],
        "steps": {"a": list(a), "op": list(ops), "b": list(b), "result": list(results)},
        "verifier": problem["verifier"],
    }


class ArithmeticChains(Builder, skip_registration=True):
    """Arithmetic chains generated from a seed (see the module docstring)."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = "Synthetic multi-step arithmetic chains (rl_reason.tasks.arithmetic)."
    BUILDER_CONFIGS = [arithmetic_chains_config()]

    def _features(self) -> tfds.features.FeaturesDict:
        return tfds.features.FeaturesDict(
            {
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "steps": tfds.features.Sequence(
                    {
                        "a": np.int64,
                        "op": tfds.features.Text(),
                        "b": np.int64,
                        "result": np.int64,
                    }
                ),
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
        for i, problem in enumerate(problems):
            yield i, _record(problem)
