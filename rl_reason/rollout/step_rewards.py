"""Step-level rewards on the tokens that wrote each step (process supervision).

A process verifier returns, for each reasoning step it scored, the offset in the completion's
text just past the step and the step's reward (`VerifyResult.steps`). The trainer needs them
per token: the reward sits at the token whose text reaches that offset, the step's last token
(`losses.process_advantages` then credits it to that token and every earlier one).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def step_token(tokenizer, ids: Sequence[int], end: int) -> int:
    """The index of the first token of `ids` whose decoded prefix reaches `end` characters
    (the last one when none does: a step ending at the text's end)."""
    lo, hi = 1, len(ids)
    while lo < hi:  # the decoded prefix only grows with k
        mid = (lo + hi) // 2
        if len(tokenizer.decode(list(ids[:mid]))) >= end:
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


def step_reward_arrays(
    tokenizer,
    tokens: np.ndarray,
    lengths: np.ndarray,
    steps: Sequence[Sequence[tuple[int, float]]],
) -> tuple[np.ndarray, np.ndarray]:
    """[rows, N] step rewards at each step's last token, and [rows, N] 1 where a step ends.

    `tokens` [rows, N] are the completions (pad after `lengths`), `steps` each row's
    (end, reward) pairs from the verifier, ends in the decoded completion's characters. Two
    steps ending in one token add their rewards there.
    """
    rows, width = tokens.shape
    rewards = np.zeros((rows, width), np.float32)
    mask = np.zeros((rows, width), np.float32)
    for i, row_steps in enumerate(steps):
        ids = [int(t) for t in tokens[i, : int(lengths[i])]]
        if not ids:
            continue
        for end, reward in row_steps:
            t = step_token(tokenizer, ids, int(end))
            rewards[i, t] += float(reward)
            mask[i, t] = 1.0
    return rewards, mask
