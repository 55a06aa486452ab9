"""The ``arithmetic`` verifier, for the synthetic task: an exact integer in ``<answer>`` tags.

example: ``{"answer": "42"}`` (or the int 42).

Only ``<answer>...</answer>`` blocks after the reasoning count (``\\boxed`` does not); their
stripped content must be an integer written with ASCII digits and an optional leading minus, equal
to the gold value. A missing or empty block, several different answers or anything that is not an
integer ("42.0", "forty-two", "x = 42") is not correct.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from rl_reason.verifiers.answer_extraction import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    answer_region,
    tag_spans,
)
from rl_reason.verifiers.result import VerifyResult, accept, reject

_INTEGER = re.compile(r"^-?[0-9]{1,1000}$")


def _gold(example: Mapping[str, Any]) -> int:
    gold = example.get("answer") if isinstance(example, Mapping) else None
    if isinstance(gold, bytes):  # tfds text features
        gold = gold.decode("utf-8", "replace")
    if isinstance(gold, bool):
        gold = None
    elif not isinstance(gold, str | int) and hasattr(gold, "__index__"):  # numpy integers
        gold = gold.__index__()
    if isinstance(gold, str) and _INTEGER.match(gold.strip()):
        return int(gold.strip())
    if isinstance(gold, int):
        return gold
    raise ValueError(f"arithmetic: example needs an integer 'answer', got {example!r}")


def verify_arithmetic(response: str, example: Mapping[str, Any]) -> VerifyResult:
    """Checks ``response`` against ``example["answer"]`` (see the module docstring)."""
    gold = _gold(example)
    region = answer_region(response)
    if region is None:
        return reject("no final answer after the reasoning")
    contents = {region[s:e].strip() for s, e in tag_spans(region, ANSWER_OPEN, ANSWER_CLOSE)}
    if not contents:
        return reject("no <answer> block")
    if "" in contents:
        return reject("empty answer")
    if not all(_INTEGER.match(c) for c in contents):
        return reject("answer is not an integer")
    values = {int(c) for c in contents}
    if len(values) > 1:
        return reject("several different final answers")
    return accept() if values == {gold} else reject("wrong answer")
