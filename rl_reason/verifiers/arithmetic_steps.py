"""Step checks for arithmetic chains: the ``a op b = c`` lines a policy writes in its reasoning.

Used by the ``arithmetic_process`` verifier and the process measures
(`rl_reason.pipelines.research`);
problems are `rl_reason.tasks.arithmetic` dicts with ``steps`` as (a, op, b, result) tuples.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from rl_reason.verifiers.answer_extraction import THINK_OPEN, think_block

Step = tuple[int, str, int, int]  # (a, op, b, result): result = a op b


def apply_op(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


# "a op b = c", optionally after a label such as "Step 2:"; a trailing period is allowed.
_STEP_LINE = re.compile(
    r"\s*(?:[A-Za-z]+\s*\d*\s*:\s*)?(-?\d+)\s*([-+*])\s*(-?\d+)\s*=\s*(-?\d+)\s*\.?\s*"
)


def parse_steps(response: str) -> list[Step]:
    """The ``a op b = c`` lines of the think block of `response`, in order.

    `response` is the policy's completion (a full prompt+completion also works, see
    `templates.think_block`). Lines of any other shape are ignored.
    """
    return [step for _, step in step_lines(response)]


def step_lines(response: str) -> list[tuple[int, Step]]:
    """`parse_steps` with each line's end: the offset in `response` just past the line's text
    (before its newline), for crediting a step's score to the tokens that wrote it."""
    block = think_block(response)
    # think_block's text is a slice of response: its start is the last <think>'s end, or 0.
    start = response.rfind(THINK_OPEN)
    offset = 0 if start < 0 else start + len(THINK_OPEN)
    steps = []
    for line in block.split("\n"):
        m = _STEP_LINE.fullmatch(line)
        if m:
            end = offset + len(line.rstrip())
            steps.append((end, (int(m[1]), m[2], int(m[3]), int(m[4]))))
        offset += len(line) + 1
    return steps


def check_arithmetic(response: str) -> list[bool]:
    """Per step line: is ``a op b = c`` true, whatever the problem?"""
    return [apply_op(a, op, b) == c for a, op, b, c in parse_steps(response)]


def check_steps(response: str, problem: Mapping[str, Any]) -> list[bool]:
    """Per step line: is it the right step at its position in this problem's chain?

    Line i is right iff it is arithmetically true, uses step i's operator and operand, and
    starts from the true value before step i (the start number, or step i-1's true result).
    Lines past the end of the chain are wrong. A skipped or reordered step therefore makes that
    line and the ones after it wrong.
    """
    gold = [tuple(s) for s in problem["steps"]]
    return [i < len(gold) and step == gold[i] for i, step in enumerate(parse_steps(response))]


def count_steps(response: str) -> int:
    """Number of step lines in the think block."""
    return len(parse_steps(response))


def has_steps(response: str) -> bool:
    """Whether the think block has at least one step line (the "frac_with_steps" metric)."""
    return count_steps(response) > 0


def process_correct(response: str, problem: Mapping[str, Any]) -> bool:
    """Exactly the problem's steps, all right, in order, and nothing else that looks like one."""
    checks = check_steps(response, problem)
    return len(checks) == len(problem["steps"]) and all(checks)
