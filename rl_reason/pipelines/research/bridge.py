"""The reasoning bridge: how likely the gold answer is with and without reasoning before it.

For a problem and a policy, the teacher-forced log-probability of the gold answer's tokens
(between ``<answer>`` and ``</answer>``) is read in three contexts, each the R1 prompt followed
by a completion in the template::

    none   prompt + "\\n</think>\\n<answer>"                    (the question alone)
    own    prompt + "\\n{own reasoning}\\n</think>\\n<answer>"   (the policy's greedy think)
    gold   prompt + "\\n{worked solution}\\n</think>\\n<answer>" (the right steps)

An empty own think block makes "own" the same text as "none". The per-token perplexity of the
answer in a context is exp(total NLL / total answer tokens) over the problems.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rl_reason.tasks import arithmetic, templates

CONTEXTS = ("none", "own", "gold")


def answer_span(ids: Sequence[int], answer_open_id: int, answer_close_id: int) -> tuple[int, int]:
    """[start, end) of the answer tokens: after the last ``<answer>``, before its ``</answer>``."""
    opens = [i for i, t in enumerate(ids) if t == answer_open_id]
    if not opens:
        raise ValueError("the text has no <answer> token: is the tokenizer the task's?")
    start = opens[-1] + 1
    try:
        end = list(ids).index(answer_close_id, start)
    except ValueError:
        raise ValueError("the text has no </answer> token after its last <answer>") from None
    if end == start:
        raise ValueError("the answer between <answer> and </answer> is empty")
    return start, end


def bridge_texts(problem: Mapping[str, Any], own_completion: str) -> dict[str, str]:
    """The three full texts (prompt + completion with the gold answer) for one problem."""
    prompt = arithmetic.make_prompt(problem["question"])
    own = templates.think_block(own_completion)
    reasoning = {"none": "", "own": own, "gold": arithmetic.worked_solution(problem)}
    return {
        c: prompt + templates.make_completion(reasoning[c], problem["answer"]) for c in CONTEXTS
    }


@functools.partial(jax.jit, static_argnums=0)
def _token_logprobs(graphdef, params, ids_BT, mask_BT):
    """log p(ids[:, t] | ids[:, :t]) for t >= 1, as [B, T] with column 0 set to 0."""
    logits = nnx.merge(graphdef, params)(ids_BT, mask_BT=mask_BT).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logp, ids_BT[:, 1:, None], axis=-1)[..., 0]
    return jnp.concatenate([jnp.zeros_like(picked[:, :1]), picked], axis=1)


def answer_nll(
    graphdef,
    params,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    width_multiple: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """(NLL summed over each text's answer tokens [N], number of answer tokens [N]).

    Texts are right-padded to a multiple of `width_multiple` and run `batch_size` at a time, so
    a few shapes compile once. Params are used as given (on their devices).
    """
    open_id = tokenizer.piece_to_id(templates.ANSWER_OPEN)
    close_id = tokenizer.piece_to_id(templates.ANSWER_CLOSE)
    ids = tokenizer.encode_batch(list(texts), add_bos=True)
    spans = [answer_span(x, open_id, close_id) for x in ids]
    width = -(-max(len(x) for x in ids) // width_multiple) * width_multiple
    nll, count = np.zeros(len(ids)), np.zeros(len(ids), np.int64)
    for lo in range(0, len(ids), batch_size):
        chunk = ids[lo : lo + batch_size]
        rows = batch_size  # fixed row count: the last chunk is padded with empty rows
        ids_BT = np.full((rows, width), tokenizer.pad_id, np.int32)
        mask_BT = np.zeros((rows, width), bool)
        for r, x in enumerate(chunk):
            ids_BT[r, : len(x)] = x
            mask_BT[r, : len(x)] = True
        logp_BT = np.asarray(_token_logprobs(graphdef, params, ids_BT, mask_BT))
        for r in range(len(chunk)):
            s, e = spans[lo + r]
            nll[lo + r] = -logp_BT[r, s:e].sum()
            count[lo + r] = e - s
    return nll, count


def measure(
    graphdef,
    params,
    tokenizer,
    problems: Sequence[Mapping[str, Any]],
    own_completions: Sequence[str],
) -> dict[str, float]:
    """Answer perplexity per context, and how often reasoning lowers the answer's NLL.

    Keys: ppl_<context>, nll_<context> (mean per problem), frac_own_below_none (own context
    gives the answer a lower NLL than none; ties do not count), frac_own_nonempty (problems
    whose own think block is not empty), frac_own_right (whose own steps are exactly right,
    `arithmetic.process_correct`), and ppl_<own|none>_<nonempty|right|wrong>: the perplexities
    over those problems alone (wrong: non-empty but not right; NaN if there are none).
    """
    if len(problems) != len(own_completions):
        raise ValueError(f"{len(problems)} problems but {len(own_completions)} completions")
    per_text = [bridge_texts(p, c) for p, c in zip(problems, own_completions, strict=True)]
    nll, count = {}, None
    for c in CONTEXTS:
        nll[c], count_c = answer_nll(graphdef, params, tokenizer, [t[c] for t in per_text])
        if count is not None and not np.array_equal(count, count_c):
            raise ValueError("the answer tokenizes differently across contexts")
        count = count_c
    nonempty = np.asarray([t["own"] != t["none"] for t in per_text])
    right = np.asarray(
        [arithmetic.process_correct(c, p) for p, c in zip(problems, own_completions, strict=True)]
    )
    subsets = {"nonempty": nonempty, "right": right, "wrong": nonempty & ~right}
    out: dict[str, float] = {}
    for c in CONTEXTS:
        out[f"ppl_{c}"] = float(np.exp(nll[c].sum() / count.sum()))
        out[f"nll_{c}"] = float(nll[c].mean())
    out["frac_own_below_none"] = float(np.mean(nll["own"] < nll["none"] - 1e-6))
    out["frac_own_nonempty"] = float(nonempty.mean())
    out["frac_own_right"] = float(right.mean())
    for name, rows in subsets.items():
        for c in ("own", "none"):
            out[f"ppl_{c}_{name}"] = (
                float(np.exp(nll[c][rows].sum() / count[rows].sum()))
                if rows.any()
                else float("nan")
            )
    return out
