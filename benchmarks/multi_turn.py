"""Multi-turn rollout speed: observations appended through the engine's cache against
re-prefilling the whole context at every turn, same weights, same run
(`python -m benchmarks.rollout --multi_turn`).

The environment is synthetic, at the token level, so that the host costs nothing and only the
device's work is compared: a turn ends at a marker token whose logit gets a bias that makes
turns about `turn_tokens` long on a random model (geometric lengths); every call is answered
with `observation_tokens` fixed tokens, and the host ends a trajectory at its `turns`-th call
(or the budget does).

* cached (rl_reason.rollout.multi_turn / engine `turns=`): one engine call; a waiting sample
  keeps its slot, the observation is emitted through its cache, nothing is prefilled twice;
* re-prefill: each turn is an engine call (a slot per row, the same decode loop) whose
  prompts are the rows' whole contexts so far (prompt, turns, observations), prefilled anew,
  decoding until the marker. The two differ only in how a turn's context reaches the cache.

Throughput counts every completion token (the policy's and the observations', which both
paths must place in the context) per second of the whole rollout, the best of the repeats.
The two paths draw from the same distributions with different keys (a re-prefilled turn
restarts the sampler's positions), so their token counts are close, not equal; both are
reported. Before timing, the cached path's log-probs of the policy's own tokens are checked
against a full forward pass over the whole trajectory.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import Transformer
from rl_reason.rollout import engine, sampling
from rl_reason.rollout.sampling import SamplingConfig

MARKER, OBS_TOKEN = 2, 5


class _Host:
    def __init__(self, observation_tokens: int, turns: int):
        self.stop_ids, self.obs, self.turns = (MARKER,), [OBS_TOKEN] * observation_tokens, turns
        self.calls: dict[int, int] = {}
        self.spans: dict[int, list[tuple[int, int]]] = {}

    def answer(self, rows, tokens, lengths):
        out = []
        for r, n in zip(rows, lengths, strict=True):
            r = int(r)
            self.calls[r] = self.calls.get(r, 0) + 1
            end = self.calls[r] >= self.turns
            if not end:
                self.spans.setdefault(r, []).append((int(n), int(n) + len(self.obs)))
            out.append(([] if end else self.obs, end))
        return out


def _cached(params, prompts, key, kw, observation_tokens, turns):
    host = _Host(observation_tokens, turns)
    out = engine.sample(params, prompts, key, turns=host, stream_steps=8, **kw)
    jax.block_until_ready(out)
    return out, host


def _reprefill(params, prompts, key, kw, observation_tokens, turns):
    """Every turn a new engine call on the whole contexts so far."""
    budget = kw["max_new_tokens"]
    config = kw["config"]
    rows = [list(p) for p in prompts for _ in range(kw["group_size"])]
    completions = [[] for _ in rows]
    live = list(range(len(rows)))
    turn = 0
    while live:
        key, sub = jax.random.split(key)
        room = budget - min(len(completions[r]) for r in live)
        contexts = [rows[r] + completions[r] for r in live]
        # Row counts and widths bucketed to powers of two (the padding rows' draws are
        # dropped), so that few shapes compile.
        contexts += [contexts[-1]] * (sampling.bucket(len(contexts), 1) - len(contexts))
        width = sampling.bucket(max(map(len, contexts)))
        out = engine.sample(
            params,
            contexts,
            sub,
            max_new_tokens=room,
            config=config,
            buffer_len=sampling.bucket(budget),
            prompt_width=width,
        ).sample
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        turn += 1
        still = []
        for i, r in enumerate(live):
            left = budget - len(completions[r])
            new = tokens[i, : min(int(lengths[i]), left)].tolist()
            completions[r] += new
            if new and new[-1] == MARKER and turn < turns and len(completions[r]) < budget:
                completions[r] += [OBS_TOKEN] * min(
                    observation_tokens, budget - len(completions[r])
                )
                if len(completions[r]) < budget:
                    still.append(r)
        live = still
    return completions


def _policy_gap(model: Transformer, prompts, out, host: _Host, group: int, rows: int = 2) -> float:
    """Max |log-prob the engine returned - a full forward pass's| over the policy's own tokens
    of the `rows` longest trajectories (observations excluded, read as context)."""
    s = jax.tree.map(np.asarray, out.sample)
    gap = 0.0
    for r in np.argsort(-s.lengths)[:rows]:
        n = int(s.lengths[r])
        ids = list(prompts[r // group]) + s.tokens[r, :n].tolist()
        logits = model(jnp.asarray([ids], jnp.int32))[0]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        p = len(prompts[r // group])
        own = np.ones(n, bool)
        for a, b in host.spans.get(int(r), []):
            own[a:b] = False
        want = np.asarray(logp[p - 1 : p - 1 + n][np.arange(n), s.tokens[r, :n]])
        gap = max(gap, float(np.max(np.abs(want - s.policy_logprobs[r, :n])[own])))
    return gap


def run(
    model: Transformer,
    prompts,
    *,
    group_size: int,
    max_new_tokens: int,
    turn_tokens: int,
    observation_tokens: int,
    turns: int,
    repeats: int,
) -> dict:
    vocab = model.cfg.vocab_size
    bias = math.log((vocab - 1) / (turn_tokens - 1))
    config = SamplingConfig(logit_bias=((MARKER, bias),), stop_token_ids=())
    params = nnx.split(model)
    kw = dict(
        group_size=group_size,
        max_new_tokens=max_new_tokens,
        config=config,
        buffer_len=max_new_tokens,
        prompt_width=len(prompts[0]),
    )
    # The re-prefill path stops each turn at the marker.
    re_kw = dict(kw, config=SamplingConfig(logit_bias=((MARKER, bias),), stop_token_ids=(MARKER,)))
    args = (observation_tokens, turns)
    out, host = _cached(params, prompts, jax.random.key(0), kw, *args)  # warm-up, checked
    gap = _policy_gap(model, prompts, out, host, group_size)
    # Its shapes vary with the turns' lengths: compile most of them before timing.
    for seed in range(3 if repeats > 1 else 1):
        _reprefill(params, prompts, jax.random.key(seed), re_kw, *args)
    best = {"cached": math.inf, "reprefill": math.inf}
    tokens = {"cached": 0, "reprefill": 0}
    compiles = {"cached": 0, "reprefill": 0}
    calls = []
    for i in range(repeats):
        key = jax.random.key(100 + i)
        before, t0 = sampling.compiled_count(), time.perf_counter()
        out, host = _cached(params, prompts, key, kw, *args)
        dt = time.perf_counter() - t0
        compiles["cached"] += sampling.compiled_count() - before
        if dt < best["cached"]:
            best["cached"], tokens["cached"] = dt, int(np.asarray(out.sample.lengths).sum())
            calls = list(host.calls.values())
        before, t0 = sampling.compiled_count(), time.perf_counter()
        done = _reprefill(params, prompts, key, re_kw, *args)
        dt = time.perf_counter() - t0
        compiles["reprefill"] += sampling.compiled_count() - before
        if dt < best["reprefill"]:
            best["reprefill"], tokens["reprefill"] = dt, sum(map(len, done))
    rate = {k: tokens[k] / best[k] for k in best}
    return {
        "turn_tokens": turn_tokens,
        "observation_tokens": observation_tokens,
        "turns": turns,
        "marker_logit_bias": bias,
        "cached_tokens_per_s": rate["cached"],
        "reprefill_tokens_per_s": rate["reprefill"],
        "ratio": rate["cached"] / rate["reprefill"],
        "cached_tokens": tokens["cached"],
        "reprefill_tokens": tokens["reprefill"],
        "cached_seconds": best["cached"],
        "reprefill_seconds": best["reprefill"],
        "tool_calls_mean": float(np.mean(calls)) if calls else 0.0,
        "policy_logprob_gap_vs_forward": gap,
        # Executables the timed calls compiled, per path (over all repeats; the best call of
        # each is reported, which may or may not have compiled).
        "compiled_while_timed": compiles,
    }
