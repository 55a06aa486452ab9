"""The causal test of the bridge: does the answer follow the chain in the context, or the problem?

For a problem of n >= 2 steps, one intermediate value v_j (1 <= j < n) is corrupted to
v_j + delta in the gold chain and the steps after it are carried on from the corrupted value::

    Start with 17. Step 1: add 8. Step 2: subtract 5. Step 3: add 3.
    Step 1: 17 + 8 = 27        <- corrupted (delta = +2): the one false line
    Step 2: 27 - 5 = 22        <- true arithmetic on the corrupted value
    Step 3: 22 + 3 = 25        <- the corrupted chain's answer, 25 (the true one is 23)

Given that context, an answer equal to the corrupted chain's value *follows* the chain, one equal
to the true answer *recovers* (it did not take the written chain's word for it), anything else
is other. A reader that copies the last number follows every time; one that solves the
question from its text recovers every time.

Which step and which delta are drawn per problem from `seed` (deltas in +-1..3 that keep every
value of the corrupted chain in [0, max_value], as the task's own values are), so the cases are
the same for every model measured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rl_reason.verifiers.arithmetic_steps import apply_op

DELTAS = (1, -1, 2, -2, 3, -3)


@dataclasses.dataclass(frozen=True)
class Case:
    """One corrupted chain: `steps` as written (step `at`, 1-based, is the false one)."""

    problem_id: int
    at: int
    delta: int
    steps: tuple[tuple[int, str, int, int], ...]
    true_answer: str
    corrupted_answer: str

    def reasoning(self) -> str:
        return "\n".join(
            f"Step {i}: {a} {op} {b} = {c}" for i, (a, op, b, c) in enumerate(self.steps, 1)
        )


def corrupt(problem: Mapping[str, Any], at: int, delta: int) -> list[tuple[int, str, int, int]]:
    """The gold chain with v_at shifted by `delta` and the later steps carried on from it."""
    gold = [tuple(s) for s in problem["steps"]]
    if not 1 <= at < len(gold) or delta == 0:
        raise ValueError(f"corrupt needs 1 <= at < {len(gold)} and delta != 0, got {at}, {delta}")
    chain = list(gold[: at - 1])
    a, op, b, c = gold[at - 1]
    chain.append((a, op, b, c + delta))
    value = c + delta
    for _, op, b, _ in gold[at:]:
        nxt = apply_op(value, op, b)
        chain.append((value, op, b, nxt))
        value = nxt
    return chain


def cases(problems: Sequence[Mapping[str, Any]], seed: int, max_value: int) -> list[Case]:
    """One case per problem that has an intermediate value and an in-range delta for it."""
    out = []
    for i, p in enumerate(problems):
        n = len(p["steps"])
        if n < 2:
            continue
        rng = np.random.default_rng([seed, i])
        at = int(rng.integers(1, n))
        for delta in (DELTAS[k] for k in rng.permutation(len(DELTAS))):
            chain = corrupt(p, at, int(delta))
            if all(0 <= s[0] <= max_value and 0 <= s[3] <= max_value for s in chain):
                out.append(
                    Case(i, at, int(delta), tuple(chain), str(p["answer"]), str(chain[-1][3]))
                )
                break
    return out


def flag_rates(follow: np.ndarray, recover: np.ndarray) -> dict[str, float]:
    """follow_rate, recovery_rate and other_rate from per-case flags (NaN with no cases)."""
    follow, recover = np.asarray(follow, bool), np.asarray(recover, bool)
    if not follow.size:
        nan = float("nan")
        return {"follow_rate": nan, "recovery_rate": nan, "other_rate": nan}
    return {
        "follow_rate": float(follow.mean()),
        "recovery_rate": float(recover.mean()),
        "other_rate": float((~follow & ~recover).mean()),
    }


def rates(case_list: Sequence[Case], answers: Sequence[str | None]) -> dict[str, float]:
    """`flag_rates` of a reader's answers to the cases (as written; None: no answer)."""
    if len(case_list) != len(answers):
        raise ValueError(f"{len(case_list)} cases but {len(answers)} answers")
    given = [None if a is None else a.strip() for a in answers]
    pairs = list(zip(case_list, given, strict=True))
    return flag_rates(
        np.asarray([a == c.corrupted_answer for c, a in pairs], bool),
        np.asarray([a == c.true_answer for c, a in pairs], bool),
    )
