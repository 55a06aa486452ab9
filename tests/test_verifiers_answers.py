"""Tables of right and wrong answers for the answer verifiers, and adversarial inputs.

Each row is (response, example, correct). Rejections also check the reason where the reason is
the point (e.g. an answer only inside the reasoning must not count even if it is right).
"""

import time

import pytest

from rl_reason import verifiers
from rl_reason.verifiers import answer_extraction, deadline

THINK = "<think>Let me work it out: 2 + 3 = 5, so the answer is 5.</think>"


def check(name, response, example):
    result = verifiers.get(name)(response, example)
    assert isinstance(result, verifiers.VerifyResult)
    assert result.reward == (1.0 if result.correct else 0.0)
    return result


# ------------------------------------------------------------------------------------------------
# Registry.


def test_registry_names_and_unknown_name_lists_valid_ones():
    builtin = ["arithmetic", "arithmetic_process", "code", "countdown", "format", "gsm8k", "math"]
    # Other test modules may have registered more; the built-ins are always there.
    assert set(builtin) <= set(verifiers.names()) and verifiers.names() == sorted(verifiers.names())
    expected = "unknown verifier 'maths'; valid names: arithmetic, "
    with pytest.raises(ValueError, match=expected) as info:
        verifiers.get("maths")
    assert all(name in str(info.value) for name in builtin)


def test_register_adds_a_verifier_and_refuses_silent_replacement():
    def always(response, example):
        return verifiers.VerifyResult(1.0, True, "ok")

    verifiers.register("test_always", always)
    try:
        assert verifiers.get("test_always")("x", {}).correct
        with pytest.raises(ValueError, match="already registered"):
            verifiers.register("test_always", lambda r, e: None)
    finally:
        verifiers._REGISTRY.pop("test_always")


def test_verify_result_is_frozen_picklable_and_clips_long_reasons():
    import pickle

    result = verifiers.VerifyResult(0.0, False, "x" * 1000)
    assert len(result.reason) == 200 and result.reason.endswith("...")
    assert pickle.loads(pickle.dumps(result)) == result
    with pytest.raises(AttributeError):
        result.reward = 1.0


# ------------------------------------------------------------------------------------------------
# Extraction.


@pytest.mark.parametrize(
    "response, answers, reason",
    [
        ("x \\boxed{\\frac{1}{2}} y", ("\\frac{1}{2}",), ""),
        ("\\boxed{\\{1, 2\\}}", ("\\{1, 2\\}",), ""),  # escaped braces do not unbalance
        ("\\boxed{a{b}c}", ("a{b}c",), ""),
        ("\\boxed {7}", ("7",), ""),
        ("\\boxed{\\boxed{7}}", ("\\boxed{7}",), ""),  # outermost only
        ("<answer> $42$. </answer>", ("42",), ""),
        ("<answer>\\boxed{3}</answer>", ("3",), ""),  # a box inside the block wins
        ("<answer>3</answer> and <answer>3</answer>", ("3",), ""),  # repeats are one answer
        ("\\boxed{3} \\boxed{4}", ("3", "4"), ""),
        ("\\boxed{3", (), "no final answer"),  # truncated box
        ("<answer>3", (), "no final answer"),  # truncated block
        ("<answer>  </answer>", (), "empty answer"),
        ("\\boxed{}", (), "empty answer"),
        ("The answer is 5.", (), "no final answer"),
        ("<think>\\boxed{5}</think>", (), "answer only inside the reasoning"),
        ("<think>\\boxed{5}</think> so <think> more", (), "no final answer after the reasoning"),
        ("<think>a</think> <think> b \\boxed{5}", (), "no final answer after the reasoning"),
        ("<think>\\boxed{4}</think><answer>5</answer>", ("5",), ""),
    ],
)
def test_final_answers(response, answers, reason):
    extraction = answer_extraction.final_answers(response)
    assert extraction.answers == answers
    assert extraction.reason == reason


def test_hash_lines_only_when_asked():
    assert answer_extraction.final_answers("so\n#### 72\n").answers == ()
    assert answer_extraction.final_answers("so\n#### 72\n", hash_lines=True).answers == ("72",)


def test_last_python_block():
    response = "```python\nA\n```\ntext\n```py\nB\n```"
    assert answer_extraction.last_python_block(response) == "B\n"
    assert answer_extraction.last_python_block("<think>```python\nA\n```</think>") is None
    assert answer_extraction.last_python_block("```python\nA\n```\n```python\nB") is None
    assert answer_extraction.last_python_block("```\nA\n```") is None


# ------------------------------------------------------------------------------------------------
# math.

