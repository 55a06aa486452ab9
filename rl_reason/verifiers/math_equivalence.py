"""The ``math`` verifier: anchored final answer, equivalence by math-verify.

example: ``{"answer": gold}`` where gold is LaTeX or plain text ("\\frac{1}{2}", "0.5", "[1, 2)",
"\\{1, 2\\}", "x^2+1", "\\text{Evelyn}"), optionally inside ``\\boxed{}``, or a number.

The final answer is extracted by the rules in ``answer_extraction`` (last ``\\boxed{}`` or
``<answer>`` block after the reasoning, every distinct final answer must be right). Its text is
parsed as one LaTeX expression (it is wrapped in ``\\boxed{}`` for math-verify), so free text inside
an answer does not get searched for a number: "<answer>The answer is 5</answer>" is not 5.

math-verify's own timeouts are signal.alarm based and only work in a main thread, and even there
they cannot interrupt a huge integer power computed in C. So:
- answers that would be slow to parse (too long, brackets nested too deep) or whose exact value
  is astronomically large (power towers, huge factorials) are rejected before sympy sees them;
- on a main thread the whole check runs under a SIGALRM deadline (``TIME_LIMIT_S``);
- in ``VerifierPool`` workers the pool kills and replaces a worker that overruns its timeout.
Off the main thread of a plain process nothing can interrupt the check: use the pool there.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import Any

from rl_reason.verifiers.answer_extraction import boxed_spans, final_answers
from rl_reason.verifiers.deadline import DeadlineExceeded, deadline
from rl_reason.verifiers.result import VerifyResult, accept, reject

TIME_LIMIT_S = 5.0
MAX_ANSWER_CHARS = 1000
# latex2sympy's parse time grows steeply with bracket nesting (about 0.5 s at 8 levels here).
MAX_BRACKET_DEPTH = 8
MAX_DISTINCT_ANSWERS = 4
# Exact values with more digits than this are not computed (9^{9^{9}} has ~370 million).
MAX_DIGITS = 100_000

_THIN_SPACE_IN_NUMBER = re.compile(r"(?<=\d)\\[,!; ](?=\d{3})")


def _math_verify():
    # Imported lazily: sympy takes ~1 s to import and the trainer process never needs it.
    import math_verify

    return math_verify


def _latex_config():
    mv = _math_verify()
    return [mv.LatexExtractionConfig(boxed_match_priority=0)]


def _parse_boxed(text: str) -> list:
    mv = _math_verify()
    text = _THIN_SPACE_IN_NUMBER.sub("", text)
    return mv.parse(
        "\\boxed{" + text + "}", extraction_config=_latex_config(), parsing_timeout=None
    )


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    # A group of G samples shares one gold answer: parse it once per process.
    boxes = boxed_spans(gold)
    if boxes:
        start, end = boxes[-1]
        gold = gold[start:end]
    parsed = _parse_boxed(gold)
    if not parsed:
        parsed = _math_verify().parse("$" + gold + "$", parsing_timeout=None)
    if not parsed:
        raise ValueError(f"math: gold answer {gold!r} cannot be parsed")
    return parsed


def _bracket_depth(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth = max(depth - 1, 0)
    return deepest


def _digits_bound(node: Any) -> float | None:
    """An upper bound on log10|value| of a numeric sympy expression; None when not numeric."""
    import sympy

    if isinstance(node, sympy.Integer):
        return abs(int(node)).bit_length() * math.log10(2)
    if isinstance(node, sympy.Rational):
        return max(abs(node.p), abs(node.q)).bit_length() * math.log10(2)
    if isinstance(node, sympy.Float):
        mantissa_exp = node._mpf_[2] + node._mpf_[3]
        return abs(mantissa_exp) * math.log10(2)
    if isinstance(node, sympy.Pow):
        base, exponent = (_digits_bound(arg) for arg in node.args)
        if exponent is None:
            return None
        if exponent > 15:
            return math.inf
        return (base if base is not None else 1.0) * 10**exponent
    if isinstance(node, sympy.factorial):
        n = _digits_bound(node.args[0])
        if n is None:
            return None
        return math.inf if n > 15 else 10**n * max(n, 1.0)
    if not node.args:
        return None
    bounds = [_digits_bound(arg) for arg in node.args]
    known = [b for b in bounds if b is not None]
    if not known:
        return None
    return sum(known) + 1 if isinstance(node, sympy.Mul) else max(known) + 1


def _too_large(parsed: list) -> bool:
    import sympy

    for item in parsed:
        if isinstance(item, sympy.Basic):
            bound = _digits_bound(item)
            if bound is not None and bound > MAX_DIGITS:
                return True
    return False


def _check(gold: str, answers: tuple[str, ...]) -> VerifyResult:
    gold_parsed = _parse_gold(gold)
    for answer in answers:
        parsed = _parse_boxed(answer)
        if not parsed:
            return reject("unparsable answer")
        if _too_large(parsed):
            return reject("answer too large to compare")
        if not _math_verify().verify(gold_parsed, parsed, timeout_seconds=None):
            return reject("several different final answers" if len(answers) > 1 else "wrong answer")
    return accept()


def gold_text(example: Mapping[str, Any], name: str) -> str:
    if "answer" not in example:
        raise ValueError(f"{name}: example needs an 'answer' field, got keys {sorted(example)}")
    gold = example["answer"]
    if isinstance(gold, bytes):  # tfds text features
        gold = gold.decode()
    elif not isinstance(gold, bool | str | int | float) and hasattr(gold, "__index__"):
        gold = gold.__index__()  # numpy integers
    if isinstance(gold, bool) or not isinstance(gold, str | int | float):
        raise ValueError(
            f"{name}: 'answer' must be a string or a number, got {type(gold).__name__}"
        )
    return str(gold)


def verify_math(response: str, example: Mapping[str, Any]) -> VerifyResult:
    """Checks ``response`` against ``example["answer"]`` (see the module docstring)."""
    gold = gold_text(example, "math")
    extraction = final_answers(response)
    if not extraction.answers:
        return reject(extraction.reason)
    if len(extraction.answers) > MAX_DISTINCT_ANSWERS:
        return reject("several different final answers")
    for answer in extraction.answers:
        if len(answer) > MAX_ANSWER_CHARS:
            return reject("answer too long")
        if _bracket_depth(answer) > MAX_BRACKET_DEPTH:
            return reject("answer nested too deeply")
    # math-verify logs a warning per call when its own timeouts are off; ours replace them.
    _quiet_math_verify_logs()
    try:
        with deadline(TIME_LIMIT_S):
            return _check(gold, extraction.answers)
    except DeadlineExceeded:
        return reject("timeout")


@functools.cache
def _quiet_math_verify_logs() -> None:
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
