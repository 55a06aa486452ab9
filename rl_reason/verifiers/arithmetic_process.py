"""The ``arithmetic_process`` verifier: a perfect process reward model for arithmetic chains.

example: an `rl_reason.tasks.arithmetic` problem, ``{"answer": "20", "steps": [(17, "+", 8, 25),
(25, "-", 5, 20)], ...}``, optionally with ``"process_weight": w`` in [0, 1] (default 1).

Every step line of the think block is judged by `arithmetic_steps.check_steps` (right
operation, right operand, right value before and after, at its position in the chain). The
process score is

    (number of right step lines) / max(number of gold steps, number of step lines written)

so a missing step, a wrong one and an extra one each cost the same share, and a response that
writes no steps scores 0. The reward is ``(1 - w) * outcome + w * process`` with ``outcome`` the
``arithmetic`` verifier's reward: w = 1 is process supervision alone, 0 < w < 1 a weighted sum
of both. ``correct`` is always the outcome verdict (the final answer), so accuracy means the
same whatever the reward.

``steps`` holds each step line's end in the response and its verdict (1.0 right at its
position in the chain, 0.0 otherwise): the step-level rewards that `loss.process_weight`
credits to each step's own tokens (DeepSeekMath's process supervision). With w = 0 the scalar
reward is the outcome alone and the steps carry the process signal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rl_reason.verifiers.arithmetic import verify_arithmetic
from rl_reason.verifiers.arithmetic_steps import check_steps, step_lines
from rl_reason.verifiers.result import VerifyResult


def _gold_steps(example: Mapping[str, Any]) -> list[tuple]:
    steps = example.get("steps") if isinstance(example, Mapping) else None
    if not steps or not all(len(s) == 4 for s in steps):
        raise ValueError(
            "arithmetic_process: example needs 'steps', a non-empty list of (a, op, b, result) "
            f"as made by rl_reason.tasks.arithmetic.generate_problem; got {example!r}"
        )
    return [tuple(s) for s in steps]


def _weight(example: Mapping[str, Any]) -> float:
    w = example.get("process_weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, int | float) or not 0.0 <= w <= 1.0:
        raise ValueError(f"arithmetic_process: process_weight must be in [0, 1], got {w!r}")
    return float(w)


def process_score(response: str, example: Mapping[str, Any]) -> float:
    """The fraction of right steps (see the module docstring), in [0, 1]."""
    gold = _gold_steps(example)
    checks = check_steps(response, {"steps": gold})
    return sum(checks) / max(len(gold), len(checks))


def verify_arithmetic_process(response: str, example: Mapping[str, Any]) -> VerifyResult:
    """``(1 - w) * outcome + w * process`` with ``correct`` = the outcome verdict."""
    w = _weight(example)
    score = process_score(response, example)
    outcome = verify_arithmetic(response, example)
    reward = (1.0 - w) * outcome.reward + w * score
    gold = _gold_steps(example)
    lines = step_lines(response)
    steps = tuple(
        (end, float(i < len(gold) and step == gold[i])) for i, (end, step) in enumerate(lines)
    )
    return VerifyResult(
        reward=float(reward),
        correct=outcome.correct,
        reason=f"{outcome.reason}; steps right {score:.2f}",
        steps=steps,
    )
