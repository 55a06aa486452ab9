"""Self-correction: the corpus's retried steps and the error-injection measure, read on
readers whose behaviour is known (a copier of the wrong value, a solver, a retrier)."""

import math

import numpy as np
import pytest

from rl_reason.pipelines.research import corruption, injection, measures, steps
from rl_reason.tasks import arithmetic

CFG = arithmetic.ArithmeticConfig(min_ops=2, max_ops=4, max_value=19, ops="+-", max_factor=3)
PROBLEM = {
    "question": "Start with 17. Step 1: add 8. Step 2: subtract 5. Step 3: add 3.",
    "answer": "23",
    "steps": [(17, "+", 8, 25), (25, "-", 5, 20), (20, "+", 3, 23)],
}


def test_retried_solution_is_wrong_once_then_right():
    text = arithmetic.retried_solution(PROBLEM, 2, -2)
    assert text.split("\n") == [
        "Step 1: 17 + 8 = 25",
        "Step 2: 25 - 5 = 18",
        "Wait. Step 2: 25 - 5 = 20",
        "Step 3: 20 + 3 = 23",
    ]
    # The lenient checker takes the last attempt of step 2 and counts one repair.
    report = steps.read_steps(text, PROBLEM)
    assert report.repairs == 1 and report.retries == 1 and not report.wrong_step
    with pytest.raises(ValueError, match="1 <= at <= 3"):
        arithmetic.retried_solution(PROBLEM, 4, 1)


def test_corpus_retry_share_leaves_the_rest_alone():
    kw = dict(frac_worked=0.5, frac_template=0.7, frac_template_worked=0.15)
    plain = arithmetic.pretraining_corpus(0, 1000, CFG, **kw)
    retried = arithmetic.pretraining_corpus(0, 1000, CFG, frac_retry=0.1, **kw)
    changed = [i for i in range(1000) if plain[i] != retried[i]]
    assert len(changed) == 50  # 10% of the 500 worked texts
    for i in changed:
        assert arithmetic.RETRY_WORD in retried[i] and arithmetic.RETRY_WORD not in plain[i]
        # The same problem, one line more: the wrong attempt.
        assert retried[i].count("\n") == plain[i].count("\n") + 1
    assert arithmetic.pretraining_corpus(0, 1000, CFG, frac_retry=0.1, **kw) == retried
    with pytest.raises(ValueError, match="frac_retry"):
        arithmetic.pretraining_corpus(0, 10, CFG, frac_retry=1.5, **kw)


def _continuations(cases, problems, reader):
    out = []
    for c in cases:
        p = problems[c.problem_id]
        if reader == "copier":  # carries on from the wrong value, as the context implies
            rest = "\n".join(c.reasoning().split("\n")[c.at :])
            out.append(f"{rest}\n</think>\n<answer>{c.corrupted_answer}</answer>")
        elif reader == "retrier":  # writes the step again, right, and finishes right
            a, op, b, v = p["steps"][c.at - 1]
            fixed = f"Wait. Step {c.at}: {a} {op} {b} = {v}"
            out.append(f"{fixed}\n</think>\n<answer>{c.true_answer}</answer>")
        else:  # a constant guess
            out.append("</think>\n<answer>0</answer>")
    return out


def test_injection_rates_on_known_readers():
    task = arithmetic.ArithmeticTask(CFG)
    problems = task.eval_set(0, 64)
    cases = corruption.cases(problems, 0, CFG.max_value)
    # Cases whose carried-on chain would leave [0, max_value] are skipped: few.
    assert 0.9 * len(problems) <= len(cases) <= len(problems)
    copier = injection.rates(cases, _continuations(cases, problems, "copier"))
    assert copier["follow_rate"] == 1.0 and copier["recovery_rate"] == 0.0
    assert copier["retry_rate"] == 0.0 and math.isnan(copier["recovery_given_retry"])
    retrier = injection.rates(cases, _continuations(cases, problems, "retrier"))
    assert retrier["recovery_rate"] == 1.0 and retrier["retry_rate"] == 1.0
    assert retrier["recovery_given_retry"] == 1.0
    guess = injection.rates(cases, _continuations(cases, problems, "guess"))
    zero = np.mean([c.true_answer == "0" for c in cases])
    assert guess["recovery_rate"] == pytest.approx(zero)


def test_prefill_ends_with_the_wrong_step():
    (case,) = corruption.cases([PROBLEM], 0, 99)
    text = injection.prefill(PROBLEM, case)
    assert text.startswith(arithmetic.make_prompt(PROBLEM["question"]))
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    a, op, b, c = case.steps[case.at - 1]
    assert last == f"Step {case.at}: {a} {op} {b} = {c}" and c != PROBLEM["steps"][case.at - 1][3]
    assert measures.final_answer(text) is None
    assert not injection.retried("Step 9: 1 + 1 = 2", case.at)
    assert injection.retried(f"\nStep {case.at}: 1 + 1 = 2\n</think>", case.at)
