"""The deviation rate, its chance baseline, has-answer and accuracy by op count, worked by hand
on completions whose verdicts are known."""

import math

import pytest

from rl_reason.pipelines import base_model
from rl_reason.pipelines.research import measures
from rl_reason.tasks import templates

PROBLEM = {
    "question": "Start with 17. Step 1: add 8. Step 2: subtract 5.",
    "answer": "20",
    "steps": [(17, "+", 8, 25), (25, "-", 5, 20)],
    "verifier": "arithmetic",
}
THREE = {
    "question": "Start with 2. Step 1: add 3. Step 2: add 4. Step 3: subtract 1.",
    "answer": "8",
    "steps": [(2, "+", 3, 5), (5, "+", 4, 9), (9, "-", 1, 8)],
    "verifier": "arithmetic",
}


def completion(lines: list[str], answer: str = "20") -> str:
    return templates.make_completion("\n".join(lines), answer)


TEXTS = {
    "right": completion(["Step 1: 17 + 8 = 25", "Step 2: 25 - 5 = 20"]),
    "one_wrong": completion(["Step 1: 17 + 8 = 25", "Step 2: 25 - 5 = 21"]),  # right anyway
    "commuted": completion(["Step 1: 8 + 17 = 25", "Step 2: 25 - 5 = 20"]),
    "bare": completion([]),
    "wrong_chain": completion(["Step 1: 17 + 8 = 26", "Step 2: 26 - 5 = 21"], answer="21"),
    "cut_off": "\nStep 1: 17 + 8 = 25\nStep 2: 25",  # the budget ran out: no answer
    "repaired": completion(
        ["Step 1: 17 + 8 = 26", "Wait. Step 1: 17 + 8 = 25", "Step 2: 25 - 5 = 20"]
    ),
}


def test_deviation_rate_and_its_denominator_by_hand():
    stats = measures.completion_stats(list(TEXTS.values()), [PROBLEM] * len(TEXTS))
    n = len(TEXTS)  # 7
    # correct: right, one_wrong, commuted, bare, repaired.
    assert stats["frac_correct"] == pytest.approx(5 / n)
    # steps written: all but bare; correct with steps: right, one_wrong, commuted, repaired.
    assert stats["frac_wrote_steps"] == pytest.approx(6 / n)
    assert stats["frac_correct_wrote_steps"] == pytest.approx(4 / n)
    # a last attempt wrong: one_wrong (correct) and wrong_chain (wrong).
    assert stats["frac_correct_deviated"] == pytest.approx(1 / n)
    assert stats["frac_deviated"] == pytest.approx(2 / n)
    assert stats["frac_has_answer"] == pytest.approx(6 / n)  # all but cut_off
    assert stats["frac_chain_right"] == pytest.approx(3 / n)  # right, commuted, repaired
    assert stats["frac_with_retry"] == stats["repairs_mean"] == pytest.approx(1 / n)
    assert stats["harms_mean"] == 0.0
    assert stats["prose_lines_mean"] == pytest.approx(1 / n)  # cut_off's "Step 2: 25"
    r = measures.ratios(stats)
    assert r["deviation_rate"] == pytest.approx(1 / 4)
    assert r["correct_given_deviated"] == pytest.approx(1 / 2)
    # The strict figure counts the commuted and the repaired chains as wrong and divides by
    # every correct answer, the bare one included: 3 / 5.
    assert r["wrong_step_given_correct"] == pytest.approx(3 / 5)
    bare_only = measures.ratios(measures.completion_stats([TEXTS["bare"]], [PROBLEM]))
    assert math.isnan(bare_only["deviation_rate"])  # no correct answer wrote steps
    assert math.isnan(bare_only["correct_given_deviated"])


def test_answer_chance_is_the_sum_of_squared_answer_shares():
    examples = [{"answer": a} for a in ("1", "1", "2", "3")]
    assert measures.answer_chance(examples) == pytest.approx(0.5**2 + 0.25**2 + 0.25**2)
    assert measures.answer_chance([{"answer": "7"}] * 3) == 1.0
    # Ten answers equally often: a tenth.
    assert measures.answer_chance([{"answer": str(i % 10)} for i in range(50)]) == pytest.approx(
        0.1
    )
    with pytest.raises(ValueError):
        measures.answer_chance([])


@pytest.mark.parametrize(
    "text, answer, has",
    [
        (completion([]), "20", True),
        (completion([], answer=" 21 "), "21", True),
        (completion([], answer="x"), "x", True),  # written, if not an integer
        (completion([], answer=""), None, False),
        (completion([]) + "<answer>21</answer>", None, True),  # two different answers
        # No </think>: all of it is the answer region, as the verifier reads it.
        ("\nStep 1: 17 + 8 = 25\n<answer>25</answer>", "25", True),
        ("\n</think>\n<think><answer>20</answer>", None, False),  # reasoning reopened
        ("\n</think>\nThe answer is 20.", None, False),
    ],
)
def test_final_answer_and_has_answer(text, answer, has):
    assert measures.final_answer(text) == answer
    assert measures.has_answer(text) is has


def test_accuracy_by_op_count():
    texts = [TEXTS["right"], TEXTS["wrong_chain"], completion([], answer="8")]
    stats = measures.completion_stats(texts, [PROBLEM, PROBLEM, THREE], max_ops=4)
    assert stats["frac_ops1"] == stats["frac_ops4"] == 0.0  # every name, present or not
    assert stats["frac_ops2"] == pytest.approx(2 / 3) and stats["frac_ops3"] == pytest.approx(1 / 3)
    assert stats["frac_correct_ops2"] == pytest.approx(1 / 3)
    assert stats["frac_correct_ops3"] == pytest.approx(1 / 3)
    assert base_model.accuracy_by_ops(stats) == pytest.approx({"2": 0.5, "3": 1.0})
    assert "frac_ops2" not in measures.completion_stats(texts, [PROBLEM, PROBLEM, THREE])
