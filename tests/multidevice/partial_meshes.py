"""Partial rollouts with unchanged weights on one mesh: each trained batch against one call.

`run(mesh)` runs a few steps of `rl_reason.rollout.partial.PartialRollouts` on the tiny random
model with long-tailed lengths (a stop-token bias) and, per step, samples the batch it returned
again with the static sampler in one call for the same key. With unchanged weights the carried
samples must come out as that call draws them. tests/test_partial_rollouts.py runs it on one
device; `compute` (the shared 8-device process, tests/multidevice/runner.py) on 2x2x2, whose
4 batch shards each hold a share of every batch in flight.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from models import get_config
from rl_reason.infra import sharding
from rl_reason.rollout import engine, partial, sampling
from rl_reason.rollout.sampling import SamplingConfig

MESHES = {"1x1x1": (1, 1, 1), "2x2x2": (2, 2, 2)}
STOP = 2
# Near-geometric lengths, mean ~ 40 in a budget of 250, on the tiny random model: long tails.
LONG_TAIL = SamplingConfig(stop_token_ids=(STOP,), logit_bias=((STOP, 2.0),))
STEPS, AHEAD, SLOTS, PROMPTS, GROUP = 5, 2, 8, 4, 4
SHAPE = dict(group_size=GROUP, max_new_tokens=250, buffer_len=256, prompt_width=16)


def make_mesh(name: str):
    devices = jax.devices()[: int(np.prod(MESHES[name]))]
    return sharding.make_mesh(sharding.MeshConfig(*MESHES[name]), devices)


def run(mesh, cache: str = "keep", steps: int = STEPS) -> dict[str, np.ndarray]:
    """Per step s < `steps`: `tokens/s`, `lengths/s`, `versions/s` of the trained batch,
    `ref_tokens/s`, `ref_lengths/s`, `gap/s` (largest policy log-prob gap over completion
    tokens) of the one call, and `counts/s` = (slot steps, live slot steps, decode steps) of
    the step's call."""
    graphdef, params = sharding.create_model(get_config("tiny"), mesh, seed=0)
    policy = (graphdef, params)
    rng = np.random.default_rng(0)
    vocab = get_config("tiny").vocab_size
    m = partial.PartialRollouts(
        steps_ahead=AHEAD,
        config=LONG_TAIL,
        engine_config=engine.EngineConfig(slots=SLOTS),
        pad_id=0,
        mesh=mesh,
        look_steps=8,
        cache=cache,
        **SHAPE,
    )
    key, out = jax.random.key(3), {}
    for step in range(steps):
        while m.wanted:
            key, sub = jax.random.split(key)
            lengths = rng.integers(2, 12, size=PROMPTS)
            prompts = [list(rng.integers(3, vocab, size=int(k))) for k in lengths]
            m.add(prompts, sub, examples=(prompts, sub))
        got = m.step(policy, version=step)
        prompts, sub = got.batch.examples
        ref = sampling.sample(policy, prompts, sub, config=LONG_TAIL, mesh=mesh, **SHAPE)
        mask = np.asarray(ref.mask)
        gap = np.abs(np.asarray(ref.policy_logprobs) - got.batch.policy_logprobs) * mask
        out[f"tokens/{step}"] = np.asarray(got.sample.tokens)
        out[f"lengths/{step}"] = np.asarray(got.sample.lengths)
        out[f"versions/{step}"] = got.batch.versions
        out[f"ref_tokens/{step}"] = np.asarray(ref.tokens)
        out[f"ref_lengths/{step}"] = np.asarray(ref.lengths)
        out[f"gap/{step}"] = np.asarray(gap.max())
        out[f"counts/{step}"] = np.asarray([got.slot_steps, got.live_slot_steps, got.decode_steps])
    return out


def compute(name: str, out_dir: str) -> None:
    # The rebuilt caches' sharded part is their scatter into the slots: 3 steps show it.
    for cache, steps in (("keep", STEPS), ("rebuild", 3)):
        got = run(make_mesh(name), cache, steps)
        np.savez(os.path.join(out_dir, f"{name}_{cache}.npz"), **got)
