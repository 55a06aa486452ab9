"""The project's tfds builders by name, and one call to build and open a split.

    from rl_reason.tasks import datasets
    source = datasets.data_source("countdown", "train", data_dir="~/tfds", seed=1)
    source = datasets.data_source("gsm8k", "test", data_dir="~/tfds", manual_dir="~/gsm8k")
    len(source), source[0]            # random access; text fields are bytes

Names: ``arithmetic_chains``, ``countdown`` (generated from a seed; keyword arguments are
their config parameters), ``gsm8k``, ``math`` (from a ``manual_dir``; keyword arguments go to
the builder: ``max_bad_fraction``, and ``verify_gold`` for math).

A prepared dataset is reused, also when other files are offered later (a warning says so); it
lives in ``<data_dir>/<name>/<config>/<version>`` and can also be read without this module by
``tfds.builder_from_directory``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

log = logging.getLogger(__name__)


@functools.cache
def _builders() -> dict[str, tuple[type, Any]]:
    # name -> (builder class, config factory or None for manual_dir builders)
    from rl_reason.tasks import arithmetic_chains, countdown, gsm8k, humaneval, math_dataset, mbpp

    return {
        arithmetic_chains.NAME: (
            arithmetic_chains.ArithmeticChains,
            arithmetic_chains.arithmetic_chains_config,
        ),
        countdown.NAME: (countdown.Countdown, countdown.countdown_config),
        gsm8k.NAME: (gsm8k.Gsm8k, None),
        math_dataset.NAME: (math_dataset.Math, None),
        humaneval.NAME: (humaneval.HumanEval, None),
        mbpp.NAME: (mbpp.Mbpp, None),
    }


def names() -> list[str]:
    """Builder names, sorted."""
    return sorted(_builders())


def get_builder(
    name: str,
    *,
    data_dir: str | Path,
    manual_dir: str | Path | None = None,
    **params: Any,
) -> tfds.core.DatasetBuilder:
    """The builder ``name`` (not yet prepared).

    Args:
      name: one of `names()`.
      data_dir: tfds data directory (datasets are written below it).
      manual_dir: where the downloaded files are (gsm8k, math).
      **params: config parameters (arithmetic_chains, countdown) or builder options (gsm8k,
        math: ``max_bad_fraction``; math: ``verify_gold``).
    """
    builders = _builders()
    if name not in builders:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(builders))}")
    cls, make_config = builders[name]
    data_dir = str(Path(data_dir).expanduser())
    if make_config is not None:
        if manual_dir is not None:
            raise ValueError(f"{name} is generated from a seed and takes no manual_dir")
        return cls(data_dir=data_dir, config=make_config(**params))
    return cls(data_dir=data_dir, manual_dir=manual_dir, **params)


def prepare(
    name: str,
    *,
    data_dir: str | Path,
    manual_dir: str | Path | None = None,
    **params: Any,
) -> tfds.core.DatasetBuilder:
    """`get_builder`, built if it is not yet (arguments as there)."""
    builder = get_builder(name, data_dir=data_dir, manual_dir=manual_dir, **params)
    if builder.is_prepared():
        _warn_if_other_source(builder, manual_dir)
    else:
        builder.download_and_prepare()
    return builder


def _warn_if_other_source(builder: tfds.core.DatasetBuilder, manual_dir: Any) -> None:
    # tfds reuses a prepared dataset whatever files are offered now: say so when they differ.
    built_from = (builder.info.metadata or {}).get("source", {}).get("manual_dir")
    if manual_dir is None or built_from is None:
        return
    if Path(manual_dir).expanduser().absolute() != Path(built_from):
        log.warning(
            "%s in %s was built from %s; manual_dir %s is not read. Delete that directory (or "
            "use another data_dir) to build from the new files.",
            builder.name,
            builder.data_dir,
            built_from,
            manual_dir,
        )


def data_source(
    name: str,
    split: str,
    *,
    data_dir: str | Path,
    manual_dir: str | Path | None = None,
    **params: Any,
) -> Sequence[Any]:
    """A random-access source of one split, building the dataset first if needed."""
    builder = prepare(name, data_dir=data_dir, manual_dir=manual_dir, **params)
    splits = sorted(builder.info.splits)
    if split.split("[", 1)[0] not in splits:
        raise ValueError(
            f"{name} has no split {split!r}; it has {', '.join(splits)} (a manual_dir dataset "
            "has only the splits whose files were found)"
        )
    return builder.as_data_source(split)
