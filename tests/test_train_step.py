"""The jitted GRPO update: accumulation exactness, log-prob paths, non-finite handling."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from models import Transformer, get_config
from rl_reason import losses
from rl_reason.core import update as train_step
from rl_reason.core.config import LossOptions, OptimOptions
from rl_reason.infra import sharding
from rl_reason.rollout import sampling
from rl_reason.trainer import GRPOConfig, overlong_penalty

CFG = get_config("tiny").replace(vocab_size=64, num_layers=1)


def _rollout(g=4):
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    out = sampling.sample(
        (graphdef, params),
        [[5, 6, 7], [8, 9]],
        jax.random.key(0),
        group_size=g,
        max_new_tokens=12,
        config=sampling.SamplingConfig(stop_token_ids=(3,)),
    )
    return graphdef, params, out


def _batch(out, g=4, rewards=None):
    b = out.tokens.shape[0]
    rewards = jnp.arange(b, dtype=jnp.float32) % 3 if rewards is None else rewards
    return train_step.Batch(
        prompt_ids=jnp.repeat(out.prompt_ids, g, 0),
        prompt_mask=jnp.repeat(out.prompt_mask, g, 0),
        tokens=out.tokens,
        mask=out.mask.astype(jnp.float32),
        old_logp=out.policy_logprobs,
        ref_logp=jnp.zeros(out.tokens.shape),
        advantages=losses.compute_advantages(rewards, g),
    )


def _fns(graphdef, params, opt, loss_cfg=None, micro=1, max_len=None):
    loss_cfg = LossOptions() if loss_cfg is None else loss_cfg
    return train_step.StepFns(
        graphdef,
        params,
        opt,
        loss_cfg,
        sharding.mesh_of(params),
        max_len=max_len,
        microbatches=micro,
    )


def test_trainer_logprobs_equal_sampler_policy_logprobs():
    graphdef, params, out = _rollout()
    b = _batch(out)
    fns = _fns(graphdef, params, optax.sgd(1.0), LossOptions(logprob_chunk_size=5))
    logp = fns.logprobs(params, b.prompt_ids, b.prompt_mask, b.tokens, b.mask)
    np.testing.assert_allclose(
        np.asarray(logp * b.mask), np.asarray(out.policy_logprobs * b.mask), atol=1e-5
    )


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_microbatched_update_equals_whole_batch(aggregation):
    graphdef, params, out = _rollout()
    batch = _batch(out)
    # Plain SGD with lr 1: the update is minus the accumulated gradient itself (Adam's first
    # step would reduce it to signs and hide accumulation errors).
    opt = optax.sgd(1.0)
    loss_cfg = LossOptions(aggregation=aggregation)
    results = []
    for micro in (1, 4):
        fns = _fns(graphdef, params, opt, loss_cfg, micro, max_len=16)
        p = jax.tree.map(jnp.copy, params)
        p, _, metrics = fns.update(p, fns.init_opt_state(p), batch)
        results.append((p, metrics))
    (p1, m1), (p4, m4) = results
    assert float(m1["grad_norm"]) > 0  # a real update happened
    np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m4["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7, rtol=1e-5)
    changed = [
        not np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params), strict=True)
    ]
    assert any(changed)


def test_nonfinite_update_is_skipped():
    graphdef, params, out = _rollout()
    batch = _batch(out).replace(advantages=jnp.full((8,), jnp.nan))
    opt = train_step.make_optimizer(OptimOptions(learning_rate=1e-2))
    before = jax.tree.map(np.asarray, params)
    p = jax.tree.map(jnp.copy, params)
    fns = _fns(graphdef, params, opt)
    p, _, metrics = fns.update(p, fns.init_opt_state(p), batch)
    assert float(metrics["finite"]) == 0.0
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_overlong_penalty_by_hand():
    lengths = np.array([10, 12, 14, 16, 20])
    got = overlong_penalty(lengths, max_new_tokens=20, buffer=8, penalty=1.0)
    # Free up to 20 - 8 = 12 tokens, then linear to -1 at 20.
    np.testing.assert_allclose(got, [0, 0, -0.25, -0.5, -1.0])
    assert not overlong_penalty(lengths, 20, 0, 1.0).any()


def test_grpo_config_rejects_bad_values():
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="aggregation"):
        GRPOConfig(
            loss=dict(aggregation="mean"),
        )
    with pytest.raises(ValueError, match="split evenly"):
        GRPOConfig(
            prompts_per_step=3,
            group_size=3,
            optim=dict(microbatches=2),
        )
