"""Tests for the synthetic arithmetic task: ranges, determinism, text formats, step checks."""

import collections
import json
import operator
import re

import numpy as np
import pytest

from rl_reason.tasks import arithmetic, templates
from rl_reason.tasks.arithmetic import ArithmeticConfig, ArithmeticTask

PY_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
CLAUSE = {"add": "+", "subtract": "-", "multiply by": "*"}

# A hand-built problem with hand-computed steps, so format tests do not trust the generator.
PROBLEM = {
    "question": "Start with 17. Step 1: add 8. Step 2: subtract 5. Step 3: multiply by 3.",
    "answer": "60",
    "steps": [(17, "+", 8, 25), (25, "-", 5, 20), (20, "*", 3, 60)],
    "verifier": "arithmetic",
}
PROMPT = (
    "Think step by step in <think> </think>, then give the final answer in <answer> </answer>.\n"
    "Problem: Start with 17. Step 1: add 8. Step 2: subtract 5. Step 3: multiply by 3.\n"
    "<think>"
)


def solve_question(question: str) -> tuple[int, list[tuple[str, int]]]:
    """Reads the chain back from the question text alone."""
    m = re.fullmatch(r"Start with (\d+)\. (.+)\.", question)
    assert m, question
    chain = []
    for i, clause in enumerate(m[2].split(". "), 1):
        label, rest = clause.split(": ")
        assert label == f"Step {i}", question
        words, number = rest.rsplit(" ", 1)
        chain.append((CLAUSE[words], int(number)))
    return int(m[1]), chain


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(min_ops=0), "min_ops"),
        (dict(min_ops=5, max_ops=4), "min_ops <= max_ops"),
        (dict(max_value=0), "max_value"),
        (dict(ops=""), "subset"),
        (dict(ops="+/"), "subset"),
        (dict(ops="++"), "repeated"),
        (dict(max_factor=1), "max_factor"),
        (dict(ops="*", max_value=15, max_ops=4), "No chain of 4"),  # needs 1*2*2*2*2 = 16
        (dict(ops="+", max_value=3, min_ops=4, max_ops=4), "No chain"),
    ],
)
def test_config_rejects_bad_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ArithmeticConfig(**kwargs)


def test_config_type_errors_and_canonical_ops():
    with pytest.raises(TypeError, match="max_value"):
        ArithmeticConfig(max_value=99.0)
    with pytest.raises(TypeError, match="min_ops"):
        ArithmeticConfig(min_ops=True)
    assert ArithmeticConfig(ops="*+") == ArithmeticConfig(ops="+*")
    assert ArithmeticConfig(ops="*-+").ops == "+-*"


# ----------------------------------------------------------------------------- problems


@pytest.mark.parametrize(
    "cfg",
    [
        ArithmeticConfig(),
        ArithmeticConfig(min_ops=1, max_ops=6, max_value=20, max_factor=3),
        ArithmeticConfig(ops="-*", max_value=50),
        ArithmeticConfig(ops="*", max_value=16, min_ops=4, max_ops=4),  # only 1*2*2*2*2 fits
    ],
    ids=["default", "small", "no_add", "tight_mul"],
)
def test_problems_stay_in_range_and_match_their_question(cfg):
    problems = arithmetic.generate_problems(7, 1500, cfg)
    n_ops_seen, ops_seen = set(), set()
    for p in problems:
        assert p["verifier"] == "arithmetic"
        start, chain = solve_question(p["question"])
        assert cfg.min_ops <= len(chain) <= cfg.max_ops
        value = start
        assert 0 <= value <= cfg.max_value
        for (op, b), step in zip(chain, p["steps"], strict=True):
            assert op in cfg.ops
            if op == "*":
                assert 2 <= b <= cfg.max_factor
            else:
                assert b >= 1
            new = PY_OPS[op](value, b)
            assert 0 <= b <= cfg.max_value and 0 <= new <= cfg.max_value, p["question"]
            assert step == (value, op, b, new)
            value = new
        assert p["answer"] == str(value)
        n_ops_seen.add(len(chain))
        ops_seen.update(op for op, _ in chain)
    assert n_ops_seen == set(range(cfg.min_ops, cfg.max_ops + 1))
    assert ops_seen == set(cfg.ops)


def test_tight_config_draws_its_only_chain():
    cfg = ArithmeticConfig(ops="*", max_value=16, min_ops=4, max_ops=4)
    (p,) = arithmetic.generate_problems(0, 1, cfg)
    assert p["question"] == (
        "Start with 1. Step 1: multiply by 2. Step 2: multiply by 2. Step 3: multiply by 2. "
        "Step 4: multiply by 2."
    )
    assert p["answer"] == "16"