MATH_TABLE = [
    # Equivalent forms are accepted.
    (THINK + "<answer>\\boxed{\\frac{1}{2}}</answer>", "0.5", True),
    ("so \\boxed{\\dfrac{1}{2}}", "\\frac12", True),
    ("\\boxed{1/2}", "\\frac{1}{2}", True),
    ("\\boxed{0.5}", "1/2", True),
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{1{,}000}", "1000", True),
    ("\\boxed{1\\,000}", "1000", True),
    ("<answer>$[1, 2)$</answer>", "[1,2)", True),
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]", True),
    ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}", True),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", True),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\sqrt{2}/2", True),
    ("\\boxed{x = 2}", "2", True),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
    ("\\boxed{5}", 5, True),  # a numeric gold
    ("\\boxed{7}", "\\boxed{7}", True),  # a boxed gold
    ("\\boxed{3} then \\boxed{3}", "3", True),  # the same answer twice
    ("\\boxed{0.5} and <answer>\\frac{1}{2}</answer>", "1/2", True),  # equal forms
    # Wrong, hedged, empty, unanchored or hidden answers are rejected.
    ("\\boxed{0.499999}", "0.5", False),
    ("\\boxed{(1, 2)}", "[1,2)", False),
    ("\\boxed{3} or maybe \\boxed{5}", "5", False),
    ("\\boxed{3 or 5}", "5", False),
    ("\\boxed{3, 5}", "5", False),
    ("<answer>3</answer><answer>5</answer>", "5", False),
    ("\\boxed{}", "5", False),
    ("<answer> </answer>", "5", False),
    ("The answer is 5.", "5", False),
    ("$5$", "5", False),
    ("<answer>The answer is 5</answer>", "5", False),  # free text inside the block
    ("<think>\\boxed{5}</think>", "5", False),
    ("<think>\\boxed{5}</think> I am not sure.", "5", False),
    ("<think>\\boxed{5}</think><answer>4</answer>", "5", False),
]


@pytest.mark.parametrize("response, gold, correct", MATH_TABLE)
def test_math_table(response, gold, correct):
    result = check("math", response, {"answer": gold})
    assert result.correct is correct, result.reason


def test_math_reasons():
    gold = {"answer": "5"}
    assert check("math", "<think>\\boxed{5}</think>", gold).reason == (
        "answer only inside the reasoning"
    )
    assert check("math", "\\boxed{3} \\boxed{5}", gold).reason == "several different final answers"
    assert check("math", "\\boxed{}", gold).reason == "empty answer"
    assert check("math", "\\boxed{4}", gold).reason == "wrong answer"


def test_math_malformed_examples_raise():
    with pytest.raises(ValueError, match="'answer'"):
        check("math", "\\boxed{1}", {"solution": "1"})
    with pytest.raises(ValueError, match="cannot be parsed"):
        check("math", "\\boxed{1}", {"answer": ""})


def test_math_works_off_the_main_thread():
    # math-verify's own signal.alarm timeouts raise off the main thread; ours are skipped there.
    import threading

    out = []
    thread = threading.Thread(
        target=lambda: out.append(check("math", "\\boxed{0.5}", {"answer": "1/2"}))
    )
    thread.start()
    thread.join()
    assert out[0].correct


# ------------------------------------------------------------------------------------------------
# gsm8k.

GSM8K_TABLE = [
    ("<answer>72</answer>", "Natalia sold 48/2 = 24 clips.\n#### 72", True),
    ("<answer>1,000</answer>", "#### 1000", True),
    ("<answer>$1,000.00</answer>", "1000", True),
    ("<answer>18 dollars</answer>", 18, True),
    ("\\boxed{\\$18}", "18", True),
    ("\\boxed{18\\text{ apples}}", "18", True),
    ("so\n#### 18\n", "18", True),
    ("<answer>50%</answer>", "50", True),
    ("<answer>-3</answer>", "-3", True),
    ("<answer>7/2</answer>", "3.5", True),
    ("<answer>18.</answer>", "#### 18", True),
    ("<answer>18</answer>\n#### 18", "18", True),
    ("<answer>17.999</answer>", "18", False),
    ("<answer>x = 18</answer>", "18", False),
    ("<answer>18 or 19</answer>", "18", False),
    ("<answer>She has 18 apples</answer>", "18", False),
    ("<answer>1,5</answer>", "15", False),
    ("<answer>18</answer>\n#### 19", "18", False),
    ("<answer></answer>", "18", False),
    ("She has 18 apples, so the answer is 18.", "18", False),
    ("<think>#### 18</think>", "18", False),
    ("<think><answer>18</answer></think> done", "18", False),
]


@pytest.mark.parametrize("response, gold, correct", GSM8K_TABLE)
def test_gsm8k_table(response, gold, correct):
    result = check("gsm8k", response, {"answer": gold})
    assert result.correct is correct, result.reason


def test_gsm8k_gold_must_be_a_number():
    with pytest.raises(ValueError, match="not a number"):
        check("gsm8k", "<answer>1</answer>", {"answer": "#### seventy"})


