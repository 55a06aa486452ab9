"""Held-out evaluation: greedy accuracy, and mean@k / maj@k / pass@k over k sampled answers.

Needs a policy and the sampling rounds' parts, nothing of training: `experiments.evaluate`
uses it on a checkpoint without building an optimizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from rl_reason.infra import sharding
from rl_reason.infra.progress import Progress
from rl_reason.rollout.rounds import Rounds
from rl_reason.trainer import eval_metrics
from rl_reason.verifiers import answer_extraction


def vote_answer(text: str) -> str | None:
    """The answer maj@k votes on: the verifiers' anchored extraction, None unless unique."""
    answers = answer_extraction.final_answers(text).answers
    return answers[0] if len(answers) == 1 else None


class Evaluator:
    """Evaluates a policy on held-out examples with the run's sampling and verifiers.

    `response_stats(texts, examples)` -> dict of extra metrics, means over the greedy answers.
    """

    def __init__(
        self,
        rounds: Rounds,
        *,
        response_stats: Callable[[list[str], list[dict]], dict] | None = None,
    ):
        self.rounds, self.cfg, self.mesh = rounds, rounds.cfg, rounds.mesh
        self.response_stats = response_stats

    def evaluate(
        self,
        policy: tuple,
        examples: Sequence[dict],
        *,
        samples: int | None = None,
        batch_size: int = 64,
        echo: Callable[[str], None] | None = None,
    ) -> dict[str, float]:
        """`policy` = (graphdef, params, *frozen). With `echo`, a progress line (problems
        done, rate, ETA) after each chunk.

        Every process passes the same `examples`; each chunk of them is split over the processes
        like a training batch (padded to a multiple of the batch shards with copies of its last
        example, which are not counted) and the per-problem results are gathered.
        """
        examples = list(examples)
        if not examples:
            return {}
        rounds, processes = self.rounds, jax.process_count()
        k = self.cfg.eval_samples if samples is None else samples
        ks = sorted({1, k}) if k > 0 else []
        greedy_cfg = dataclasses.replace(rounds.sampling, temperature=0.0, top_k=0, top_p=1.0)
        sample_cfg = dataclasses.replace(rounds.sampling, temperature=self.cfg.eval_temperature)
        key = jax.random.key(self.cfg.seed + 10_007)
        shards = sharding.batch_shards(self.mesh)
        chunk_size = -(-batch_size // shards) * shards
        greedy_correct, greedy_len, greedy_cut, correct_k, maj_hits = [], [], [], [], []
        greedy_calls: list[int] = []  # multi-turn: each greedy response's tool calls
        stats_sums: dict[str, float] = {}
        progress = Progress("eval", len(examples), echo, every=chunk_size, unit="problems")
        for start in range(0, len(examples), chunk_size):
            real = examples[start : start + chunk_size]
            width = -(-len(real) // shards) * shards
            padded = real + [real[-1]] * (width - len(real))
            lo = jax.process_index() * width // processes
            local = padded[lo : lo + width // processes]
            n_real = max(min(len(real) - lo, len(local)), 0)

            texts, lengths, cut, calls = rounds.sample_texts(
                policy, local, key, group_size=1, config=greedy_cfg
            )
            if calls is not None:
                greedy_calls += list(calls[: len(real)])
            _, ok = rounds.outcomes(rounds.submit(texts, local), len(texts))
            greedy_correct += list(sharding.all_rows(ok)[: len(real)])
            greedy_len += list(sharding.all_rows(lengths)[: len(real)])
            greedy_cut += list(sharding.all_rows(cut)[: len(real)])
            if self.response_stats is not None:
                # Called on every process (at least one text) so all gather the same names.
                m = max(n_real, 1)
                stats = self.response_stats(texts[:m], local[:m])
                for name, value in stats.items():
                    stats_sums[name] = stats_sums.get(name, 0.0) + value * n_real
            if k > 0:
                key, sub = jax.random.split(key)
                texts, _, _, _ = rounds.sample_texts(
                    policy, local, sub, group_size=k, config=sample_cfg
                )
                per_row = [local[i // k] for i in range(len(texts))]
                _, ok = rounds.outcomes(rounds.submit(texts, per_row), len(texts))
                ok = ok.reshape(-1, k)
                votes = [
                    [vote_answer(t) for t in texts[i * k : (i + 1) * k]] for i in range(len(local))
                ]
                hits = [
                    [eval_metrics.majority_correct(v[:kk], o[:kk]) for kk in ks]
                    for v, o in zip(votes, ok, strict=True)
                ]
                correct_k += list(sharding.all_rows(ok)[: len(real)])
                maj_hits += list(sharding.all_rows(np.asarray(hits, bool))[: len(real)])
            if echo is not None:
                progress.update(start + len(real))
        result = {
            "accuracy": eval_metrics.greedy_accuracy(greedy_correct),
            "mean_response_tokens": float(np.mean(greedy_len)),
            # Greedy answers that ran out of budget: a length cap, not a wrong answer.
            "truncated_frac": float(np.mean(greedy_cut)),
        }
        if greedy_calls:
            # Multi-turn: the share of greedy responses that call the tool, and calls per one.
            result["tool_call_rate"] = float(np.mean(np.asarray(greedy_calls) > 0))
            result["tool_calls_mean"] = float(np.mean(greedy_calls))
        if k > 0:
            summary = eval_metrics.summarize(np.asarray(correct_k), None, ks=ks)
            result.update({name: float(v) for name, v in summary.items()})
            result.update(
                {f"maj@{kk}": float(np.mean(np.asarray(maj_hits)[:, i])) for i, kk in enumerate(ks)}
            )
        if self.response_stats is not None:
            names = sorted(stats_sums)
            totals = sharding.all_rows(np.asarray([[stats_sums[n] for n in names]], np.float64))
            result.update(
                {n: float(totals[:, i].sum() / len(examples)) for i, n in enumerate(names)}
            )
        return result