def test_generation_is_deterministic_per_seed():
    a = arithmetic.generate_problems(3, 50)
    assert a == arithmetic.generate_problems(3, 50)
    assert a[:20] == arithmetic.generate_problems(3, 20)
    b = arithmetic.generate_problems(4, 50)
    assert sum(x["question"] == y["question"] for x, y in zip(a, b, strict=True)) < 5
    rng1, rng2 = np.random.default_rng(11), np.random.default_rng(11)
    assert arithmetic.generate_problem(rng1) == arithmetic.generate_problem(rng2)


def test_problem_key_identifies_the_chain():
    problems = arithmetic.generate_problems(0, 3000, ArithmeticConfig(max_value=9, max_ops=2))
    by_key = {}
    for p in problems:
        by_key.setdefault(arithmetic.problem_key(p), p)
        assert by_key[arithmetic.problem_key(p)] == p
    assert len(by_key) < len(problems)  # the small space does repeat problems


# ----------------------------------------------------------------------------- text formats


def test_exact_text_formats():
    assert arithmetic.worked_solution(PROBLEM) == (
        "Step 1: 17 + 8 = 25\nStep 2: 25 - 5 = 20\nStep 3: 20 * 3 = 60"
    )
    assert arithmetic.make_prompt(PROBLEM["question"]) == PROMPT
    assert arithmetic.target_completion(PROBLEM) == (
        "\nStep 1: 17 + 8 = 25\nStep 2: 25 - 5 = 20\nStep 3: 20 * 3 = 60\n</think>\n"
        "<answer>60</answer>"
    )
    assert arithmetic.target_completion(PROBLEM, worked=False) == "\n</think>\n<answer>60</answer>"
    fmt = arithmetic.format_pretraining_example
    assert fmt(PROBLEM, "worked") == PROMPT + arithmetic.target_completion(PROBLEM)
    assert fmt(PROBLEM, "bare") == PROMPT + "\n</think>\n<answer>60</answer>"
    assert fmt(PROBLEM, "qa") == f"Q: {PROBLEM['question']}\nA: 60"
    assert fmt(PROBLEM, "steps") == (
        f"{PROBLEM['question']}\nStep 1: 17 + 8 = 25\nStep 2: 25 - 5 = 20\n"
        "Step 3: 20 * 3 = 60\nThe answer is 60."
    )
    with pytest.raises(ValueError, match="style"):
        fmt(PROBLEM, "latex")


def test_question_wording():
    assert arithmetic.question_text(4, [("*", 2)]) == "Start with 4. Step 1: multiply by 2."
    assert (
        arithmetic.question_text(9, [("-", 3), ("+", 1)])
        == "Start with 9. Step 1: subtract 3. Step 2: add 1."
    )


@pytest.mark.parametrize("worked", [True, False])
def test_completions_agree_with_the_outcome_verifier_format(worked):
    # The arithmetic verifier reads only the last <answer>...</answer> and wants the gold integer.
    for p in arithmetic.generate_problems(1, 100):
        text = arithmetic.make_prompt(p["question"]) + arithmetic.target_completion(
            p, worked=worked
        )
        answers = re.findall(r"<answer>(.*?)</answer>", text, flags=re.S)
        assert answers[-1] == p["answer"] == str(int(answers[-1]))
        assert text.endswith("</answer>")
        assert arithmetic.check_steps(text, p) == ([True] * len(p["steps"]) if worked else [])


# ----------------------------------------------------------------------------- corpus


def classify(text: str) -> tuple[str, str]:
    """(style, question) read back from a corpus text by its layout."""
    if text.startswith(templates.INSTRUCTION):
        question = re.search(r"\nProblem: (.*)\n<think>", text)[1]
        return ("worked" if " = " in text else "bare"), question
    if text.startswith("Q: "):
        return "qa", text.split("\n")[0][3:]
    assert "\nStep 1: " in text and text.endswith("."), text
    return "steps", text.split("\n")[0]


