"""The bridge redone: the causal test with readers whose outcome is known, the copy rate on
hand-made completions, and the greedy answers and prefix measures of a tiny model checked
against a per-text forward pass."""

import functools
import math
import re

import jax
import numpy as np
import pytest
from flax import nnx

from rl_reason.pipelines.research import bridge, corruption
from rl_reason.tasks import arithmetic, templates
from rl_reason.verifiers.arithmetic_steps import apply_op
from tests.test_research_measures import build_tiny_model

# 17 + 8 = 25, 25 - 5 = 20, 20 + 3 = 23.
PROBLEM = {
    "question": "Start with 17. Step 1: add 8. Step 2: subtract 5. Step 3: add 3.",
    "answer": "23",
    "steps": [(17, "+", 8, 25), (25, "-", 5, 20), (20, "+", 3, 23)],
    "verifier": "arithmetic",
}


def test_corrupt_shifts_one_value_and_carries_the_chain_on():
    chain = corruption.corrupt(PROBLEM, 1, 2)
    assert chain == [(17, "+", 8, 27), (27, "-", 5, 22), (22, "+", 3, 25)]
    assert corruption.corrupt(PROBLEM, 2, -1) == [
        (17, "+", 8, 25),
        (25, "-", 5, 19),
        (19, "+", 3, 22),
    ]
    times = {"answer": "30", "steps": [(3, "+", 2, 5), (5, "*", 3, 15), (15, "*", 2, 30)]}
    assert corruption.corrupt(times, 1, 1)[-1] == (18, "*", 2, 36)  # (5 + 1) * 3 * 2
    for at, delta in ((0, 1), (3, 1), (1, 0)):  # the answer itself, or no change: not a case
        with pytest.raises(ValueError):
            corruption.corrupt(PROBLEM, at, delta)


def test_cases_are_deterministic_in_range_and_skip_one_step_problems():
    problems = arithmetic.ArithmeticTask().eval_set(0, 60)
    one_step = {
        "question": "Start with 2. Step 1: add 3.",
        "answer": "5",
        "steps": [(2, "+", 3, 5)],
    }
    found = corruption.cases([*problems, one_step], seed=0, max_value=99)
    assert found == corruption.cases([*problems, one_step], seed=0, max_value=99)
    assert found != corruption.cases(problems, seed=1, max_value=99)
    assert all(c.problem_id < len(problems) for c in found)  # the one-step problem has none
    assert len(found) >= 55
    for c in found:
        p = problems[c.problem_id]
        assert 1 <= c.at < len(p["steps"]) and c.delta in corruption.DELTAS
        assert c.corrupted_answer != c.true_answer == p["answer"]
        assert all(0 <= s[0] <= 99 and 0 <= s[3] <= 99 for s in c.steps)
        # Exactly one false line, the corrupted one; the rest are true.
        false = [i + 1 for i, (a, op, b, v) in enumerate(c.steps) if apply_op(a, op, b) != v]
        assert false == [c.at]


def _last_number(pairs):
    return [re.findall(r"\d+", reasoning)[-1] for _, reasoning in pairs]


def _solve_question(pairs):
    out = []
    for problem, _ in pairs:
        numbers = [int(x) for x in re.findall(r"\d+", problem["question"])]
        words = re.findall(r"add|subtract|multiply", problem["question"])
        value = numbers[0]
        for word, b in zip(words, numbers[2::2], strict=True):  # "Step i: <op> b."
            value = {"add": value + b, "subtract": value - b, "multiply": value * b}[word]
        out.append(str(value))
    return out


def _read(reader, problems, cases):
    return reader([(problems[c.problem_id], c.reasoning()) for c in cases])


