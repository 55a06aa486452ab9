"""The ``countdown`` verifier: an arithmetic expression over given numbers that hits a target.

example: ``{"numbers": [25, 3, 7, 50], "target": 69}``.

The final answer (anchored, see ``answer_extraction``; every distinct one must be right) must be
an expression of integers, binary ``+ - * /`` (also written ``− × · ÷`` or ``\\times \\cdot
\\div``) and parentheses, and nothing else: no ``= 69``, no unary minus, no ``**``, ``//``, ``%``,
names or calls. Line breaks inside the expression are spaces. Each given number must be used
exactly as many times as it is given.

Nothing is ever passed to ``eval``: the text is filtered to those characters, parsed with
``ast.parse`` (which refuses more than 200 nested parentheses in constant time) and the tree is
walked with an allow-list of node types, then evaluated exactly with ``Fraction``. Division by
zero and intermediate values above ``MAX_INTERMEDIATE_BITS`` are not correct, so nothing can hang.
"""

from __future__ import annotations

import ast
import collections
import operator
import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from rl_reason.verifiers.answer_extraction import final_answers
from rl_reason.verifiers.result import VerifyResult, accept, reject

MAX_EXPRESSION_CHARS = 1000
MAX_DISTINCT_ANSWERS = 4
MAX_INTERMEDIATE_BITS = 4096

_SPELLINGS = (
    ("\\times", "*"),
    ("\\cdot", "*"),
    ("\\div", "/"),
    ("−", "-"),
    ("×", "*"),
    ("·", "*"),
    ("÷", "/"),
    ("\\left", ""),
    ("\\right", ""),
)
_ALLOWED_CHARS = re.compile(r"^[0-9+\-*/()\s]*$")
_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_OPERATOR_NAMES = {ast.Pow: "**", ast.FloorDiv: "//", ast.Mod: "%", ast.MatMult: "@"}


class _Invalid(Exception):
    pass


def _validated(example: Mapping[str, Any]) -> tuple[list[int], int]:
    try:
        numbers = [int(n) for n in example["numbers"]]
        target = int(example["target"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            "countdown: example needs 'numbers' (a list of integers) and 'target' (an integer), "
            f"got {dict(example)!r}"
        ) from e
    return numbers, target


def _literals_and_value(node: ast.AST) -> tuple[list[int], Fraction]:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return [node.value], Fraction(node.value)
    if isinstance(node, ast.BinOp):
        op = _OPERATORS.get(type(node.op))
        if op is None:
            name = _OPERATOR_NAMES.get(type(node.op), type(node.op).__name__)
            raise _Invalid(f"operator {name} is not allowed")
        left_literals, left = _literals_and_value(node.left)
        right_literals, right = _literals_and_value(node.right)
        if op is operator.truediv and right == 0:
            raise _Invalid("division by zero")
        value = op(left, right)
        if (
            max(value.numerator.bit_length(), value.denominator.bit_length())
            > MAX_INTERMEDIATE_BITS
        ):
            raise _Invalid("intermediate value too large")
        return left_literals + right_literals, value
    if isinstance(node, ast.UnaryOp):
        raise _Invalid("unary operators are not allowed")
    raise _Invalid(f"{type(node).__name__} is not allowed")


def check_expression(expression: str, numbers: list[int], target: int) -> VerifyResult:
    """Checks one countdown expression (already extracted from the response)."""
    for spelling, symbol in _SPELLINGS:
        expression = expression.replace(spelling, symbol)
    if len(expression) > MAX_EXPRESSION_CHARS:
        return reject("expression too long")
    if not _ALLOWED_CHARS.match(expression):
        return reject("only integers, + - * / and parentheses are allowed")
    # One expression may be written over several lines; Python would end it at a line break
    # outside parentheses, so line breaks are only spaces here.
    expression = " ".join(expression.split())
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return reject("not a valid expression")
    try:
        literals, value = _literals_and_value(tree.body)
    except _Invalid as e:
        return reject(str(e))
    except RecursionError:
        return reject("expression nested too deeply")
    if collections.Counter(literals) != collections.Counter(numbers):
        return reject("numbers must be used exactly as given")
    if value != target:
        return reject("wrong value")
    return accept()


def verify_countdown(response: str, example: Mapping[str, Any]) -> VerifyResult:
    """Checks ``response`` against ``example`` (see the module docstring)."""
    numbers, target = _validated(example)
    extraction = final_answers(response)
    if not extraction.answers:
        return reject(extraction.reason)
    if len(extraction.answers) > MAX_DISTINCT_ANSWERS:
        return reject("several different final answers")
    for answer in extraction.answers:
        result = check_expression(answer, numbers, target)
        if not result.correct:
            if len(extraction.answers) > 1:
                return reject(f"several different final answers ({result.reason})")
            return result
    return accept()