def test_corpus_style_counts_and_determinism():
    cfg = ArithmeticConfig()
    corpus = arithmetic.pretraining_corpus(5, 1000, cfg, frac_worked=0.2)
    assert corpus == arithmetic.pretraining_corpus(5, 1000, cfg, frac_worked=0.2)
    assert corpus != arithmetic.pretraining_corpus(6, 1000, cfg, frac_worked=0.2)
    counts = collections.Counter(classify(t)[0] for t in corpus)
    assert counts == {"worked": 100, "steps": 100, "bare": 400, "qa": 400}
    # Shuffled: the first half is not all one group.
    assert 50 < sum(classify(t)[0] in ("worked", "steps") for t in corpus[:500]) < 150

    counts = collections.Counter(
        classify(t)[0]
        for t in arithmetic.pretraining_corpus(0, 300, cfg, frac_worked=0.7, frac_template=1.0)
    )
    assert counts == {"worked": 210, "bare": 90}
    only_bare = arithmetic.pretraining_corpus(0, 50, cfg, frac_worked=0.0, frac_template=0.0)
    assert {classify(t)[0] for t in only_bare} == {"qa"}
    with pytest.raises(ValueError, match="frac_worked"):
        arithmetic.pretraining_corpus(0, 10, cfg, frac_worked=1.5)

    # A separate template share for worked texts: 400 worked (40 in the template), 600 bare
    # (420 in the template).
    counts = collections.Counter(
        classify(t)[0]
        for t in arithmetic.pretraining_corpus(
            0, 1000, cfg, frac_worked=0.4, frac_template=0.7, frac_template_worked=0.1
        )
    )
    assert counts == {"worked": 40, "steps": 360, "bare": 420, "qa": 180}
    with pytest.raises(ValueError, match="frac_template_worked"):
        arithmetic.corpus_styles(10, frac_worked=0.5, frac_template_worked=-0.1)


def test_corpus_texts_match_their_problems():
    for text in arithmetic.pretraining_corpus(2, 200, frac_worked=0.5):
        style, question = classify(text)
        start, chain = solve_question(question)
        value = start
        for op, b in chain:
            value = PY_OPS[op](value, b)
        assert text.endswith((f"<answer>{value}</answer>", f"A: {value}", f"is {value}."))


def test_corpus_honours_exclude_keys():
    cfg = ArithmeticConfig(max_value=9, min_ops=2, max_ops=2)  # small space: overlap is likely
    held_out = {arithmetic.problem_key(p) for p in ArithmeticTask(cfg).eval_set(0, 100)}
    questions = lambda corpus: {classify(t)[1] for t in corpus}
    unfiltered = arithmetic.pretraining_corpus(1, 2000, cfg, frac_worked=0.5)
    assert questions(unfiltered) & held_out  # the filter below has something to remove
    filtered = arithmetic.pretraining_corpus(
        1, 2000, cfg, frac_worked=0.5, exclude_keys=list(held_out)
    )
    assert len(filtered) == 2000
    assert not questions(filtered) & held_out


# ----------------------------------------------------------------------------- step checks


def response(*lines: str, answer: str = "60") -> str:
    return "\n" + "\n".join(lines) + f"\n</think>\n<answer>{answer}</answer>"


RIGHT = ("17 + 8 = 25", "25 - 5 = 20", "20 * 3 = 60")


@pytest.mark.parametrize(
    "lines, expected",
    [
        (RIGHT, [True, True, True]),
        (("17 + 8 = 25", "25 - 5 = 21", "21 * 3 = 63"), [True, False, False]),  # slip carried on
        (("17 + 8 = 25", "25 - 5 = 20", "20 * 3 = 63"), [True, True, False]),  # wrong result
        (("17 + 8 = 25", "25 * 3 = 75", "75 - 5 = 70"), [True, False, False]),  # misordered
        (("17 + 8 = 25", "20 * 3 = 60"), [True, False]),  # missing middle step
        (("17 + 8 = 25", "25 - 5 = 20"), [True, True]),  # missing last step
        ((*RIGHT, "60 + 0 = 60"), [True, True, True, False]),  # extra step
        (("8 + 17 = 25", "25 - 5 = 20", "20 * 3 = 60"), [False, True, True]),  # operands swapped
        (("17 + 8 = 25", "25 + -5 = 20", "20 * 3 = 60"), [True, False, True]),  # wrong operator
        (("10 + 10 = 20", "20 * 3 = 60"), [False, False]),  # right arithmetic, wrong chain
        (("Step 1: 17 + 8 = 25", "Step 2: 25 - 5 = 20.", "  20*3=60  "), [True, True, True]),
        (("I add 8 first.", "17 + 8 = 25", "then", "25 - 5 = 20", "20 * 3 = 60"), [True] * 3),
        (("17 + 8 = 25 and 25 - 5 = 20", "17 + 8 + 1 = 26"), []),  # not one step per line
        (("17 - 20 = -3",), [False]),
        ((), []),
    ],
)
def test_check_steps(lines, expected):
    text = response(*lines)
    assert arithmetic.check_steps(text, PROBLEM) == expected
    assert arithmetic.count_steps(text) == len(expected)
    assert arithmetic.has_steps(text) == bool(expected)
    assert arithmetic.process_correct(text, PROBLEM) == (expected == [True, True, True])