def test_causal_rates_with_readers_whose_outcome_is_known():
    problems = arithmetic.ArithmeticTask().eval_set(1, 40)
    cases = corruption.cases(problems, 0, 99)
    copier = corruption.rates(cases, _read(_last_number, problems, cases))
    assert copier["follow_rate"] == 1.0 and copier["recovery_rate"] == 0.0
    solver = corruption.rates(cases, _read(_solve_question, problems, cases))
    assert solver["recovery_rate"] == 1.0 and solver["follow_rate"] == 0.0
    assert corruption.rates(cases, [None] * len(cases))["other_rate"] == 1.0
    # Half copy, half solve: half follow, half recover, by construction.
    answers = [c.corrupted_answer if i % 2 else c.true_answer for i, c in enumerate(cases)]
    r = corruption.rates(cases, answers)
    assert r["follow_rate"] == pytest.approx((len(cases) // 2) / len(cases))
    assert r["follow_rate"] + r["recovery_rate"] == pytest.approx(1.0)
    assert math.isnan(corruption.rates([], [])["follow_rate"])
    with pytest.raises(ValueError, match="answers"):
        corruption.rates(cases, [])


def _completion(lines, answer):
    return templates.make_completion("\n".join(lines), answer)


def test_own_copy_by_hand():
    own = [
        _completion(["Step 1: 17 + 8 = 25", "Step 2: 25 - 5 = 20", "Step 3: 20 + 3 = 23"], "23"),
        _completion(["Step 1: 17 + 8 = 25", "Step 2: 25 - 5 = 21"], "21"),  # follows, wrong
        _completion(["Step 1: 17 + 8 = 25", "Step 2: 25 - 5 = 20"], "23"),  # gold anyway
        _completion(["Step 1: 17 + 8 = 26", "Wait. Step 1: 17 + 8 = 25"], "26"),  # not the last
        _completion([], "23"),  # no steps: not in the denominator
        "\nStep 1: 17 + 8 = 25",  # no answer: not in the denominator
    ]
    r = bridge.own_copy([PROBLEM] * len(own), own)
    assert r["own_copy_share"] == pytest.approx(4 / 6)
    assert r["own_copy_rate"] == pytest.approx(2 / 4)  # the first two
    assert r["own_wrong_last_share"] == pytest.approx(3 / 4)  # last values 21, 20, 25
    assert r["own_follow_wrong_last"] == pytest.approx(1 / 3)
    assert r["own_gold_wrong_last"] == pytest.approx(1 / 3)


def test_answer_context_is_the_text_before_the_answer():
    full = bridge.bridge_texts(PROBLEM, "")["gold"]
    context = bridge.answer_context(PROBLEM, arithmetic.worked_solution(PROBLEM))
    assert full == bridge.with_answer(context, "23") and context.endswith(templates.ANSWER_OPEN)
    assert bridge.gold_prefix(PROBLEM, 0) == ""
    assert bridge.gold_prefix(PROBLEM, 2) == "Step 1: 17 + 8 = 25\nStep 2: 25 - 5 = 20"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    tok, _, _, graphdef, params = build_tiny_model(tmp_path_factory.mktemp("tok"))
    return tok, graphdef, params


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, ids_BT):
    return nnx.merge(graphdef, params)(ids_BT)


def _greedy_ids(graphdef, params, ids, n):
    """`n` tokens of greedy decoding after `ids`, one full forward pass per token."""
    ids, out = list(ids), []
    for _ in range(n):
        padded = np.zeros((1, 256), np.int32)
        padded[0, : len(ids)] = ids
        nxt = int(np.argmax(np.asarray(_forward(graphdef, params, padded))[0, len(ids) - 1]))
        ids, out = ids + [nxt], out + [nxt]
    return out


def test_greedy_flags_match_greedy_decoding_text_by_text(tiny_model):
    tok, graphdef, params = tiny_model
    open_id = tok.piece_to_id(templates.ANSWER_OPEN)
    close_id = tok.piece_to_id(templates.ANSWER_CLOSE)
    problems = arithmetic.ArithmeticTask().eval_set(0, 4)
    contexts = [bridge.answer_context(p, bridge.gold_prefix(p, k)) for k, p in enumerate(problems)]
    texts, expected = [], []
    for context, p in zip(contexts, problems, strict=True):
        ctx_ids = tok.encode(context, add_bos=True)
        decoded = _greedy_ids(graphdef, params, ctx_ids, 4)
        # The model's own first greedy token as an answer (when it is not a tag), the gold
        # answer and a wrong one.
        first = tok.decode(decoded[:1]).strip()
        for answer in {first, p["answer"], "77"} - {""}:
            if any(x in answer for x in ("<", ">")):
                continue
            text = bridge.with_answer(context, answer)
            ids = tok.encode(text, add_bos=True)
            s, e = bridge.answer_span(ids, open_id, close_id)
            assert ids[:s] == ctx_ids  # the context tokenizes the same inside the text
            want = ids[s:e] + [close_id]
            texts.append(text)
            expected.append(_greedy_ids(graphdef, params, ctx_ids, len(want)) == want)
    _, _, greedy = bridge.answer_scores(graphdef, params, tok, texts, batch_size=4)
    assert list(greedy) == expected


def test_measure_reports_the_new_keys_within_bounds(tiny_model):
    tok, graphdef, params = tiny_model
    problems = arithmetic.ArithmeticTask().eval_set(0, 6)
    own = [arithmetic.target_completion(p) for p in problems]
    m = bridge.measure(graphdef, params, tok, problems, own, max_value=99)
    longest = max(len(p["steps"]) for p in problems)
    assert m["prefix0_share"] == 1.0 and f"prefix{longest + 1}_share" not in m
    for k in range(longest + 1):
        assert 0.0 <= m[f"prefix{k}_accuracy"] <= 1.0 and 0.0 <= m[f"prefix{k}_copy"] <= 1.0
        assert m[f"prefix{k}_nll_mean"] > 0 and m[f"prefix{k}_nll_median"] > 0
    # k = 0 is the question alone; the whole chain is the gold context.
    assert m["prefix0_nll_mean"] == pytest.approx(m["nll_none"], rel=1e-5)
    rates = [m[f"causal_{k}_rate"] for k in ("follow", "recovery", "other")]
    assert all(0.0 <= r <= 1.0 for r in rates) and sum(rates) == pytest.approx(1.0)
    assert m["causal_corrupted_share"] == 1.0  # every problem here has >= 2 steps
    # The worked completions copy their last value, which is the gold answer.
    assert m["own_copy_share"] == m["own_copy_rate"] == 1.0 and m["own_wrong_last_share"] == 0.0
    assert m["nll_median_gold"] > 0


def _fake_scores(corrupt_after=None):
    """A stand-in for the model that predicts each next token of the text itself, except the
    token after `corrupt_after` (a token id) when given."""

    def scores(graphdef, params, ids_BT, mask_BT):
        next_BT = np.concatenate([ids_BT[:, 1:], np.zeros_like(ids_BT[:, :1])], axis=1)
        if corrupt_after is not None:
            next_BT = np.where(ids_BT == corrupt_after, -1, next_BT)
        return np.zeros(ids_BT.shape, np.float32), next_BT

    return scores


def test_greedy_flags_with_a_scorer_whose_answers_are_known(tiny_model, monkeypatch):
    tok = tiny_model[0]
    problems = arithmetic.ArithmeticTask().eval_set(0, 3)
    texts = [bridge.bridge_texts(p, "")["gold"] for p in problems]
    monkeypatch.setattr(bridge, "_scores", _fake_scores())
    assert bridge.answer_scores(None, None, tok, texts)[2].all()  # it writes every answer
    # Wrong about the first answer token, or about the closing tag after the answer: never.
    for after in (templates.ANSWER_OPEN, None):
        if after is None:  # the last answer token precedes </answer>: corrupt what follows it
            ids = tok.encode(texts[0], add_bos=True)
            open_id, close_id = (tok.piece_to_id(t) for t in templates.SPECIAL_TOKENS[2:])
            after_id = ids[bridge.answer_span(ids, open_id, close_id)[1] - 1]
        else:
            after_id = tok.piece_to_id(after)
        monkeypatch.setattr(bridge, "_scores", _fake_scores(after_id))
        assert not bridge.answer_scores(None, None, tok, texts[:1])[2].any(), after
