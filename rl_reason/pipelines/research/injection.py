"""Error injection: the policy continues a chain in which one step has just been written wrong.

For a problem of n >= 2 steps and the corrupted chain of `research.corruption` (step `at` off
by delta), the context is the prompt and the first `at` lines of that chain, so k = at - 1 right
steps and then the wrong one::

    Start with 17. Step 1: add 8. Step 2: subtract 5. Step 3: add 3.
    <think>
    Step 1: 17 + 8 = 27         <- injected (the right value is 25)

and the policy continues greedily. Its final answer either *recovers* (the true answer: it
noticed, or ignored the wrong value), *follows* (the answer of the chain carried on from the
wrong value) or is neither. `retry_rate` is how often the continuation writes step `at` again
("Wait. Step 1: ..." or "Step 1: ..."), the retry a corpus with `frac_retry` shows.
Unlike the bridge's causal test, which gives the whole corrupted chain and reads the answer,
here the policy writes every step after the error itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rl_reason.pipelines.research import corruption, measures
from rl_reason.tasks import arithmetic


def prefill(problem: Mapping[str, Any], case: corruption.Case) -> str:
    """Prompt + the corrupted chain's lines up to and including the wrong step."""
    lines = case.reasoning().split("\n")[: case.at]
    return arithmetic.make_prompt(problem["question"]) + "\n" + "\n".join(lines) + "\n"


def retried(continuation: str, at: int) -> bool:
    """Whether `continuation` writes step `at` again before its think block ends."""
    think = continuation.split("</think>", 1)[0]
    again = re.compile(rf"\s*(?:{re.escape(arithmetic.RETRY_WORD)}\s*)?Step {at}\s*:")
    return any(again.match(line) for line in think.split("\n"))


def rates(cases: Sequence[corruption.Case], continuations: Sequence[str]) -> dict[str, float]:
    """recovery / follow / other rates of the continuations' final answers, retry_rate, and
    the recovery rate among the continuations that retried and those that did not."""
    if len(cases) != len(continuations):
        raise ValueError(f"{len(cases)} cases but {len(continuations)} continuations")
    answers = [measures.final_answer(c) for c in continuations]
    out = corruption.rates(cases, answers)
    retry = np.asarray([retried(c, case.at) for case, c in zip(cases, continuations, strict=True)])
    recover = np.asarray([a == case.true_answer for case, a in zip(cases, answers, strict=True)])
    nan = float("nan")
    out.update(
        cases=len(cases),
        retry_rate=float(retry.mean()) if retry.size else nan,
        recovery_given_retry=float(recover[retry].mean()) if retry.any() else nan,
        recovery_given_no_retry=float(recover[~retry].mean()) if (~retry).any() else nan,
    )
    return out


def measure(generate, problems: Sequence[Mapping[str, Any]], seed: int, max_value: int) -> dict:
    """`rates` of `generate(prompts) -> continuations` (greedy) on the cases of `problems`."""
    cases = corruption.cases(problems, seed, max_value)
    continuations = generate([prefill(problems[c.problem_id], c) for c in cases])
    return {f"injection_{k}": v for k, v in rates(cases, continuations).items()}
