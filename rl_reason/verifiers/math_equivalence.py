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
# Sub-expressions below 10^SMALL_LOG10 in size are evaluated numerically for the size check.
SMALL_LOG10 = 15

_THIN_SPACE_IN_NUMBER = re.compile(r"(?<=\d)\\[,!; ](?=\d{3})")
# "1 000 000": digit groups of three after plain spaces are one number (SI style), not a
# product; a group must be exactly three digits, so "2 3" or "12 1000" are left alone.
_SPACED_DIGIT_GROUPS = re.compile(r"(?<![\d.])\d{1,3}(?: \d{3})+(?![\d.])")


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
    text = _SPACED_DIGIT_GROUPS.sub(lambda m: m.group().replace(" ", ""), text)
    return mv.parse(
        "\\boxed{" + text + "}", extraction_config=_latex_config(), parsing_timeout=None
    )


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    # A group of G samples shares one gold answer: parse it once per process.
    # Several distinct boxes ("\\boxed{2} and \\boxed{3}") are one answer with several parts:
    # all of them are the gold, as a list, never just the last one.
    boxes = list(dict.fromkeys(gold[start:end].strip() for start, end in boxed_spans(gold)))
    if boxes:
        gold = ", ".join(boxes)
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


def _numeric_log10(node: Any) -> float | None:
    """log10|value| of a sub-expression already known to be small, or None if not a number."""
    try:
        value = abs(complex(node.evalf(30)))
    except (TypeError, ValueError, ArithmeticError):
        return None
    if not math.isfinite(value):
        return None
    return -math.inf if value == 0 else math.log10(value)


def _pow_bound(base_node: Any, exponent_node: Any, worst: list[float]) -> float | None:
    base = _log10_bound(base_node, worst)
    exponent = _log10_bound(exponent_node, worst)
    if exponent is None:
        return None
    if exponent > SMALL_LOG10:
        return math.inf
    # The exponent is below 10^15: its value, not a bound on its size, decides (10^{-0.23} is
    # below 1; a bound would call it astronomically large), and likewise a small base.
    e = _numeric_value(exponent_node)
    if e is None:
        e = 10**exponent
    if base is None:
        base = 1.0  # symbolic base: as if it were 10
    elif base <= SMALL_LOG10:
        base = _numeric_log10(base_node)
        if base is None:
            return None
        if base == -math.inf:
            return 0.0
    return abs(e) * base if e >= 0 or base > SMALL_LOG10 else e * base


def _numeric_value(node: Any) -> float | None:
    try:
        value = complex(node.evalf(30))
    except (TypeError, ValueError, ArithmeticError):
        return None
    if not (math.isfinite(value.real) and math.isfinite(value.imag)):
        return None
    return value.real if value.imag == 0 else abs(value)


def _log10_bound(node: Any, worst: list[float]) -> float | None:
    """An upper bound on log10|value| of a numeric sympy expression; None when not numeric.

    ``worst[0]`` collects the largest |bound| of any sub-expression: a tiny intermediate such
    as 10^{-10^{9}} is as costly to compute exactly as a huge one.
    """
    bound = _node_bound(node, worst)
    if bound is not None and math.isfinite(bound):
        worst[0] = max(worst[0], abs(bound))
    elif bound is not None and bound == math.inf:
        worst[0] = math.inf
    return bound


def _node_bound(node: Any, worst: list[float]) -> float | None:
    import sympy

    if isinstance(node, sympy.Integer):
        return abs(int(node)).bit_length() * math.log10(2)
    if isinstance(node, sympy.Rational):
        return max(abs(node.p), abs(node.q)).bit_length() * math.log10(2)
    if isinstance(node, sympy.Float):
        mantissa_exp = node._mpf_[2] + node._mpf_[3]
        return abs(mantissa_exp) * math.log10(2)
    if isinstance(node, sympy.Pow):
        return _pow_bound(node.args[0], node.args[1], worst)
    if isinstance(node, sympy.factorial):
        n = _log10_bound(node.args[0], worst)
        if n is None:
            return None
        if n > SMALL_LOG10:
            return math.inf
        value = _numeric_value(node.args[0])
        value = 10**n if value is None else max(value, 0.0)
        return math.lgamma(value + 1) / math.log(10)
    if not node.args:
        return None
    bounds = [_log10_bound(arg, worst) for arg in node.args]
    known = [b for b in bounds if b is not None]
    if not known:
        return None
    return sum(known) + 1 if isinstance(node, sympy.Mul) else max(known) + 1


def _too_large(parsed: list) -> bool:
    import sympy

    for item in parsed:
        if isinstance(item, sympy.Basic):
            worst = [0.0]
            _log10_bound(item, worst)
            if worst[0] > MAX_DIGITS:
                return True
    return False


def _several_parts(parsed: list) -> bool:
    import sympy

    return bool(parsed) and isinstance(parsed[0], sympy.FiniteSet) and len(parsed[0]) > 1


def _check(gold: str, answers: tuple[str, ...]) -> VerifyResult:
    gold_parsed = _parse_gold(gold)
    mv = _math_verify()
    all_match = True
    for answer in answers:
        parsed = _parse_boxed(answer)
        if not parsed:
            return reject("unparsable answer")
        if _too_large(parsed):
            return reject("answer too large to compare")
        if not mv.verify(gold_parsed, parsed, timeout_seconds=None):
            all_match = False
            break
    if all_match:
        return accept()
    if len(answers) == 1:
        return reject("wrong answer")
    # A gold with several parts (a set, or several boxes) may be answered one box per part:
    # then the boxes together must be exactly that set. Any other gold makes them a hedge.
    if _several_parts(gold_parsed):
        joined = _parse_boxed(", ".join(answers))
        if joined and not _too_large(joined):
            if mv.verify(gold_parsed, joined, timeout_seconds=None):
                return accept()
    return reject("several different final answers")


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
