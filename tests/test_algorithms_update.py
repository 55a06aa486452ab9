"""REINFORCE++ and the mismatch corrections in the jitted update: the batch's per-token
advantages are the naive loop's over the whole batch, and microbatching changes nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rl_reason import losses
from rl_reason.core.config import LossOptions
from rl_reason.core.record import RolloutArrays
from tests.test_algorithms import naive_token_advantages, naive_weights
from tests.test_train_step import _fns, _rollout

G = 4


def _record(out, seed=0, gap=0.0):
    """A round with reference log-probs below the policy's and, with gap > 0, a sampler whose
    log-probs differ from the trainer's rescoring (old_logprobs) by noise of that scale."""
    rng = np.random.default_rng(seed)
    shape = out.tokens.shape
    ref = out.policy_logprobs - jnp.asarray(rng.uniform(0, 0.5, shape), jnp.float32)
    noise = jnp.asarray(rng.normal(0, gap, shape), jnp.float32)
    rec = RolloutArrays.from_sample(out, ref_logprobs=ref, old_logprobs=out.policy_logprobs)
    return rec.replace(policy_logprobs=out.policy_logprobs + noise)


def _update(graphdef, params, loss_cfg, micro, rec, adv):
    fns = _fns(graphdef, params, optax.sgd(1.0), loss_cfg, micro)
    batch = fns.make_batch([rec], None, np.asarray(adv, np.float32))
    p = jax.tree.map(jnp.copy, params)
    p, _, metrics = fns.update(p, fns.init_opt_state(p), batch)
    return batch, p, jax.device_get(metrics)


def _assert_same_update(a, b):
    (_, p1, m1), (_, p4, m4) = a, b
    assert float(m1["grad_norm"]) > 0
    np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m4["grad_norm"]), rtol=1e-4)
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-7, rtol=1e-5)
    for k in ("mismatch_token_frac", "mismatch_seq_frac", "clip_frac_low", "ratio_mean"):
        np.testing.assert_allclose(float(m1[k]), float(m4[k]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("estimator", ["reinforce_pp", "reinforce_pp_baseline"])
def test_reinforce_pp_batch_is_normalised_over_the_whole_batch(estimator):
    graphdef, params, out = _rollout(G)
    rec = _record(out)
    rewards = np.array([1, 0, 0, 1, 1, 1, 1, 1], np.float32)  # an all-correct group
    returns = np.asarray(losses.compute_advantages(rewards, G, estimator))
    cfg = LossOptions(advantage_estimator=estimator, reward_kl_coef=0.05)
    runs = [_update(graphdef, params, cfg, micro, rec, returns) for micro in (1, 4)]
    batch = runs[0][0]
    mask = np.asarray(out.mask, np.float32)
    kl = np.float64(out.policy_logprobs) - np.float64(rec.ref_logprobs)  # k1 of old to ref
    want = naive_token_advantages(returns, mask, kl, 0.05, 1e-6)
    assert batch.advantages.shape == mask.shape
    np.testing.assert_allclose(np.asarray(batch.advantages), want, rtol=1e-5, atol=1e-5)
    _assert_same_update(*runs)
    # A minibatch keeps the whole batch's normalisation: its rows are not re-normalised.
    fns = _fns(graphdef, params, optax.sgd(1.0), cfg)
    half = fns.take_rows(batch, jnp.arange(4, dtype=jnp.int32))
    np.testing.assert_array_equal(np.asarray(half.advantages), np.asarray(batch.advantages)[:4])


@pytest.mark.parametrize("kind", ["tis_token", "mask_sequence"])
def test_a_correction_reaches_the_update_and_accumulates_exactly(kind):
    graphdef, params, out = _rollout(G)
    rec = _record(out, seed=1, gap=0.5)
    rewards = np.arange(8, dtype=np.float32) % 3
    adv = np.asarray(losses.compute_advantages(rewards, G))
    cfg = LossOptions(correction=kind, correction_cap=1.5, recompute_old_logprobs=True)
    runs = [_update(graphdef, params, cfg, micro, rec, adv) for micro in (1, 4)]
    _assert_same_update(*runs)
    batch, _, metrics = runs[0]
    mask = np.asarray(out.mask, np.float32)
    old, sampler = np.asarray(rec.old_logprobs), np.asarray(rec.policy_logprobs)
    np.testing.assert_array_equal(np.asarray(batch.sampler_logp), sampler)
    _, tok, seqs = naive_weights(old, sampler, mask, kind, 1.5)
    np.testing.assert_allclose(metrics["mismatch_token_frac"], (tok * mask).sum() / mask.sum())
    np.testing.assert_allclose(metrics["mismatch_seq_frac"], seqs.mean(), rtol=1e-6)
    assert 0 < seqs.mean() < 1
    # The update's loss is policy_loss with the correction, on the trainer's log-probs.
    fns = _fns(graphdef, params, optax.sgd(1.0), cfg)
    logp = fns.logprobs(params, out.prompt_ids, out.prompt_mask, out.tokens, batch.mask)
    want, _ = losses.policy_loss(
        logp, old, adv, mask, correction=kind, correction_cap=1.5, sampler_logp=sampler
    )
    np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-5, atol=1e-7)
    plain = _update(graphdef, params, LossOptions(), 1, rec, adv)[2]
    assert abs(float(plain["loss"]) - float(want)) > 1e-4  # the correction changed the loss
