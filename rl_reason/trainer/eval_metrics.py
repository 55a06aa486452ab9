"""Evaluation summaries from per-sample correctness: mean@n, unbiased pass@k, majority vote maj@k.

Shapes: P problems, n samples per problem. ``correct_Pn[p, j]`` says whether sample j of problem
p was judged correct by the task's verifier; ``answers[p][j]`` is the answer the verifier
extracted from that sample (None when nothing could be extracted).

Pure numpy on purpose: it runs on the host next to the verifiers, which import no jax.

Reference:
  [Codex] Chen et al. 2021, "Evaluating Large Language Models Trained on Code",
          arXiv:2107.03374 (the unbiased pass@k estimator, Sec. 2.1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct [Codex]: 1 - C(n-c, k) / C(n, k).

    The probability that k samples drawn without replacement from the n contain at least one
    correct one. Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which equals the binomial ratio
    but never forms the huge binomial coefficients (n=200, k=100 overflows float64 otherwise).
    """
    n, c, k = int(n), int(c), int(k)
    if n < 1:
        raise ValueError(f"pass_at_k needs n >= 1 samples, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(
            f"pass_at_k needs 1 <= k <= n, got k={k}, n={n}: pass@k is only estimable from at "
            "least k samples per problem; sample more or ask for a smaller k"
        )
    if n - c < k:
        # Every k-subset must contain a correct sample; C(n-c, k) is 0.
        return 1.0
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)
    return float(1.0 - np.prod(1.0 - k / i))


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent non-None answer; ties go to the one that appeared first. None if none."""
    counts: dict[str, int] = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    if not counts:
        return None
    best = max(counts.values())
    # dicts keep insertion order, so the first answer reaching the top count is the earliest seen.
    return next(a for a, m in counts.items() if m == best)


def summarize(
    correct: np.ndarray,
    answers: Sequence[Sequence[str | None]] | None,
    ks: Sequence[int],
) -> dict[str, float]:
    """Summarise a sampled evaluation of P problems with n samples each.

    Args:
      correct: [P, n] bool (or 0/1) correctness of every sample.
      answers: P rows of n extracted answers (None where extraction failed), or None to skip maj@k.
      ks: the k values for pass@k and maj@k; each must be in [1, n].

    Returns:
      ``{"mean@{n}": ..., "pass@{k}": ..., "maj@{k}": ...}`` as floats in [0, 1]:
        * mean@n: mean correctness over all P*n samples.
        * pass@k: the unbiased estimator averaged over problems (uses all n samples).
        * maj@k: fraction of problems whose majority answer among the *first* k samples is
          correct. None answers never win the vote; ties go to the answer seen first; a problem
          whose first k samples have no answer counts as wrong. The voted answer's correctness is
          taken from any sample that produced it: a deterministic verifier gives identical
          answer strings one verdict, so "any" and "all" differ only if it is inconsistent.
    """
    correct_Pn = np.asarray(correct)
    if correct_Pn.ndim != 2 or correct_Pn.shape[0] == 0 or correct_Pn.shape[1] == 0:
        raise ValueError(f"correct must be a non-empty [P, n] array, got shape {correct_Pn.shape}")
    if correct_Pn.dtype != np.bool_:
        if not np.isin(correct_Pn, (0, 1)).all():
            raise ValueError("correct must be bool or 0/1; got other values")
        correct_Pn = correct_Pn.astype(bool)
    num_problems, n = correct_Pn.shape
    ks = [int(k) for k in ks]
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise ValueError(
            f"ks {bad} are outside [1, n={n}]: pass@k and maj@k need at least k samples per "
            "problem; sample more or drop those k"
        )
    if answers is not None:
        if len(answers) != num_problems or any(len(row) != n for row in answers):
            raise ValueError(
                f"answers must be {num_problems} rows of {n} answers to match correct's shape "
                f"{correct_Pn.shape}"
            )

    out: dict[str, float] = {f"mean@{n}": float(correct_Pn.mean())}
    c_P = correct_Pn.sum(axis=1)
    for k in ks:
        out[f"pass@{k}"] = float(np.mean([pass_at_k(n, int(c), k) for c in c_P]))
    if answers is not None:
        for k in ks:
            hits = sum(
                majority_correct(answers[p][:k], correct_Pn[p, :k]) for p in range(num_problems)
            )
            out[f"maj@{k}"] = hits / num_problems
    return out


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the majority answer of these samples is correct (see `summarize`'s maj@k)."""
    voted = majority_vote(answers)
    return voted is not None and any(
        a == voted and bool(c) for a, c in zip(answers, correct, strict=True)
    )


def greedy_accuracy(correct_greedy: Sequence[bool]) -> float:
    """Fraction of problems whose single greedy (temperature 0) answer is correct."""
    c = np.asarray(correct_greedy, dtype=bool)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"correct_greedy must be a non-empty 1-D sequence, got shape {c.shape}")
    return float(c.mean())
