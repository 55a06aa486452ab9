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

Whether the greedy answer is a given string a is read from the same teacher-forced pass as the
NLL: greedy decoding after "<answer>" writes exactly a and then "</answer>" iff the argmax at
each of those positions is that token. So every text costs one forward pass, all of a
measurement's texts go through one batched call, and nothing is generated.
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


def answer_scores(
    graphdef,
    params,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    width_multiple: int = 64,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(NLL summed over each text's answer tokens [N], number of answer tokens [N], whether
    greedy decoding after ``<answer>`` writes exactly the text's answer and ``</answer>`` [N]).

    Texts are right-padded to a multiple of `width_multiple` and run `batch_size` at a time, so
    a few shapes compile once. Params are used as given (on their devices).
    """
    open_id = tokenizer.piece_to_id(templates.ANSWER_OPEN)
    close_id = tokenizer.piece_to_id(templates.ANSWER_CLOSE)
    ids = tokenizer.encode_batch(list(texts), add_bos=True)
    spans = [answer_span(x, open_id, close_id) for x in ids]
    width = _width(max(len(x) for x in ids), width_multiple)
    nll, count = np.zeros(len(ids)), np.zeros(len(ids), np.int64)
    greedy = np.zeros(len(ids), bool)
    for rows in _chunks(len(ids), batch_size):
        batch = _padded([ids[i] for i in rows], batch_size, width, tokenizer.pad_id)
        logp_BT, next_BT = (np.asarray(x) for x in _scores(graphdef, params, *batch))
        for r, i in enumerate(rows):
            s, e = spans[i]
            nll[i] = -logp_BT[r, s:e].sum()
            count[i] = e - s
            # Position t predicts token t + 1: the answer tokens and the closing tag after it.
            greedy[i] = np.array_equal(next_BT[r, s - 1 : e], ids[i][s : e + 1])
    return nll, count, greedy


def answer_nll(graphdef, params, tokenizer, texts: Sequence[str], **kwargs):
    """The first two of `answer_scores`: (NLL [N], answer tokens [N])."""
    nll, count, _ = answer_scores(graphdef, params, tokenizer, texts, **kwargs)
    return nll, count


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


def _prefix_texts(problems) -> list[tuple[str, int, int, str]]:
    """(tag, k, problem index, text) for every k and problem of at least k steps: the gold
    answer ("gold") and the last value in the context ("copy") after the first k steps."""
    out = []
    for k in range(max(len(p["steps"]) for p in problems) + 1):
        for i, p in enumerate(problems):
            if len(p["steps"]) < k:
                continue
            context = answer_context(p, gold_prefix(p, k))
            last = p["steps"][k - 1][3] if k else p["steps"][0][0]
            out.append(("gold", k, i, with_answer(context, p["answer"])))
            out.append(("copy", k, i, with_answer(context, str(last))))
    return out


def _prefix_measures(rows, nll, greedy, n_problems: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in sorted({k for _, k, _, _ in rows}):
        gold = [j for j, (tag, kk, _, _) in enumerate(rows) if kk == k and tag == "gold"]
        copy = [j for j, (tag, kk, _, _) in enumerate(rows) if kk == k and tag == "copy"]
        out[f"prefix{k}_share"] = len(gold) / n_problems
        out[f"prefix{k}_nll_mean"] = float(nll[gold].mean())
        out[f"prefix{k}_nll_median"] = float(np.median(nll[gold]))
        out[f"prefix{k}_accuracy"] = float(greedy[gold].mean())
        out[f"prefix{k}_copy"] = float(greedy[copy].mean())
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
    rate, the gold-step prefixes and the causal test, from one batched teacher-forced pass.

    Keys: ppl_<context>, nll_<context> (mean per problem), nll_median_<context>,
    frac_own_below_none (own context gives the answer a lower NLL than none; ties do not count),
    frac_own_nonempty (problems whose own think block is not empty), frac_own_right (whose own
    steps are exactly right, `arithmetic.process_correct`), ppl_<own|none>_<nonempty|right|wrong>:
    the perplexities over those problems alone (wrong: non-empty but not right; NaN if there
    are none); the keys of `own_copy`; for k = 0 .. the longest chain, over the problems of at
    least k steps with the first k gold steps as the reasoning, prefix{k}_share (their share),
    prefix{k}_nll_mean / _nll_median (of the gold answer), prefix{k}_accuracy (the greedy
    answer is gold) and prefix{k}_copy (it is v_k, the last value in the context: the start
    number for k = 0); and causal_follow_rate, causal_recovery_rate, causal_other_rate and
    causal_corrupted_share (the cases of `corruption.cases`, drawn from `seed` within
    [0, `max_value`]).
    """
    if len(problems) != len(own_completions):
        raise ValueError(f"{len(problems)} problems but {len(own_completions)} completions")
    per_text = [bridge_texts(p, c) for p, c in zip(problems, own_completions, strict=True)]
    prefix_rows = _prefix_texts(problems)
    cases = corruption.cases(problems, seed, max_value)
    causal_texts = [
        with_answer(answer_context(problems[c.problem_id], c.reasoning()), answer)
        for c in cases
        for answer in (c.corrupted_answer, c.true_answer)
    ]
    texts = [t[c] for c in CONTEXTS for t in per_text]
    texts += [row[3] for row in prefix_rows] + causal_texts
    nll_all, count_all, greedy_all = answer_scores(graphdef, params, tokenizer, texts)
    n = len(problems)
    nll = {c: nll_all[i * n : (i + 1) * n] for i, c in enumerate(CONTEXTS)}
    count = count_all[:n]
    if not all(np.array_equal(count, count_all[i * n : (i + 1) * n]) for i in range(3)):
        raise ValueError("the answer tokenizes differently across contexts")
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
    lo, hi = 3 * n, 3 * n + len(prefix_rows)
    out.update(_prefix_measures(prefix_rows, nll_all[lo:hi], greedy_all[lo:hi], n))
    flags = greedy_all[hi:].reshape(-1, 2)  # per case: (greedy is corrupted, greedy is true)
    out.update(
        {f"causal_{k}": v for k, v in corruption.flag_rates(flags[:, 0], flags[:, 1]).items()}
    )
    out["causal_corrupted_share"] = len(cases) / n
    return out
