"""What the research experiments measure on a policy's completions (host side, no jax).

Per completion of an arithmetic-chain problem:

  correct       the ``arithmetic`` verifier accepts the final answer
  with_steps    the think block has at least one ``a op b = c`` line
  process_ok    exactly the problem's steps, all right, in order (`arithmetic.process_correct`)
  wrong_step    at least one written step line is wrong (`arithmetic.check_steps`)
  step_score    the process reward: right step lines / max(gold steps, lines written)
  well_formed   readable: the think block is nothing but "Step i: a op b = c" lines numbered
                1, 2, ... (at least one), closed by </think>, then exactly one integer answer
  length        completion length in tokens (when a token counter is given)

`completion_stats` turns a list of completions into means; ratios that need a denominator are
returned as their numerator and denominator means too (``frac_correct_wrong_step`` and
``frac_correct``), so that means over chunks of different sizes stay exact, and `ratios` derives
the conditional figures (e.g. the share of correct answers reached through a wrong step).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from rl_reason.tasks import arithmetic, templates
from rl_reason.verifiers.arithmetic import verify_arithmetic
from rl_reason.verifiers.arithmetic_process import process_score

_NUMBERED_STEP = re.compile(r"Step (\d+): (-?\d+) ([-+*]) (-?\d+) = (-?\d+)")
_FINAL = re.compile(
    rf"\n?{re.escape(templates.THINK_CLOSE)}\n?{re.escape(templates.ANSWER_OPEN)}-?\d+"
    rf"{re.escape(templates.ANSWER_CLOSE)}\s*"
)


def well_formed(response: str) -> bool:
    """A readable step list: only numbered step lines in the think block, then one answer.

    This judges the layout, not the arithmetic: ``Step 1: 2 + 2 = 5`` is well formed.
    """
    think_end = response.find(templates.THINK_CLOSE)
    if think_end < 0:
        return False
    lines = response[:think_end].strip("\n").split("\n")
    for i, line in enumerate(lines, start=1):
        m = _NUMBERED_STEP.fullmatch(line)
        if m is None or int(m[1]) != i:
            return False
    return _FINAL.fullmatch(response[think_end:]) is not None


def judge(response: str, example: Mapping[str, Any]) -> dict[str, bool | float]:
    """The per-completion judgements of the module docstring (except length)."""
    checks = arithmetic.check_steps(response, example)
    return {
        "correct": verify_arithmetic(response, example).correct,
        "with_steps": bool(checks),
        "process_ok": arithmetic.process_correct(response, example),
        "wrong_step": not all(checks),
        "step_score": process_score(response, example),
        "well_formed": well_formed(response),
    }


def completion_stats(
    texts: Sequence[str],
    examples: Sequence[Mapping[str, Any]],
    count_tokens: Callable[[str], int] | None = None,
) -> dict[str, float]:
    """Means over completions (see the module docstring); ``examples[i]`` is text i's problem.

    Keys: frac_correct, frac_with_steps, frac_process_correct, frac_well_formed, step_score,
    frac_correct_wrong_step (correct and through a wrong step), frac_correct_not_process
    (correct but not process-correct), frac_right_steps_wrong_answer (exactly the right steps,
    then a wrong or missing final answer), and with `count_tokens` also length_mean,
    wrong_length_x_frac (mean of length * wrong) and frac_wrong.
    """
    if len(texts) != len(examples):
        raise ValueError(f"{len(texts)} texts but {len(examples)} examples")
    if not texts:
        raise ValueError("completion_stats needs at least one completion")
    rows = [judge(t, ex) for t, ex in zip(texts, examples, strict=True)]
    col = {k: np.asarray([r[k] for r in rows], np.float64) for k in rows[0]}
    stats = {
        "frac_correct": col["correct"].mean(),
        "frac_with_steps": col["with_steps"].mean(),
        "frac_process_correct": col["process_ok"].mean(),
        "frac_well_formed": col["well_formed"].mean(),
        "step_score": col["step_score"].mean(),
        "frac_correct_wrong_step": (col["correct"] * col["wrong_step"]).mean(),
        "frac_correct_not_process": (col["correct"] * (1 - col["process_ok"])).mean(),
        "frac_right_steps_wrong_answer": ((1 - col["correct"]) * col["process_ok"]).mean(),
    }
    if count_tokens is not None:
        length = np.asarray([count_tokens(t) for t in texts], np.float64)
        wrong = 1.0 - col["correct"]
        stats.update(
            length_mean=length.mean(),
            wrong_length_x_frac=(length * wrong).mean(),
            frac_wrong=wrong.mean(),
        )
    return {k: float(v) for k, v in stats.items()}


def _div(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def ratios(stats: Mapping[str, float]) -> dict[str, float]:
    """Conditional figures from `completion_stats` means (NaN when the condition never held).

    wrong_step_given_correct: share of correct answers reached through at least one wrong step.
    not_process_given_correct: share of correct answers whose steps are not exactly right.
    wrong_length_mean: mean length of the wrong answers (needs the length keys).
    """
    out = {
        "wrong_step_given_correct": _div(stats["frac_correct_wrong_step"], stats["frac_correct"]),
        "not_process_given_correct": _div(stats["frac_correct_not_process"], stats["frac_correct"]),
    }
    if "wrong_length_x_frac" in stats:
        out["wrong_length_mean"] = _div(stats["wrong_length_x_frac"], stats["frac_wrong"])
    return out


def stats_with_ratios(
    count_tokens: Callable[[str], int] | None = None,
) -> Callable[[list[str], list[dict]], dict[str, float]]:
    """A `response_stats` / `rollout_stats` hook for the trainer: means and their ratios."""

    def fn(texts: list[str], examples: list[dict]) -> dict[str, float]:
        stats = completion_stats(texts, examples, count_tokens)
        return {**stats, **ratios(stats)}

    return fn
