"""The lenient step checker on hand-written think blocks whose verdicts are known."""

import pytest

from rl_reason.pipelines.research import steps
from rl_reason.tasks import arithmetic, templates

# 17 + 8 = 25, 25 - 5 = 20, 20 + 3 = 23 (true chain 17, 25, 20, 23).
PROBLEM = {
    "question": "Start with 17. Step 1: add 8. Step 2: subtract 5. Step 3: add 3.",
    "answer": "23",
    "steps": [(17, "+", 8, 25), (25, "-", 5, 20), (20, "+", 3, 23)],
    "verifier": "arithmetic",
}
ON, GR, WR = steps.ON_CHAIN, steps.GROUNDED, steps.WRONG


def think(*lines: str, answer: str = "23") -> str:
    return templates.make_completion("\n".join(lines), answer)


def test_canonical_chain_is_on_chain_and_matches_the_strict_checker():
    text = think("Step 1: 17 + 8 = 25", "Step 2: 25 - 5 = 20", "Step 3: 20 + 3 = 23")
    r = steps.read_steps(text, PROBLEM)
    assert r.verdicts() == {1: ON, 2: ON, 3: ON}
    assert r.chain_right(3) and not r.wrong_step and r.wrote_steps
    assert (r.attempts, r.retries, r.repairs, r.harms, r.prose_lines) == (3, 0, 0, 0, 0)
    assert r.last.step == (20, "+", 3, 23)
    assert arithmetic.check_steps(text, PROBLEM) == [True, True, True]


@pytest.mark.parametrize(
    "lines, verdicts, strict",
    [
        # Commuted operands of +: right; of - it would be false arithmetic.
        (["Step 1: 8 + 17 = 25", "Step 2: 25 - 5 = 20"], {1: ON, 2: ON}, [False, True]),
        (["Step 1: 17 + 8 = 25", "Step 2: 5 - 25 = 20"], {1: ON, 2: WR}, [True, False]),
        # Spacing, case, a trailing period, no label: still the chain.
        (["  step 1 :17+8=25 .", "25 -  5 =20"], {1: ON, 2: ON}, [True, True]),
        # Step 1 skipped: "Step 2:" is judged as step 2, not as the first line.
        (["Step 2: 25 - 5 = 20", "Step 3: 20 + 3 = 23"], {2: ON, 3: ON}, [False, False]),
        # Another order, true computations on the problem's numbers: grounded.
        (["8 + 3 = 11", "17 + 11 = 28", "28 - 5 = 23"], {1: GR, 2: GR, 3: GR}, [False] * 3),
        # A false step, then the chain carried on from its result: both wrong.
        (["Step 1: 17 + 8 = 26", "Step 2: 26 - 5 = 21"], {1: WR, 2: WR}, [False, False]),
        # A number from nowhere with true arithmetic is still wrong.
        (["Step 1: 17 + 9 = 26"], {1: WR}, [False]),
    ],
)
def test_equivalent_forms(lines, verdicts, strict):
    r = steps.read_steps(think(*lines), PROBLEM)
    assert r.verdicts() == verdicts
    assert r.wrong_step == (WR in verdicts.values())
    assert arithmetic.check_steps(think(*lines), PROBLEM) == strict