# ------------------------------------------------------------------------------------------------
# countdown.

COUNTDOWN = {"numbers": [25, 3, 7, 50], "target": 69}
CHARS = "only integers, + - * / and parentheses are allowed"
COUNTDOWN_REJECTIONS = [
    ("<answer>50 + 25 - 3 - 7 + 4</answer>", "numbers must be used exactly as given"),  # extra
    ("<answer>50 + 25 - 3</answer>", "numbers must be used exactly as given"),  # missing 7
    ("<answer>50 + 25 - 3 - 3</answer>", "numbers must be used exactly as given"),  # reused 3
    ("<answer>50 + 25 + 7 - 3</answer>", "wrong value"),
    ("<answer>50 + 25 - 3 ** 7</answer>", "operator ** is not allowed"),
    ("<answer>50 + 25 - 7 // 3</answer>", "operator // is not allowed"),
    ("<answer>50 + 25 - 7 % 3</answer>", CHARS),
    ("<answer>max(50, 25) + 7 - 3</answer>", CHARS),  # names and calls
    ("<answer>__import__('os') + 25</answer>", CHARS),
    ("<answer>50 + 25 - 7 + 3 = 69</answer>", CHARS),
    ("<answer>50.0 + 25 - 7 + 3</answer>", CHARS),
    ("<answer>-(3 - 50) + 25 - 7</answer>", "unary operators are not allowed"),
    ("<answer>50 + 25 / (7 - 7) + 3</answer>", "division by zero"),
    (
        "<answer>50 + 25 - 3 * 7 + 15</answer><answer>50 + 25 - 3 - 7</answer>",
        "several different final answers (numbers must be used exactly as given)",
    ),
    ("<answer></answer>", "empty answer"),
    ("The answer is 50 + 25 - 3 - 7", "no final answer"),
    ("<think><answer>50 + 25 - 3 - 7 + 4</answer></think>", "answer only inside the reasoning"),
]


@pytest.mark.parametrize("response, reason", COUNTDOWN_REJECTIONS)
def test_countdown_rejections(response, reason):
    result = check("countdown", response, COUNTDOWN)
    assert (result.correct, result.reason) == (False, reason)


@pytest.mark.parametrize(
    "numbers, target, answer, correct",
    [
        ([25, 3, 7, 50], 65, "50 + 25 - 7 - 3", True),
        ([25, 3, 7, 50], 61, "(50 - 25) * 3 - 7 - 7", False),
        ([3, 7, 50, 25], 71, "50 + 25 - (7 - 3)", True),
        ([3, 7, 50, 25], 71, "(50 + 25 - (7 - 3))", True),
        ([25, 3, 7, 50], 65, "50 + 25 − 7 − 3", True),  # unicode minus
        ([6, 4, 2], 12, "6 × 4 ÷ 2", True),
        ([6, 4, 2], 12, "6 \\times 4 \\div 2", True),
        ([6, 4, 3], 8, "6 * 4 / 3", True),  # exact: 24 / 3
        ([1, 3, 3], 1, "(1 / 3) * 3", True),  # exact Fraction arithmetic, no rounding
        ([2, 2], 4, "2 + 2", True),  # repeated numbers used as often as given
        ([2, 2], 4, "2 * 2 + 0", False),
        ([4, 0], 4, "4 / 0", False),  # division by zero is not correct
        ([4, 2], 2, "$4 - 2$", True),
    ],
)
def test_countdown_table(numbers, target, answer, correct):
    result = check(
        "countdown", f"<answer>{answer}</answer>", {"numbers": numbers, "target": target}
    )
    assert result.correct is correct, result.reason


def test_countdown_malformed_example_raises():
    with pytest.raises(ValueError, match="'numbers'"):
        check("countdown", "<answer>1</answer>", {"target": 1})


# ------------------------------------------------------------------------------------------------
# arithmetic.


@pytest.mark.parametrize(
    "response, gold, correct",
    [
        ("<answer>42</answer>", "42", True),
        ("<answer> 42 </answer>", 42, True),
        ("<answer>-7</answer>", "-7", True),
        (THINK + "<answer>42</answer>", "42", True),
        ("<answer>42</answer> again <answer>42</answer>", "42", True),
        ("<answer>43</answer>", "42", False),
        ("<answer>42.0</answer>", "42", False),
        ("<answer>forty-two</answer>", "42", False),
        ("<answer>x = 42</answer>", "42", False),
        ("<answer>4 2</answer>", "42", False),
        ("<answer></answer>", "42", False),
        ("42", "42", False),
        ("\\boxed{42}", "42", False),
        ("<answer>41</answer><answer>42</answer>", "42", False),
        ("<think><answer>42</answer></think>", "42", False),
        ("<answer>٤٢</answer>", "42", False),  # non-ASCII digits are not an integer literal
    ],
)
def test_arithmetic_table(response, gold, correct):
    result = check("arithmetic", response, {"answer": gold})
    assert result.correct is correct, result.reason


