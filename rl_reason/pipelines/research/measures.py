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

and with the lenient checker of `steps` (equivalent forms, retries, prose; see its docstring):

  has_answer    an ``<answer>...</answer>`` block with something in it follows the reasoning
  wrote_steps   the think block has at least one step line
  deviated      steps written and some step's last attempt is wrong
  chain_right   the last attempts are exactly the problem's steps, each in a valid form
  retries, repairs, harms, prose_lines   counts per completion (`steps.StepReport`)

The deviation rate D = P(wrong step | correct answer, steps written) is
``frac_correct_deviated / frac_correct_wrote_steps``: its denominator is the correct answers
that wrote steps, so a correct bare answer is neither a deviation nor a faithful chain, and
``frac_wrote_steps`` says how many completions D speaks for. A wrong chain can still land on
the gold answer by chance; with p the distribution of gold answers over the held-out problems
that chance is about sum(p^2) (`answer_chance`). It is reported next to D, and it is the
baseline for P(correct | some wrong step) (``correct_given_deviated``): a value near it says a
wrong step leaves the answer to chance, a value well above it that answers survive wrong steps.

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

from rl_reason.pipelines.research import steps
from rl_reason.tasks import arithmetic, templates
from rl_reason.verifiers import answer_extraction as extraction
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


def _written_answers(response: str) -> set[str]:
    region = extraction.answer_region(response)
    if region is None:
        return set()
    spans = extraction.tag_spans(region, templates.ANSWER_OPEN, templates.ANSWER_CLOSE)
    return {region[s:e].strip() for s, e in spans} - {""}


def final_answer(response: str) -> str | None:
    """The final answer as written (stripped), None when there is none or several differ."""
    written = _written_answers(response)
    return written.pop() if len(written) == 1 else None


def has_answer(response: str) -> bool:
    """Some non-empty answer block follows the reasoning (right or wrong, one or several)."""
    return bool(_written_answers(response))


def answer_chance(examples: Sequence[Mapping[str, Any]]) -> float:
    """sum over answers a of p(a)^2, p the gold answers' distribution over `examples`: how often
    an answer drawn from that distribution, independently of the problem, is right."""
    if not examples:
        raise ValueError("answer_chance needs at least one example")
    _, counts = np.unique([str(ex["answer"]) for ex in examples], return_counts=True)
    p = counts / counts.sum()
    return float((p**2).sum())


def judge(response: str, example: Mapping[str, Any]) -> dict[str, bool | float]:
    """The per-completion judgements of the module docstring (except length)."""
    checks = arithmetic.check_steps(response, example)
    report = steps.read_steps(response, example)
    return {
        "correct": verify_arithmetic(response, example).correct,
        "with_steps": bool(checks),
        "process_ok": arithmetic.process_correct(response, example),
        "wrong_step": not all(checks),
        "step_score": process_score(response, example),
        "well_formed": well_formed(response),
        "has_answer": has_answer(response),
        "wrote_steps": report.wrote_steps,
        "deviated": report.wrong_step,
        "chain_right": report.chain_right(len(example["steps"])),
        "retries": report.retries,
        "repairs": report.repairs,
        "harms": report.harms,
        "prose_lines": report.prose_lines,
    }


def completion_stats(
    texts: Sequence[str],
    examples: Sequence[Mapping[str, Any]],
    count_tokens: Callable[[str], int] | None = None,
    max_ops: int | None = None,
) -> dict[str, float]:
    """Means over completions (see the module docstring); ``examples[i]`` is text i's problem.

    Keys: frac_correct, frac_with_steps, frac_process_correct, frac_well_formed, step_score,
    frac_correct_wrong_step (correct and through a wrong step), frac_correct_not_process
    (correct but not process-correct), frac_right_steps_wrong_answer (exactly the right steps,
    then a wrong or missing final answer); with the lenient checker frac_has_answer,
    frac_wrote_steps, frac_correct_wrote_steps, frac_correct_deviated, frac_deviated,
    frac_chain_right, frac_with_retry and the means retries_mean, repairs_mean, harms_mean,
    prose_lines_mean; with `count_tokens` also length_mean, wrong_length_x_frac (mean of
    length * wrong) and frac_wrong; with `max_ops`, for k = 1..max_ops, frac_ops{k} (problems
    of k operations) and frac_correct_ops{k} (those answered right), the names
    `rl_reason.pipelines.base_model.accuracy_by_ops` divides. Fixed names (not only the op
    counts present) let means over chunks add up.
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
        "frac_has_answer": col["has_answer"].mean(),
        "frac_wrote_steps": col["wrote_steps"].mean(),
        "frac_correct_wrote_steps": (col["correct"] * col["wrote_steps"]).mean(),
        "frac_correct_deviated": (col["correct"] * col["deviated"]).mean(),
        "frac_deviated": col["deviated"].mean(),
        "frac_chain_right": col["chain_right"].mean(),
        "frac_with_retry": (col["retries"] > 0).mean(),
        "retries_mean": col["retries"].mean(),
        "repairs_mean": col["repairs"].mean(),
        "harms_mean": col["harms"].mean(),
        "prose_lines_mean": col["prose_lines"].mean(),
    }
    if max_ops is not None:
        n_ops = np.asarray([len(ex["steps"]) for ex in examples])
        for k in range(1, max_ops + 1):
            stats[f"frac_ops{k}"] = (n_ops == k).mean()
            stats[f"frac_correct_ops{k}"] = (col["correct"] * (n_ops == k)).mean()
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
    deviation_rate: D, the share of correct answers with steps written whose steps (lenient
      checker, last attempts) include a wrong one.
    correct_given_deviated: P(correct | steps written, some wrong), to set beside
      `answer_chance`.
    """
    out = {
        "wrong_step_given_correct": _div(stats["frac_correct_wrong_step"], stats["frac_correct"]),
        "not_process_given_correct": _div(stats["frac_correct_not_process"], stats["frac_correct"]),
        "deviation_rate": _div(stats["frac_correct_deviated"], stats["frac_correct_wrote_steps"]),
        "correct_given_deviated": _div(stats["frac_correct_deviated"], stats["frac_deviated"]),
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
