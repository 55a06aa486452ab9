"""The ``format`` verifier: the R1-Zero ``<think>...</think><answer>...</answer>`` structure.

Our prompt template ends with an opening ``<think>``, so the response normally starts inside the
think block; a response that repeats the opening ``<think>`` (optionally after whitespace) is
accepted as well. Reward 1.0 iff, after that optional opening tag:

- the reasoning contains no other think/answer tag and is closed by exactly one ``</think>``;
- only whitespace separates ``</think>`` from exactly one ``<answer>...</answer>`` block whose
  content is not blank;
- only whitespace follows ``</answer>``.

This checks structure only; correctness is the other verifiers' job.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rl_reason.verifiers.answer_extraction import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN
from rl_reason.verifiers.result import VerifyResult, accept, reject

_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)


def verify_format(response: str, example: Mapping[str, Any] | None = None) -> VerifyResult:
    """Scores the structure of ``response``; ``example`` is ignored."""
    del example  # the structure does not depend on the problem
    text = response.lstrip()
    if text.startswith(THINK_OPEN):
        text = text[len(THINK_OPEN) :]
    reasoning, sep, rest = text.partition(THINK_CLOSE)
    if not sep:
        return reject("no </think>")
    if any(tag in reasoning for tag in _TAGS):
        return reject("tags inside the reasoning")
    rest = rest.lstrip()
    if not rest.startswith(ANSWER_OPEN):
        return reject("no <answer> right after </think>")
    answer, sep, tail = rest[len(ANSWER_OPEN) :].partition(ANSWER_CLOSE)
    if not sep:
        return reject("unclosed <answer>")
    if any(tag in answer for tag in _TAGS):
        return reject("tags inside the answer")
    if not answer.strip():
        return reject("empty answer")
    if tail.strip():
        return reject("text after </answer>")
    return accept()