def test_check_arithmetic_ignores_the_chain():
    text = response("10 + 10 = 20", "20 * 3 = 61", "17 - 20 = -3")
    assert arithmetic.check_arithmetic(text) == [True, False, True]
    assert arithmetic.parse_steps(text) == [(10, "+", 10, 20), (20, "*", 3, 61), (17, "-", 20, -3)]


def test_steps_outside_the_think_block_do_not_count():
    after = "\n</think>\n17 + 8 = 25\n<answer>60</answer>"
    assert arithmetic.count_steps(after) == 0
    # An unclosed think block ends at <answer>; with neither, the whole response is read.
    unclosed = "\n17 + 8 = 25\n<answer>60</answer>\n25 - 5 = 20"
    assert arithmetic.check_steps(unclosed, PROBLEM) == [True]
    assert arithmetic.check_steps("\n17 + 8 = 25\n25 - 5 = 20", PROBLEM) == [True, True]


def test_full_prompt_plus_response_is_read_like_the_response():
    # The instruction itself mentions <think> </think>; only the policy's block must be read.
    text = PROMPT + response(*RIGHT)
    assert arithmetic.check_steps(text, PROBLEM) == [True, True, True]
    assert arithmetic.process_correct(text, PROBLEM)
    assert templates.think_block(text) == "\n" + "\n".join(RIGHT) + "\n"


def test_checks_accept_json_round_tripped_examples():
    # Examples may cross a process boundary as JSON, which turns step tuples into lists.
    problem = json.loads(json.dumps(PROBLEM))
    assert arithmetic.process_correct(response(*RIGHT), problem)


# ----------------------------------------------------------------------------- task


def test_task_interface():
    task = ArithmeticTask()
    assert task.verifier_name == "arithmetic" and task.name == "arithmetic"
    assert task.cfg == ArithmeticConfig()
    assert task.prompt(PROBLEM) == PROMPT
    assert task.key(PROBLEM) == PROBLEM["question"]


def test_train_iterator_is_deterministic_resumable_and_filtered():
    cfg = ArithmeticConfig(max_value=9, min_ops=2, max_ops=2)
    task = ArithmeticTask(cfg)
    held_out = {task.key(p) for p in task.eval_set(0, 60)}

    def take(it, n):
        return [next(it) for _ in range(n)]

    batches = take(task.train_iterator(0, 16, held_out), 30)
    assert all(len(b) == 16 for b in batches)
    assert batches == take(task.train_iterator(0, 16, held_out), 30)
    assert batches[10:] == take(task.train_iterator(0, 16, held_out, start_batch=10), 20)
    assert batches != take(task.train_iterator(1, 16, held_out), 30)
    assert not {task.key(p) for b in batches for p in b} & held_out
    unfiltered = take(task.train_iterator(0, 16), 30)
    assert {task.key(p) for b in unfiltered for p in b} & held_out  # the filter had work to do
    with pytest.raises(ValueError, match="batch_size"):
        next(task.train_iterator(0, 0))


def test_eval_set_is_distinct_deterministic_and_filtered():
    task = ArithmeticTask(ArithmeticConfig(max_value=9, min_ops=2, max_ops=2))
    evals = task.eval_set(3, 200)
    assert evals == task.eval_set(3, 200)
    keys = [task.key(p) for p in evals]
    assert len(set(keys)) == 200
    others = task.eval_set(4, 100, exclude_keys=keys)
    assert not {task.key(p) for p in others} & set(keys)


def test_exhausted_problem_space_raises():
    task = ArithmeticTask(ArithmeticConfig(ops="+", max_value=2, min_ops=2, max_ops=2))
    (only,) = task.eval_set(0, 1)
    assert only["question"] == "Start with 0. Step 1: add 1. Step 2: add 1."
    with pytest.raises(ValueError, match="only 1 of 2 distinct"):
        task.eval_set(0, 2)
    with pytest.raises(ValueError, match="too small"):
        next(task.train_iterator(0, 4, exclude_keys={task.key(only)}))
