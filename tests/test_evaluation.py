"""Tests for rl_reason.trainer.eval_metrics against hand-computed numbers and exact binomial counts.

pass@k is checked against math.comb in exact rational arithmetic (an independent formula from the
product form the module uses) and against brute-force enumeration of k-subsets on small n.
"""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from rl_reason.trainer import eval_metrics as E


def exact_pass_at_k(n, c, k):
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def test_pass_at_k_hand_values():
    # n=4, c=1, k=2: subsets without the correct one C(3,2)=3 of C(4,2)=6 -> 1 - 1/2.
    assert E.pass_at_k(4, 1, 2) == pytest.approx(0.5, abs=1e-15)
    # k=1 is the plain fraction correct.
    assert E.pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-15)
    # n=5, c=2, k=3: 1 - C(3,3)/C(5,3) = 1 - 1/10.
    assert E.pass_at_k(5, 2, 3) == pytest.approx(0.9, abs=1e-15)
    assert E.pass_at_k(8, 0, 4) == 0.0
    assert E.pass_at_k(8, 5, 4) == 1.0  # n - c = 3 < k: every 4-subset hits a correct one
    assert E.pass_at_k(8, 8, 8) == 1.0


def test_pass_at_k_matches_exact_binomials_and_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                want = exact_pass_at_k(n, c, k)
                assert E.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12), (n, c, k)
    # Brute force: samples 0..c-1 correct, count k-subsets containing one of them.
    n, c, k = 7, 2, 3
    subsets = list(itertools.combinations(range(n), k))
    hit = sum(any(j < c for j in s) for s in subsets) / len(subsets)
    assert E.pass_at_k(n, c, k) == pytest.approx(hit, abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    # C(200, 100) ~ 9e58 fits float64 but C(1000, 500) does not; the product form must not care.
    assert E.pass_at_k(200, 13, 100) == pytest.approx(exact_pass_at_k(200, 13, 100), abs=1e-12)
    assert E.pass_at_k(1000, 1, 500) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("n,c,k", [(4, 1, 5), (4, 1, 0), (4, 5, 2), (0, 0, 1), (4, -1, 2)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        E.pass_at_k(n, c, k)


def test_pass_at_k_k_above_n_message_says_what_to_do():
    with pytest.raises(ValueError, match="k=5, n=4.*sample more"):
        E.pass_at_k(4, 1, 5)


def test_majority_vote_rules():
    assert E.majority_vote(["1", "2", "2"]) == "2"
    assert E.majority_vote(["3", "4", "4", "3"]) == "3"  # tie -> first seen
    assert E.majority_vote([None, None, "5"]) == "5"  # None never wins, even when most frequent
    assert E.majority_vote([None, None]) is None
    assert E.majority_vote([]) is None


def test_summarize_golden():
    # Problem 0: samples correct = T F F T; answers 7 8 8 7.
    # Problem 1: samples correct = F F F F; answers None None 3 4.
    # Problem 2: samples correct = F T T T; answers 1 2 2 None.
    correct = np.array(
        [[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 1]],
        dtype=bool,
    )
    answers = [["7", "8", "8", "7"], [None, None, "3", "4"], ["1", "2", "2", None]]
    out = E.summarize(correct, answers, ks=(1, 2, 4))
    assert set(out) == {"mean@4", "pass@1", "pass@2", "pass@4", "maj@1", "maj@2", "maj@4"}
    assert out["mean@4"] == pytest.approx(5 / 12)
    # pass@1 is c/n per problem: (2/4 + 0 + 3/4) / 3.
    assert out["pass@1"] == pytest.approx((0.5 + 0.0 + 0.75) / 3)
    # pass@2: p0 1 - C(2,2)/C(4,2) = 5/6; p1 0; p2 n-c=1 < 2 -> 1.
    assert out["pass@2"] == pytest.approx((5 / 6 + 0 + 1) / 3)
    assert out["pass@4"] == pytest.approx((1 + 0 + 1) / 3)
    # maj@1: first answers 7 (correct), None (wrong), 1 (wrong).
    assert out["maj@1"] == pytest.approx(1 / 3)
    # maj@2: p0 {7,8} tie -> 7 correct; p1 all None -> wrong; p2 {1,2} tie -> 1 wrong.
    assert out["maj@2"] == pytest.approx(1 / 3)
    # maj@4: p0 7 vs 8 tie -> 7 correct; p1 3 vs 4 tie -> 3 wrong; p2 "2" x2 -> correct.
    assert out["maj@4"] == pytest.approx(2 / 3)


def test_summarize_voted_answer_correct_if_any_of_its_samples_is():
    # Answer "9" wins 2:1; only its second occurrence was judged correct.
    out = E.summarize(np.array([[False, False, True]]), [["9", "5", "9"]], ks=(3,))
    assert out["maj@3"] == 1.0


def test_summarize_without_answers_has_no_maj():
    out = E.summarize(np.array([[1, 0], [1, 1]]), None, ks=(1, 2))
    assert out == {"mean@2": 0.75, "pass@1": 0.75, "pass@2": 1.0}


def test_summarize_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"ks \[3\] are outside"):
        E.summarize(np.ones((2, 2), bool), None, ks=(1, 3))
    with pytest.raises(ValueError, match=r"\[P, n\]"):
        E.summarize(np.ones(4, bool), None, ks=(1,))
    with pytest.raises(ValueError, match="answers must be 2 rows of 2"):
        E.summarize(np.ones((2, 2), bool), [["1", "2"], ["1"]], ks=(1,))
    with pytest.raises(ValueError, match="bool or 0/1"):
        E.summarize(np.array([[0.5, 1.0]]), None, ks=(1,))


def test_greedy_accuracy():
    assert E.greedy_accuracy([True, False, True, True]) == 0.75
    with pytest.raises(ValueError):
        E.greedy_accuracy([])
