"""The ``gsm8k`` verifier: one number, compared exactly.

example: ``{"answer": gold}`` with gold in GSM8K's form (a solution ending in ``#### 1,234``; the
text after the last ``####`` counts) or a bare number (string or int).

Extraction (anchored, see ``answer_extraction``): the final answers are ``<answer>...</answer>``
blocks, ``\\boxed{...}`` groups and ``#### N`` lines after the reasoning; every distinct one must be
right. A ``####`` line whose text does not start like a number is a Markdown heading, not an
answer line. Each must be a single number, optionally with a currency sign before it and unit words
after it: "$1,234.50", "18 dollars", "\\$18", "50%", "7/2", "-3". Accepted normalisations:
thousands separators (commas, spaces or thin spaces, only in groups of three and the same one
throughout: "1,5" is not a number), the Unicode minus ("−18"), Markdown bold ("**18**"),
currency ($ € £ ¥ ₹, LaTeX ``\\$``), ``\\text{}``/``\\mathrm{}`` wrappers, thin spaces, a
trailing full stop, ``\\frac{a}{b}``. Anything else ("x = 18", "18 or 19", "She has 18
apples") is not a number.
Comparison is exact (Fraction), so 18.00 equals 18 but 17.999 does not.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from rl_reason.verifiers.answer_extraction import final_answers
from rl_reason.verifiers.math_equivalence import gold_text
from rl_reason.verifiers.result import VerifyResult, accept, reject

MAX_ANSWER_CHARS = 200
MAX_DISTINCT_ANSWERS = 4

_LATEX_WRAPPERS = re.compile(r"\\(?:text|mathrm|textbf|mathbf)\s*\{([^{}]*)\}")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(\d+)\s*\}")
_NUMBER = re.compile(
    r"""^(?P<sign>-)?\s*(?P<currency>[$€£¥₹])?\s*(?P<sign2>-)?
    (?P<number>[0-9]{1,3}(?:(?P<group>[, ])[0-9]{3})(?:(?P=group)[0-9]{3})*(?:\.[0-9]+)?
      |[0-9]+(?:\.[0-9]+)?|\.[0-9]+)
    (?:\s*/\s*(?P<denominator>[0-9]+))?
    \s*(?P<unit>%|[^\W\d_]+(?:[\s/.-]+[^\W\d_]+)*)?$""",
    re.VERBOSE,
)


# Signs written as the Unicode minus (U+2212) or its full-width and small forms.
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\uff0d": "-", "\ufe63": "-"})
# Markdown emphasis around an answer: "**18**", "__18__".
_EMPHASIS = re.compile(r"^(\*{1,2}|_{1,2})(.*)\1$")


def _normalise(text: str) -> str:
    text = text.translate(_MINUS_SIGNS).strip()
    emphasis = _EMPHASIS.match(text)
    if emphasis:
        text = emphasis.group(2)
    text = _LATEX_WRAPPERS.sub(r" \1 ", text)
    text = _LATEX_FRAC.sub(r"\1/\2", text)
    text = text.replace("\\$", "$").replace("\\%", "%").replace("{,}", ",")
    for space in ("\\,", "\\!", "\\;", "\\ ", "~", "\u2009", "\u202f", "\xa0"):
        text = text.replace(space, " ")
    text = text.strip()
    if text.endswith("."):
        text = text[:-1]
    return text.strip()


def parse_number(text: str) -> Fraction | None:
    """The number in an answer like "$1,234.50" or "18 dollars", else None."""
    if len(text) > MAX_ANSWER_CHARS:
        return None
    match = _NUMBER.match(_normalise(text))
    if match is None or (match["sign"] and match["sign2"]):
        return None
    value = Fraction(match["number"].replace(",", "").replace(" ", ""))
    if match["denominator"] is not None:
        if "." in match["number"] or int(match["denominator"]) == 0:
            return None
        value /= int(match["denominator"])
    return -value if (match["sign"] or match["sign2"]) else value


def gold_number(example: Mapping[str, Any]) -> Fraction:
    gold = gold_text(example, "gsm8k")
    if "####" in gold:
        gold = gold.rsplit("####", 1)[1]
    value = parse_number(gold)
    if value is None:
        raise ValueError(f"gsm8k: gold answer {gold.strip()!r} is not a number")
    return value


_NUMERIC_START = re.compile(r"^(?:\*{1,2}|_{1,2})?\s*(?:[-+\u2212$€£¥₹.0-9]|\\[$(\[]|\\[dt]?frac)")


def _looks_numeric(line: str) -> bool:
    """Whether a ``#### ...`` line is GSM8K's answer line rather than a Markdown heading
    ("#### Step 1: add", "#### Final Answer"): like GSM8K's own grader, its text starts with a
    number. A line that starts with one but is not a single number still counts, and fails."""
    return bool(_NUMERIC_START.match(line))


def verify_gsm8k(response: str, example: Mapping[str, Any]) -> VerifyResult:
    """Checks ``response`` against ``example["answer"]`` (see the module docstring)."""
    gold = gold_number(example)
    extraction = final_answers(response, hash_lines=_looks_numeric)
    if not extraction.answers:
        return reject(extraction.reason)
    if len(extraction.answers) > MAX_DISTINCT_ANSWERS:
        return reject("several different final answers")
    values = [parse_number(answer) for answer in extraction.answers]
    if any(value is None for value in values):
        return reject("final answer is not a single number")
    if any(value != gold for value in values):
        return reject("several different final answers" if len(set(values)) > 1 else "wrong answer")
    return accept()
