"""The reasoning bridge: how likely the gold answer is with and without reasoning before it,
and whether the answer follows the reasoning it is given.

For a problem and a policy, the teacher-forced log-probability of the gold answer's tokens
(between ``<answer>`` and ``</answer>``) is read in three contexts, each the R1 prompt followed
by a completion in the template::

    none   prompt + "\\n</think>\\n<answer>"                    (the question alone)
    own    prompt + "\\n{own reasoning}\\n</think>\\n<answer>"   (the policy's greedy think)
    gold   prompt + "\\n{worked solution}\\n</think>\\n<answer>" (the right steps)

An empty own think block makes "own" the same text as "none". The per-token perplexity of the
answer in a context is exp(total NLL / total answer tokens) over the problems; answers are
mostly one token, so the mean and the median NLL per problem are reported beside it (a few
problems with a huge NLL move the mean and the perplexity, not the median).

Both "own" and "gold" end with a step whose result is the answer the chain reached, so a low
NLL there is what copying the last number gives. What separates copying from using the steps:

  copy rate   on the policy's own greedy completions, how often the written answer equals the
              result of the last step line written; and, when that last value is not the gold
              answer, whether the answer follows it or is the gold answer anyway
  prefixes    the first k gold steps only (k = 0 .. n): the answer's NLL, and the model's own
              greedy answer (its accuracy, and how often it is the last value in the context)
  causal      one intermediate value of the gold chain corrupted and carried on
              (`research.corruption`): does the greedy answer follow the corrupted chain or
              recover the true answer?

Greedy answers here are read after "<answer>" by repeated full forward passes (argmax), a few
tokens at most, not by the sampler.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rl_reason.pipelines.research import corruption, measures, steps
from rl_reason.tasks import arithmetic, templates

CONTEXTS = ("none", "own", "gold")
ANSWER_TOKENS = 6  # greedy answers stop here if no </answer> came: the task's have 1-3


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


def answer_context(problem: Mapping[str, Any], reasoning: str) -> str:
    """Prompt + a think block holding `reasoning` + the opening answer tag: where the answer
    is read (teacher-forced) or written (greedy)."""
    completion = templates.make_completion(reasoning, "")
    return arithmetic.make_prompt(problem["question"]) + completion.removesuffix(
        templates.ANSWER_CLOSE
    )


def with_answer(context: str, answer: str) -> str:
    return f"{context}{answer}{templates.ANSWER_CLOSE}"


def gold_prefix(problem: Mapping[str, Any], k: int) -> str:
    """The first `k` lines of the worked solution."""
    return "\n".join(arithmetic.worked_solution(problem).split("\n")[:k]) if k else ""


def bridge_texts(problem: Mapping[str, Any], own_completion: str) -> dict[str, str]:
    """The three full texts (prompt + completion with the gold answer) for one problem."""
    own = templates.think_block(own_completion)
    reasoning = {"none": "", "own": own, "gold": arithmetic.worked_solution(problem)}
    return {
        c: with_answer(answer_context(problem, reasoning[c]), problem["answer"]) for c in CONTEXTS
    }


@functools.partial(jax.jit, static_argnums=0)
def _scores(graphdef, params, ids_BT, mask_BT):
    """(log p(ids[:, t] | ids[:, :t]) as [B, T] with column 0 set to 0, the argmax next token
    after each position [B, T])."""
    logits = nnx.merge(graphdef, params)(ids_BT, mask_BT=mask_BT).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logp, ids_BT[:, 1:, None], axis=-1)[..., 0]
    picked = jnp.concatenate([jnp.zeros_like(picked[:, :1]), picked], axis=1)
    return picked, jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _padded(rows: Sequence[Sequence[int]], batch_size: int, width: int, pad_id: int):
    """[batch_size, width] ids and mask; a fixed row count (empty rows pad the last chunk) so
    that each width compiles once."""
    ids_BT = np.full((batch_size, width), pad_id, np.int32)
    mask_BT = np.zeros((batch_size, width), bool)
    for r, x in enumerate(rows):
        ids_BT[r, : len(x)] = x
        mask_BT[r, : len(x)] = True
    return ids_BT, mask_BT


def _chunks(n: int, batch_size: int) -> Iterator[range]:
    for lo in range(0, n, batch_size):
        yield range(lo, min(lo + batch_size, n))


def _width(longest: int, multiple: int) -> int:
    return -(-longest // multiple) * multiple


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
    width = _width(max(len(x) for x in ids), width_multiple)
    nll, count = np.zeros(len(ids)), np.zeros(len(ids), np.int64)
    for rows in _chunks(len(ids), batch_size):
        batch = _padded([ids[i] for i in rows], batch_size, width, tokenizer.pad_id)
        logp_BT = np.asarray(_scores(graphdef, params, *batch)[0])
        for r, i in enumerate(rows):
            s, e = spans[i]
            nll[i] = -logp_BT[r, s:e].sum()
            count[i] = e - s
    return nll, count


def greedy_answers(
    graphdef,
    params,
    tokenizer,
    contexts: Sequence[str],
    *,
    max_tokens: int = ANSWER_TOKENS,
    batch_size: int = 64,
    width_multiple: int = 64,
) -> list[str]:
    """The greedy continuation of each context (ending in ``<answer>``) up to ``</answer>`` or
    `max_tokens`, as stripped text."""
    if not contexts:
        return []
    close_id = tokenizer.piece_to_id(templates.ANSWER_CLOSE)
    ids = tokenizer.encode_batch(list(contexts), add_bos=True)
    width = _width(max(len(x) for x in ids) + max_tokens, width_multiple)
    written: list[list[int]] = [[] for _ in ids]
    for rows in _chunks(len(ids), batch_size):
        open_rows = list(range(len(rows)))
        for _ in range(max_tokens):
            seqs = [list(ids[i]) + written[i] for i in rows]
            next_BT = np.asarray(
                _scores(graphdef, params, *_padded(seqs, batch_size, width, tokenizer.pad_id))[1]
            )
            still = []
            for r in open_rows:
                token = int(next_BT[r, len(seqs[r]) - 1])
                if token != close_id:
                    written[rows[r]].append(token)
                    still.append(r)
            open_rows = still
            if not open_rows:
                break
    return [t.strip() for t in tokenizer.decode_batch(written)]


def _rate(hits: Sequence[bool]) -> float:
    return float(np.mean(hits)) if len(hits) else float("nan")


def own_copy(problems: Sequence[Mapping[str, Any]], own: Sequence[str]) -> dict[str, float]:
    """How the policy's own answers relate to the last value of its own chain.

    own_copy_share: completions with a step line and a written answer (the denominator);
    own_copy_rate: of those, answer == the result of the last step line written;
    own_wrong_last_share: of those, the last value is not the gold answer, and among them
    own_follow_wrong_last (the answer is that last value) and own_gold_wrong_last (the
    answer is the gold one anyway).
    """
    rows = []
    for p, text in zip(problems, own, strict=True):
        last, answer = steps.read_steps(text, p).last, measures.final_answer(text)
        if last is not None and answer is not None:
            rows.append((str(last.step[3]), answer, str(p["answer"])))
    wrong_last = [(v, a, g) for v, a, g in rows if v != g]
    return {
        "own_copy_share": len(rows) / max(len(problems), 1),
        "own_copy_rate": _rate([a == v for v, a, _ in rows]),
        "own_wrong_last_share": _rate([v != g for v, _, g in rows]),
        "own_follow_wrong_last": _rate([a == v for v, a, _ in wrong_last]),
        "own_gold_wrong_last": _rate([a == g for _, a, g in wrong_last]),
    }


def prefix_measures(graphdef, params, tokenizer, problems) -> dict[str, float]:
    """For k = 0 .. the longest chain, over the problems of at least k steps, with the first k
    gold steps as the reasoning: prefix{k}_share (those problems' share), prefix{k}_nll_mean
    and _nll_median (of the gold answer), prefix{k}_accuracy (greedy answer is gold) and
    prefix{k}_copy (greedy answer is v_k, the last value in the context: the start number for
    k = 0, the gold answer for k = n)."""
    cases = [
        (k, p)
        for k in range(max(len(p["steps"]) for p in problems) + 1)
        for p in problems
        if len(p["steps"]) >= k
    ]
    contexts = [answer_context(p, gold_prefix(p, k)) for k, p in cases]
    nll, _ = answer_nll(
        graphdef,
        params,
        tokenizer,
        [with_answer(c, p["answer"]) for c, (_, p) in zip(contexts, cases, strict=True)],
    )
    answers = greedy_answers(graphdef, params, tokenizer, contexts)
    out: dict[str, float] = {}
    for k in sorted({k for k, _ in cases}):
        idx = [i for i, (kk, _) in enumerate(cases) if kk == k]
        last = [
            str(cases[i][1]["steps"][k - 1][3] if k else cases[i][1]["steps"][0][0]) for i in idx
        ]
        out[f"prefix{k}_share"] = len(idx) / len(problems)
        out[f"prefix{k}_nll_mean"] = float(nll[idx].mean())
        out[f"prefix{k}_nll_median"] = float(np.median(nll[idx]))
        out[f"prefix{k}_accuracy"] = _rate([answers[i] == str(cases[i][1]["answer"]) for i in idx])
        out[f"prefix{k}_copy"] = _rate([answers[i] == v for i, v in zip(idx, last, strict=True)])
    return out


def measure(
    graphdef,
    params,
    tokenizer,
    problems: Sequence[Mapping[str, Any]],
    own_completions: Sequence[str],
    *,
    max_value: int,
    seed: int = 0,
) -> dict[str, float]:
    """Answer perplexity per context, how often reasoning lowers the answer's NLL, the copy
    rate, the gold-prefix measures and the causal test.

    Keys: ppl_<context>, nll_<context> (mean per problem), nll_median_<context>,
    frac_own_below_none (own context gives the answer a lower NLL than none; ties do not count),
    frac_own_nonempty (problems whose own think block is not empty), frac_own_right (whose own
    steps are exactly right, `arithmetic.process_correct`), ppl_<own|none>_<nonempty|right|wrong>:
    the perplexities over those problems alone (wrong: non-empty but not right; NaN if there
    are none); the keys of `own_copy` and `prefix_measures`; and causal_follow_rate,
    causal_recovery_rate, causal_other_rate, causal_corrupted_share (`corruption.causal_test`, cases
    drawn from `seed` within [0, `max_value`]).
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
        out[f"nll_median_{c}"] = float(np.median(nll[c]))
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
    out.update(own_copy(problems, own_completions))
    out.update(prefix_measures(graphdef, params, tokenizer, problems))

    def answer(pairs):
        contexts = [answer_context(p, reasoning) for p, reasoning in pairs]
        return greedy_answers(graphdef, params, tokenizer, contexts)

    causal = corruption.causal_test(answer, problems, seed=seed, max_value=max_value)
    out.update({f"causal_{k}": v for k, v in causal.items()})
    return out
