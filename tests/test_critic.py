"""PPO's critic: the value head's positions, the clipped value loss against numpy (values and
gradients), GAE with the KL folded in, the batch's whitened advantages and returns, and exact
gradient accumulation of the critic's update."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rl_reason import losses
from rl_reason.core import critic
from rl_reason.core import update as train_step
from rl_reason.core.config import CriticOptions, GRPOConfig, LossOptions
from rl_reason.core.record import RolloutArrays
from rl_reason.infra import sharding
from tests.test_algorithms import naive_gae
from tests.test_train_step import _rollout

G = 4


def _critic(graphdef, params, seed=0, opts=None, micro=1, optimizer=None):
    """Critic fns and params initialised from the policy, with a random (non-zero) head."""
    opts = CriticOptions() if opts is None else opts
    mesh = sharding.mesh_of(params)
    cgd, cparams = critic.init_params(graphdef, params, opts, mesh)
    rng = np.random.default_rng(seed)
    d = cparams["head"]["w"].shape[0]
    cparams["head"] = {
        "w": jnp.asarray(rng.normal(0, 0.1, d), jnp.float32),
        "b": jnp.asarray(0.1, jnp.float32),
    }
    fns = critic.CriticFns(
        cgd, cparams, opts, mesh, microbatches=micro, total_updates=10, optimizer=optimizer
    )
    return fns, fns.place(cparams)


def test_init_copies_the_policy_and_starts_at_zero():
    graphdef, params, out = _rollout(G)
    mesh = sharding.mesh_of(params)
    cgd, cparams = critic.init_params(graphdef, params, CriticOptions(), mesh)
    for a, b in zip(jax.tree.leaves(cparams["trunk"]), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a is not b  # a copy: the policy's update donates its own buffers
    fns = critic.CriticFns(cgd, cparams, CriticOptions(), mesh)
    v = fns.values(cparams, out.prompt_ids, out.prompt_mask, out.tokens, out.mask)
    assert v.shape == out.tokens.shape
    np.testing.assert_array_equal(np.asarray(v), 0)


def test_values_are_the_head_on_the_state_before_each_token():
    graphdef, params, out = _rollout(G)
    fns, cparams = _critic(graphdef, params)
    got = np.asarray(fns.values(cparams, out.prompt_ids, out.prompt_mask, out.tokens, out.mask))
    # By hand: the trunk's final hidden states of prompt + completion, right-padded (the
    # critic's rows are left-padded), read where the policy's logits of token t are (position
    # len(prompt) - 1 + t).
    model = nnx.merge(graphdef, params)
    w, b = np.asarray(cparams["head"]["w"], np.float64), float(cparams["head"]["b"])
    prompts = [[5, 6, 7], [8, 9]]
    rows, width = out.tokens.shape[0], 3 + out.tokens.shape[1]
    ids, mask = np.zeros((rows, width), np.int32), np.zeros((rows, width), bool)
    for i in range(rows):
        row = prompts[i // G] + list(np.asarray(out.tokens[i, : int(out.lengths[i])]))
        ids[i, : len(row)], mask[i, : len(row)] = row, True
    h = np.asarray(model(jnp.asarray(ids), mask_BT=jnp.asarray(mask), return_hidden=True))
    for i in range(rows):
        p, n = len(prompts[i // G]), int(out.lengths[i])
        want = np.float64(h[i, p - 1 : p - 1 + n]) @ w + b
        np.testing.assert_allclose(got[i, :n], want, rtol=1e-5, atol=1e-5)


def naive_value_loss(v, old, ret, mask, clip):
    total, count = 0.0, 0.0
    for i in range(v.shape[0]):
        for t in range(v.shape[1]):
            if mask[i, t]:
                a = (v[i, t] - ret[i, t]) ** 2
                if clip > 0:
                    c = old[i, t] + jnp.clip(v[i, t] - old[i, t], -clip, clip)
                    a = jnp.maximum(a, (c - ret[i, t]) ** 2)
                total = total + 0.5 * a
                count += 1
    return total / count


@pytest.mark.parametrize("clip", [0.0, 0.2])
def test_value_loss_matches_naive_loop_values_and_gradients(clip):
    rng = np.random.default_rng(3)
    v, old, ret = (rng.normal(0, 1, (3, 5)).astype(np.float32) for _ in range(3))
    old = v + rng.normal(0, 0.3, v.shape).astype(np.float32)  # some inside the band, some not
    mask = (rng.random((3, 5)) < 0.7).astype(np.float32)
    norm = float(mask.sum())
    f = lambda x: critic.value_loss(x, old, ret, mask, clip=clip, normalizer=norm)[0]
    g = lambda x: naive_value_loss(x, old, ret, mask, clip)
    np.testing.assert_allclose(f(jnp.asarray(v)), g(jnp.asarray(v)), rtol=1e-5)
    np.testing.assert_allclose(
        jax.grad(f)(jnp.asarray(v)), jax.grad(g)(jnp.asarray(v)), rtol=1e-5, atol=1e-7
    )
    _, sums = critic.value_loss(v, old, ret, mask, clip=clip, normalizer=norm)
    clipped = 0.0 < float(sums["value_clip_frac"]) < float(sums["tokens"])
    assert clipped == (clip > 0)


def test_value_loss_golden_by_hand():
    # V = 1.0, V_old = 0.5, R = 0: unclipped ½·1² = 0.5; the clipped value is 0.5 + 0.2 = 0.7,
    # ½·0.7² = 0.245, and the max keeps 0.5. V = 0.4, V_old = 1.0, R = 1.0: unclipped
    # ½·0.36 = 0.18; clipped 1.0 − 0.2 = 0.8, ½·0.04 = 0.02: 0.18. Mean: 0.34.
    v, old, ret = (jnp.asarray([[a, b]], jnp.float32) for a, b in ((1, 0.4), (0.5, 1), (0, 1)))
    loss, _ = critic.value_loss(v, old, ret, jnp.ones((1, 2)), clip=0.2, normalizer=2.0)
    np.testing.assert_allclose(float(loss), 0.34, rtol=1e-6)
    # R = 2: the clipped value 0.7 is further from R than V = 1 is, so the clip decides:
    # max(½·1, ½·1.69) = 0.845.
    loss, sums = critic.value_loss(
        v[:, :1], old[:, :1], jnp.full((1, 1), 2.0), jnp.ones((1, 1)), clip=0.2, normalizer=1.0
    )
    np.testing.assert_allclose(float(loss), 0.845, rtol=1e-6)
    assert float(sums["value_clip_frac"]) == 1.0


def test_gae_folds_the_kl_into_each_tokens_reward():
    rng = np.random.default_rng(4)
    values = rng.normal(0, 1, (2, 5)).astype(np.float32)
    mask = np.array([[1, 1, 0, 1, 1], [1, 1, 1, 0, 0]], np.float32)
    kl = rng.uniform(0, 1, (2, 5)).astype(np.float32)
    rewards = np.array([1.0, -0.5], np.float32)
    adv, ret = losses.gae(rewards, values, mask, 0.9, 0.8, kl, 0.1)
    # By hand with the naive loop: the KL at token t enters its δ_t as −β·KL_t, which is the
    # same as GAE of per-token rewards; the naive loop takes the outcome at the last token, so
    # the KL part is added through linearity: A = A(R) + A(−β·KL with no values).
    want = naive_gae(jnp.asarray(rewards), jnp.asarray(values), mask, 0.9, 0.8)
    for i in range(2):
        toks = [j for j in range(5) if mask[i, j]]
        for k, j in enumerate(toks):
            want = want.at[i, j].add(
                sum(-0.1 * kl[i, j2] * (0.9 * 0.8) ** l_ for l_, j2 in enumerate(toks[k:]))
            )
    np.testing.assert_allclose(np.asarray(adv), np.asarray(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ret), (np.asarray(want) + values) * mask, atol=1e-6)


def _gae_batch(graphdef, params, fns, cparams, opts, micro=1, kl=0.0):
    _, _, out = _rollout(G)
    ref = out.policy_logprobs - 0.3 * (jnp.arange(out.tokens.shape[1]) % 2)
    rec = RolloutArrays.from_sample(out, ref_logprobs=ref if kl else None)
    rewards = np.asarray([1, 0, 0, 1, 1, 1, 1, 1], np.float32)
    loss_cfg = LossOptions(advantage_estimator="gae", reward_kl_coef=kl)
    step = train_step.StepFns(
        graphdef,
        params,
        optax.sgd(0.1),
        loss_cfg,
        sharding.mesh_of(params),
        microbatches=micro,
        critic=opts,
    )
    values = fns.values(cparams, out.prompt_ids, out.prompt_mask, out.tokens, out.mask)
    returns = np.asarray(losses.compute_advantages(rewards, G, "gae"))
    np.testing.assert_array_equal(returns, rewards)  # no baseline: the critic is the baseline
    return step, step.make_batch([rec], None, returns, [values]), out, rec, rewards, values


@pytest.mark.parametrize("kl", [0.0, 0.05])
def test_the_batch_holds_whitened_gae_advantages_and_returns(kl):
    graphdef, params, _ = _rollout(G)
    opts = CriticOptions(gamma=0.95, lam=0.9)
    fns, cparams = _critic(graphdef, params, opts=opts)
    _, batch, out, rec, rewards, values = _gae_batch(graphdef, params, fns, cparams, opts, kl=kl)
    mask = np.asarray(out.mask, np.float32)
    kl_NT = None
    if kl:
        kl_NT = np.float64(rec.policy_logprobs) - np.float64(rec.ref_logprobs)  # k1, old to ref
    raw, ret = losses.gae(rewards, values, mask, 0.95, 0.9, kl_NT, kl)
    m = mask != 0
    x = np.asarray(raw, np.float64)[m]
    want = np.zeros(mask.shape)
    want[m] = (x - x.mean()) / (x.std() + 1e-6)
    np.testing.assert_allclose(np.asarray(batch.advantages), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(batch.returns), np.asarray(ret), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(batch.old_values), np.asarray(values))


def test_critic_update_accumulates_exactly_and_learns_the_returns():
    graphdef, params, _ = _rollout(G)
    opts = CriticOptions(value_clip=0.2)
    runs = []
    for micro in (1, 4):
        # SGD: AdamW's first steps are ~lr·sign(g), which turns rounding in a near-zero
        # gradient entry into a full step either way.
        fns, cparams = _critic(graphdef, params, opts=opts, micro=micro, optimizer=optax.sgd(1e-3))
        _, batch, *_ = _gae_batch(graphdef, params, fns, cparams, opts, micro=micro)
        p, s = cparams, fns.init_opt_state(cparams)
        history = []
        for _ in range(3):
            p, s, m = fns.update(p, s, batch)
            history.append(jax.device_get(m))
        runs.append((p, history, batch))
    (p1, h1, batch), (p4, h4, _) = runs
    for a, b in zip(h1, h4, strict=True):
        for k in ("value_loss", "value_grad_norm", "value_clip_frac", "value_mean"):
            np.testing.assert_allclose(float(a[k]), float(b[k]), rtol=2e-5, atol=1e-7)
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    assert h1[-1]["value_loss"] < h1[0]["value_loss"]
    assert h1[0]["value_finite"] == 1.0


def test_a_policy_update_that_waits_changes_nothing_but_reports():
    graphdef, params, _ = _rollout(G)
    opts = CriticOptions()
    fns, cparams = _critic(graphdef, params, opts=opts)
    step, batch, *_ = _gae_batch(graphdef, params, fns, cparams, opts)
    p = jax.tree.map(jnp.copy, params)
    s = step.init_opt_state(p)
    s_before = jax.tree.map(np.asarray, s)
    p2, s2, m = step.update(p, s, batch, apply=False)
    for x, y in zip(jax.tree.leaves(p2), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(s2), jax.tree.leaves(s_before), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)
    assert float(m["grad_norm"]) > 0 and float(m["finite"]) == 1.0


def test_explained_variance():
    ret = jnp.asarray([[1.0, 2.0, 3.0, 9.0]])
    mask = jnp.asarray([[1, 1, 1, 0]], jnp.float32)
    assert float(critic.explained_variance(ret, ret, mask)) == pytest.approx(1.0)
    assert float(critic.explained_variance(ret, jnp.full_like(ret, 5.0), mask)) == pytest.approx(0)
    assert float(critic.explained_variance(ret, ret + 1.0, mask)) == pytest.approx(1.0)


def test_config_rules_for_the_critic():
    gae = LossOptions(advantage_estimator="gae")
    GRPOConfig(group_size=1, prompts_per_step=8, loss=gae)  # one sample per prompt
    with pytest.raises(ValueError, match="group_size=1"):
        GRPOConfig(group_size=1, prompts_per_step=8)
    with pytest.raises(ValueError, match="critic.lam"):
        GRPOConfig(loss=gae, critic=CriticOptions(lam=1.5))
    with pytest.raises(ValueError, match="critic.policy_delay_steps"):
        GRPOConfig(steps=3, loss=gae, critic=CriticOptions(policy_delay_steps=3))
    GRPOConfig(loss=dataclasses.replace(gae, reward_kl_coef=0.01))  # KL in the reward
    assert GRPOConfig(loss=gae).uses_critic and not GRPOConfig().uses_critic