def test_golds_may_be_bytes_as_tfds_gives_text():
    assert check("arithmetic", "<answer>42</answer>", {"answer": b"42"}).correct
    assert check("math", "\\boxed{0.5}", {"answer": b"\\frac{1}{2}"}).correct
    assert check("gsm8k", "<answer>7</answer>", {"answer": b"#### 7"}).correct
    np = pytest.importorskip("numpy")
    assert check("arithmetic", "<answer>42</answer>", {"answer": np.int64(42)}).correct
    assert check("gsm8k", "<answer>7</answer>", {"answer": np.int32(7)}).correct
    example = {"numbers": np.array([6, 4, 2]), "target": np.int64(12)}
    assert check("countdown", "<answer>6 * 4 / 2</answer>", example).correct


def test_arithmetic_gold_must_be_an_integer():
    with pytest.raises(ValueError, match="integer 'answer'"):
        check("arithmetic", "<answer>1</answer>", {"answer": "1.5"})


# ------------------------------------------------------------------------------------------------
# format.


@pytest.mark.parametrize(
    "response, correct",
    [
        ("I add them.</think><answer>5</answer>", True),  # starts inside the think block
        ("<think>I add them.</think>\n<answer>5</answer>\n", True),  # repeats the opening tag
        ("  <think>\nx\n</think> <answer> 5 </answer>", True),
        ("I add them.<answer>5</answer>", False),  # no </think>
        ("a</think>b</think><answer>5</answer>", False),
        ("a</think><answer>5</answer><answer>6</answer>", False),
        ("a</think><answer>5</answer> trailing text", False),
        ("a</think>text<answer>5</answer>", False),
        ("a</think><answer> </answer>", False),
        ("a</think><answer>5", False),
        ("a <answer>4</answer></think><answer>5</answer>", False),
        ("<think><think>a</think><answer>5</answer>", False),
        ("", False),
    ],
)
def test_format_table(response, correct):
    result = check("format", response, {})
    assert result.correct is correct, result.reason


# ------------------------------------------------------------------------------------------------
# Adversarial inputs, in process (the pool runs the same inputs in test_verifiers_pool.py).

NESTED = "(" * 10_000 + "1" + ")" * 10_000
MEGABYTE = "\\boxed{" * 50_000 + "1 + " * 200_000 + "<answer>" * 20_000


@pytest.mark.parametrize(
    "name, response, example",
    [
        ("math", "\\boxed{9^{9^{9^{9}}}}", {"answer": "5"}),
        ("math", "\\boxed{9^9^9^9}", {"answer": "5"}),
        ("math", "\\boxed{10^{10^{10}}}", {"answer": "5"}),
        ("math", "\\boxed{1000000!}", {"answer": "5"}),
        ("math", "\\boxed{" + NESTED + "}", {"answer": "1"}),
        ("math", MEGABYTE, {"answer": "1"}),
        ("gsm8k", "<answer>" + NESTED + "</answer>", {"answer": "1"}),
        ("gsm8k", MEGABYTE, {"answer": "1"}),
        (
            "countdown",
            "<answer>75 ** 50 ** 3 ** 2</answer>",
            {"numbers": [75, 50, 3, 2], "target": 1},
        ),
        ("countdown", "<answer>" + NESTED + "</answer>", {"numbers": [1], "target": 1}),
        ("countdown", MEGABYTE, {"numbers": [1], "target": 1}),
        ("arithmetic", "<answer>" + "9" * 1_000_000 + "</answer>", {"answer": "1"}),
        ("format", MEGABYTE, {}),
    ],
)
def test_adversarial_inputs_are_rejected_quickly(name, response, example):
    start = time.monotonic()
    result = check(name, response, example)
    elapsed = time.monotonic() - start
    assert not result.correct
    # Generous for a loaded 2-core machine; a hang would take minutes.
    assert elapsed < 5.0, (result, elapsed)


def test_math_answer_that_equals_gold_after_a_big_but_fine_power():
    assert check("math", "\\boxed{2^{10}}", {"answer": "1024"}).correct
    assert check("math", "\\boxed{9^9}", {"answer": "387420489"}).correct


def test_deadline_interrupts_python_code_and_restores_outer_timer():
    import signal

    with pytest.raises(deadline.DeadlineExceeded):
        with deadline.deadline(0.2):
            while True:
                pass
    signal.setitimer(signal.ITIMER_REAL, 100.0)
    try:
        with deadline.deadline(0.05):
            pass
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 90.0 < remaining <= 100.0  # the outer timer is back
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
