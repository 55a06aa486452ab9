"""A step checker for arithmetic chains that reads the think block the way a marker would.

The strict checker (`rl_reason.verifiers.arithmetic_steps.check_steps`, behind the process
reward and the older ``frac_*`` measures) wants the one canonical chain: line i must be exactly
``v_{i-1} op_i b_i = v_i``. A commuted ``8 + 17 = 25`` is wrong there, a retried step shifts
every later line out of position (so they are all wrong), and prose is never seen. Measuring
"wrong steps" with it counts form, not errors. Here:

  step line   ``[Wait.] [Label:] a op b = c [.]``, any spacing, any case. ``Step i:`` makes it
              an attempt at step i; a line without that label attempts the step after the
              previous attempt (step 1 at first). Any other label is read as no label, as the
              strict parser reads it.
  retry       a later attempt at step i replaces the earlier one: the last attempt counts. A
              wrong attempt replaced by a right one is a repair, a right one replaced by a wrong
              one a harm.
  prose       any other non-blank line: tolerated and counted, never judged.

An attempt is right when its arithmetic is true and either

  on chain    it is the problem's step i in an equivalent form: op_i on (v_{i-1}, b_i), or on
              (b_i, v_{i-1}) when op_i is + or *; or
  grounded    wherever it stands, each operand is a number of the problem (the start, an
              operand, a value of the true chain) or the result of an earlier attempt that was
              right when written: a true computation on known numbers (a detour, or the chain
              in another order).

Otherwise it is wrong: false arithmetic, or an operand that came from nowhere, such as the
result of an earlier wrong step carried on. Every line the strict parser reads as a step is a
step line here too, and every step the strict checker calls right is right here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from rl_reason.verifiers.answer_extraction import think_block
from rl_reason.verifiers.arithmetic_steps import apply_op

Step = tuple[int, str, int, int]  # (a, op, b, c) as written: "a op b = c"

ON_CHAIN, GROUNDED, WRONG = "on_chain", "grounded", "wrong"

# Eighteen digits at most: a longer number is prose (and int() of thousands of digits raises).
_NUM = r"-?\d{1,18}"
_STEP_LINE = re.compile(
    r"\s*(?:wait\s*[.,!:;]?\s*)?"
    r"(?:(?P<label>[a-z]+)\s*(?P<index>\d{1,6})?\s*:\s*)?"
    rf"(?P<a>{_NUM})\s*(?P<op>[-+*])\s*(?P<b>{_NUM})\s*=\s*(?P<c>{_NUM})\s*\.?\s*",
    re.IGNORECASE,
)


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One step line: the step it attempts (1-based), what it says, and its verdict."""

    index: int
    step: Step
    verdict: str  # ON_CHAIN, GROUNDED or WRONG
    line: int  # 0-based line of the think block

    @property
    def right(self) -> bool:
        return self.verdict != WRONG


@dataclasses.dataclass(frozen=True)
class StepReport:
    """What a completion's think block says, step by step (see the module docstring).

    ``final`` holds the last attempt at each step, by step index; ``last`` is the last step line
    written (its result is "the chain's last value").
    """

    final: tuple[Attempt, ...]
    last: Attempt | None
    attempts: int
    repairs: int
    harms: int
    prose_lines: int

    @property
    def wrote_steps(self) -> bool:
        return self.attempts > 0

    @property
    def retries(self) -> int:
        return self.attempts - len(self.final)

    @property
    def wrong_step(self) -> bool:
        """Some step's last attempt is wrong."""
        return any(not a.right for a in self.final)

    def verdicts(self) -> dict[int, str]:
        return {a.index: a.verdict for a in self.final}

    def chain_right(self, n_steps: int) -> bool:
        """The last attempts are exactly steps 1..n, each on chain: the process, retries
        allowed, in any valid form."""
        return [a.index for a in self.final] == list(range(1, n_steps + 1)) and all(
            a.verdict == ON_CHAIN for a in self.final
        )


def parse_line(line: str) -> tuple[int | None, Step] | None:
    """(step index from a ``Step i:`` label or None, the step) for a step line, else None."""
    m = _STEP_LINE.fullmatch(line)
    if m is None:
        return None
    index = None
    if m["label"] is not None and m["label"].lower() == "step" and m["index"] is not None:
        index = int(m["index"])
    return index, (int(m["a"]), m["op"], int(m["b"]), int(m["c"]))


def _judge(index: int, step: Step, gold: list[tuple], known: set[int]) -> str:
    a, op, b, c = step
    if apply_op(a, op, b) != c:
        return WRONG
    if 1 <= index <= len(gold):
        v, gold_op, gold_b, _ = gold[index - 1]
        if op == gold_op and ((a, b) == (v, gold_b) or (op in "+*" and (a, b) == (gold_b, v))):
            return ON_CHAIN
    return GROUNDED if a in known and b in known else WRONG


def problem_numbers(problem: Mapping[str, Any]) -> set[int]:
    """The start, every operand and every value of the true chain."""
    steps = [tuple(s) for s in problem["steps"]]
    return {steps[0][0]} | {s[2] for s in steps} | {s[3] for s in steps}


def read_steps(response: str, problem: Mapping[str, Any]) -> StepReport:
    """Every step line of `response`'s think block judged against `problem` (an
    `rl_reason.tasks.arithmetic` dict with ``steps``)."""
    gold = [tuple(s) for s in problem["steps"]]
    known = problem_numbers(problem)
    final: dict[int, Attempt] = {}
    last: Attempt | None = None
    attempts = repairs = harms = prose = 0
    for number, line in enumerate(think_block(response).split("\n")):
        if not line.strip():
            continue
        parsed = parse_line(line)
        if parsed is None:
            prose += 1
            continue
        label, step = parsed
        index = label if label is not None else (last.index + 1 if last is not None else 1)
        attempt = Attempt(index, step, _judge(index, step, gold, known), number)
        earlier = final.get(index)
        if earlier is not None:
            repairs += not earlier.right and attempt.right
            harms += earlier.right and not attempt.right
        if attempt.right:
            known.add(step[3])
        final[index] = last = attempt
        attempts += 1
    return StepReport(
        final=tuple(final[i] for i in sorted(final)),
        last=last,
        attempts=attempts,
        repairs=repairs,
        harms=harms,
        prose_lines=prose,
    )