def test_retries_last_attempt_counts_and_repairs_and_harms_are_counted():
    repaired = think(
        "Step 1: 17 + 8 = 26",
        "Wait. Step 1: 17 + 8 = 25",
        "Step 2: 25 - 5 = 20",
        "Step 3: 20 + 3 = 23",
    )
    r = steps.read_steps(repaired, PROBLEM)
    assert r.verdicts() == {1: ON, 2: ON, 3: ON} and r.chain_right(3)
    assert (r.attempts, r.retries, r.repairs, r.harms) == (4, 1, 1, 0)
    # The strict parser does not see the "Wait." line, so the wrong first attempt stands.
    assert arithmetic.check_steps(repaired, PROBLEM) == [False, True, True]

    harmed = think("Step 1: 17 + 8 = 25", "Step 1: 17 + 8 = 24", "Step 2: 24 - 5 = 19")
    r = steps.read_steps(harmed, PROBLEM)
    assert r.verdicts() == {1: WR, 2: WR} and r.wrong_step
    assert (r.retries, r.repairs, r.harms) == (1, 0, 1)
    # A plain repeated label it does read, by position: every line after it is out of place.
    plain = think("Step 1: 17 + 8 = 26", "Step 1: 17 + 8 = 25", "Step 2: 25 - 5 = 20")
    assert arithmetic.check_steps(plain, PROBLEM) == [False, False, False]
    assert steps.read_steps(plain, PROBLEM).verdicts() == {1: ON, 2: ON}

    # A whole retried chain: two repairs; the unlabelled line after "Step 1" attempts step 2.
    again = think(
        "Step 1: 17 + 8 = 26",
        "26 - 5 = 21",
        "Wait, Step 1: 17 + 8 = 25",
        "25 - 5 = 20",
        "Step 3: 20 + 3 = 23",
    )
    r = steps.read_steps(again, PROBLEM)
    assert r.verdicts() == {1: ON, 2: ON, 3: ON}
    assert (r.attempts, r.retries, r.repairs, r.harms) == (5, 2, 2, 0)
    # Right retried as right, wrong retried as wrong: retries, neither repair nor harm.
    same = think(
        "Step 1: 17 + 8 = 25", "Step 1: 8 + 17 = 25", "Step 2: 1 + 1 = 3", "Step 2: 0 + 0 = 1"
    )
    r = steps.read_steps(same, PROBLEM)
    assert (r.retries, r.repairs, r.harms) == (2, 0, 0) and r.verdicts() == {1: ON, 2: WR}


def test_a_superseded_wrong_result_is_not_a_known_number():
    # 26 was retracted; carrying it on is wrong even though 26 - 5 = 21 is true.
    text = think("Step 1: 17 + 8 = 26", "Wait. Step 1: 17 + 8 = 25", "Step 2: 26 - 5 = 21")
    assert steps.read_steps(text, PROBLEM).verdicts() == {1: ON, 2: WR}


def test_prose_is_tolerated_and_counted():
    text = think(
        "Let me add first.",
        "Step 1: 17 + 8 = 25",
        "",
        "Now take away five: easy.",
        "Step 2: 25 - 5 = 20",
        "So the answer is 23? Step 3: 20 + 3 = 23",  # prose around a step: prose
        "Step 3: 20 + 3 = 23",
    )
    r = steps.read_steps(text, PROBLEM)
    assert r.prose_lines == 3
    assert r.verdicts() == {1: ON, 2: ON, 3: ON} and r.chain_right(3)
    nothing = steps.read_steps(think("I just know it."), PROBLEM)
    assert not nothing.wrote_steps and not nothing.wrong_step and nothing.last is None
    assert nothing.prose_lines == 1 and not nothing.chain_right(3)


def test_chain_right_needs_every_step_once_on_chain():
    extra = think("Step 1: 17 + 8 = 25", "Step 2: 25 - 5 = 20", "Step 3: 20 + 3 = 23", "3 + 5 = 8")
    r = steps.read_steps(extra, PROBLEM)
    assert r.verdicts()[4] == GR and not r.wrong_step and not r.chain_right(3)
    missing = steps.read_steps(think("Step 1: 17 + 8 = 25", "Step 3: 20 + 3 = 23"), PROBLEM)
    assert not missing.wrong_step and not missing.chain_right(3)


def test_only_the_think_block_is_read_and_long_numbers_are_prose():
    text = think("Step 1: 17 + 8 = 25") + "\nStep 2: 25 - 5 = 21"
    assert steps.read_steps(text, PROBLEM).verdicts() == {1: ON}
    huge = "1" * 40
    r = steps.read_steps(think(f"{huge} + 1 = 2"), PROBLEM)
    assert r.prose_lines == 1 and not r.wrote_steps


def test_every_strict_step_line_and_right_step_is_one_here_too():
    task = arithmetic.ArithmeticTask()
    for p in task.eval_set(0, 40):
        chain = arithmetic.worked_solution(p).split("\n")
        damaged = [chain[0].replace("=", "= 1"), *chain[1:], "Answer: 1 + 1 = 2"]
        for lines in (chain, damaged, chain[1:]):
            text = think(*lines, answer=p["answer"])
            strict = arithmetic.check_steps(text, p)
            r = steps.read_steps(text, p)
            assert r.attempts == len(strict)
            in_order = sorted(r.final, key=lambda a: a.line)  # no retries in these texts
            assert all(a.right for a, ok in zip(in_order, strict, strict=True) if ok)
        assert steps.read_steps(think(*chain), p).chain_right(len(p["steps"]))
