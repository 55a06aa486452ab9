"""Tests for rl_reason.losses: golden numbers, a naive per-token reference, and path equivalences.

Golden values are written out by hand (the arithmetic is in the comments) or computed with numpy
in float64 next to the test. Gradients are compared with jax.grad of a per-token Python loop
that decides clipping from concrete numpy values, independent of the vectorised jnp.minimum/clip.

Speed: eager JAX compiles every op once per shape, so the policy-loss tests share a few batch
shapes ([2, 3] golden, [4, 5] and [8, 5] random); one-off computations are jitted whole.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_reason import losses as L

AGGS = L.AGGREGATIONS
LEVELS = L.RATIO_LEVELS
TOL = dict(rtol=2e-5, atol=2e-6)


def close(a, b, **kw):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), **(TOL | kw))


# ---------------------------------------------------------------------------------------------
# compute_advantages


def test_registries_list_names():
    assert set(L.ADVANTAGE_ESTIMATORS) == {
        "grpo",
        "dr_grpo",
        "rloo",
        "reinforce_pp",
        "reinforce_pp_baseline",
        "gae",
    }
    assert set(L.POLICY_OBJECTIVES) == {"ppo_clip", "dual_clip", "cispo"}
    assert set(L.CORRECTIONS) == {
        "none",
        "tis_token",
        "tis_sequence",
        "mask_token",
        "mask_sequence",
        "geo_mask",
    }
    assert set(L.KL_ESTIMATORS) == {"k1", "k2", "k3"}
    assert L.AGGREGATIONS == (
        "token-mean",
        "seq-mean-token-mean",
        "seq-mean-token-sum",
        "seq-mean-token-sum-norm",
    )
    assert L.RATIO_LEVELS == ("token", "sequence")


def test_advantages_golden_by_hand():
    # Group 1 = [1, 0, 0, 1]: mean 0.5, population std 0.5. Group 2 = [1, 1, 1, 1]: all equal.
    r = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    eps = 1e-6
    s = 0.5 / (0.5 + eps)
    close(L.compute_advantages(r, 4), [s, -s, -s, s, 0, 0, 0, 0])
    close(L.compute_advantages(r, 4, "dr_grpo"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    # rloo: r=1 -> 1 - (0+0+1)/3 = 2/3; r=0 -> 0 - (1+0+1)/3 = -2/3.
    close(L.compute_advantages(r, 4, "rloo"), [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])
    # eps is used as given: a bigger eps shrinks grpo advantages.
    close(L.compute_advantages(r, 4, eps=0.5)[:2], [0.5, -0.5])


def test_advantages_golden_with_invalid_rewards():
    # Valid rewards of the group are [1, 0, 0] (the 5.0 does not exist): mean 1/3,
    # std = sqrt(((2/3)^2 + 2(1/3)^2) / 3) = sqrt(2)/3, so grpo gives sqrt(2) and -1/sqrt(2).
    r = jnp.array([1.0, 0.0, 5.0, 0.0])
    valid = jnp.array([True, True, False, True])
    eps = 1e-6
    std = math.sqrt(2) / 3
    close(
        L.compute_advantages(r, 4, valid=valid),
        [(2 / 3) / (std + eps), (-1 / 3) / (std + eps), 0.0, (-1 / 3) / (std + eps)],
    )
    close(L.compute_advantages(r, 4, "dr_grpo", valid=valid), [2 / 3, -1 / 3, 0.0, -1 / 3])
    # rloo over the 3 valid ones: 1 - (0+0)/2 = 1; 0 - (1+0)/2 = -0.5.
    close(L.compute_advantages(r, 4, "rloo", valid=valid), [1.0, -0.5, 0.0, -0.5])


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_advantages_invalid_and_all_equal_groups_are_exactly_zero(estimator):
    # Groups of 3: all 0.1 (whose float32 mean is not exactly 0.1), a single valid reward,
    # no valid reward (with NaN where the reward is missing), all-equal valid rewards around an
    # invalid one, and one ordinary group.
    r = jnp.array([0.1, 0.1, 0.1, 1.0, 0.0, 0.0, jnp.nan, 7.0, 3.0, 0.7, -9.0, 0.7, 1.0, 0.0, 0.25])
    valid = jnp.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 1, 1, 1, 1], bool)
    adv = np.asarray(L.compute_advantages(r, 3, estimator, valid=valid))
    assert np.all(np.isfinite(adv))
    assert np.all(adv[:12] == 0.0)
    assert np.all(adv[12:] != 0.0)
    # Gradients w.r.t. rewards stay finite too (std = 0 in the all-equal groups).
    g = jax.grad(lambda x: jnp.sum(L.compute_advantages(x, 3, estimator, valid=valid) ** 2))(r)
    assert np.all(np.isfinite(np.asarray(g)))


def numpy_advantages(r, g, estimator, eps=1e-6):
    out = np.zeros_like(r)
    for s in range(0, len(r), g):
        grp = r[s : s + g]
        if np.all(grp == grp[0]):
            continue
        if estimator == "grpo":
            out[s : s + g] = (grp - grp.mean()) / (grp.std(ddof=0) + eps)
        elif estimator == "dr_grpo":
            out[s : s + g] = grp - grp.mean()
        else:
            out[s : s + g] = [grp[i] - np.delete(grp, i).mean() for i in range(g)]
    return out


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_advantages_match_numpy(estimator):
    rng = np.random.default_rng(0)
    r = rng.normal(size=24)
    r[6:12] = 1.0  # one all-equal group
    adv_fn = jax.jit(L.compute_advantages, static_argnums=(1, 2))
    for g in (2, 3, 6):
        got = adv_fn(jnp.asarray(r, jnp.float32), g, estimator)
        close(got, numpy_advantages(r, g, estimator), rtol=1e-5, atol=1e-5)


def test_advantages_validation():
    with pytest.raises(ValueError, match="divisible by group_size"):
        L.compute_advantages(jnp.zeros(7), 4)
    with pytest.raises(ValueError, match="'grpo', 'dr_grpo', 'rloo'"):
        L.compute_advantages(jnp.zeros(8), 4, "ppo")
    with pytest.raises(ValueError, match="1-D"):
        L.compute_advantages(jnp.zeros((2, 4)), 4)
    with pytest.raises(ValueError, match="positive int"):
        L.compute_advantages(jnp.zeros(8), 0)
    with pytest.raises(ValueError, match="valid must have the shape"):
        L.compute_advantages(jnp.zeros(8), 4, valid=jnp.ones(4, bool))


# ---------------------------------------------------------------------------------------------
# kl_penalty


def test_kl_penalty_golden():
    logp = jnp.array([0.0, 1.0, -1.0, 0.5]) - 2.0
    ref = jnp.full(4, -2.0)  # x = [0, 1, -1, 0.5]
    close(L.kl_penalty(logp, ref, "k1"), [0.0, 1.0, -1.0, 0.5])
    close(L.kl_penalty(logp, ref, "k2"), [0.0, 0.5, 0.5, 0.125])
    e = math.e
    close(L.kl_penalty(logp, ref, "k3"), [0.0, 1 / e, e - 2, math.exp(-0.5) - 0.5])
    # k3 is non-negative and second order near 0: exp(-x) + x - 1 = x^2/2 - x^3/6 + ...
    x = 1e-3
    close(L.kl_penalty(jnp.array([x]), jnp.array([0.0]), "k3"), [x**2 / 2 - x**3 / 6], rtol=1e-3)
    with pytest.raises(ValueError, match="'k1', 'k2', 'k3'"):
        L.kl_penalty(logp, ref, "k4")
    with pytest.raises(ValueError, match="shape"):
        L.kl_penalty(logp, ref[:3], "k1")


# ---------------------------------------------------------------------------------------------
# policy_loss: golden numbers
#
# Two sequences, A = [+1, -1], token ratios [[1.5, 0.5, 1.0], [1.5, 0.5, (masked)]], ε = 0.2.
#   seq 0 (A=+1): -min(1.5, 1.2) = -1.2;  -min(0.5, 0.8) = -0.5;  -min(1, 1) = -1.0  -> sum -2.7
#   seq 1 (A=-1): -min(-1.5, -1.2) = 1.5; -min(-0.5, -0.8) = 0.8                     -> sum  2.3

GOLD_LOGP = np.log(np.array([[1.5, 0.5, 1.0], [1.5, 0.5, 9.0]], np.float32)) - 1.0
GOLD_OLD = np.full((2, 3), -1.0, np.float32)
GOLD_ADV = np.array([1.0, -1.0], np.float32)
GOLD_MASK = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
GOLD_LOSS = {
    "token-mean": (-2.7 + 2.3) / 5,
    "seq-mean-token-mean": (-2.7 / 3 + 2.3 / 2) / 2,
    "seq-mean-token-sum": (-2.7 + 2.3) / 2,
    "seq-mean-token-sum-norm": (-2.7 + 2.3) / (2 * 4),  # max_len = 4
}


@pytest.mark.parametrize("aggregation", AGGS)
def test_policy_loss_golden_token_level(aggregation):
    loss, metrics = L.policy_loss(
        GOLD_LOGP, GOLD_OLD, GOLD_ADV, GOLD_MASK, aggregation=aggregation, max_len=4
    )
    close(loss, GOLD_LOSS[aggregation])
    # One of 5 tokens clipped below (A<0, ρ=0.5<0.8), one above (A>0, ρ=1.5>1.2).
    close(metrics["clip_frac_low"], 1 / 5)
    close(metrics["clip_frac_high"], 1 / 5)
    close(metrics["ratio_mean"], (1.5 + 0.5 + 1.0 + 1.5 + 0.5) / 5)
    close(metrics["kl_ref"], 0.0)
    # k3 of KL(old ‖ new): ρ - 1 - log ρ.
    k = [r - 1 - math.log(r) for r in (1.5, 0.5, 1.0, 1.5, 0.5)]
    close(metrics["approx_kl_old"], sum(k) / 5)
    close(metrics["tokens"], 5)


def test_policy_loss_golden_clip_higher():
    # DAPO clip-higher ε_high = 0.6: the ρ=1.5 token of seq 0 is no longer clipped (-1.5 not -1.2).
    loss, metrics = L.policy_loss(GOLD_LOGP, GOLD_OLD, GOLD_ADV, GOLD_MASK, clip_eps_high=0.6)
    close(loss, (-1.5 - 0.5 - 1.0 + 1.5 + 0.8) / 5)
    close(metrics["clip_frac_high"], 0.0)
    close(metrics["clip_frac_low"], 1 / 5)
    # A wider lower range: 0.5 is inside [0.4, 1.2], so seq 1's second token gives 0.5, not 0.8.
    loss, metrics = L.policy_loss(GOLD_LOGP, GOLD_OLD, GOLD_ADV, GOLD_MASK, clip_eps_low=0.6)
    close(loss, (-1.2 - 0.5 - 1.0 + 1.5 + 0.5) / 5)
    close(metrics["clip_frac_low"], 0.0)


def test_policy_loss_golden_sequence_level():
    # s_0 = exp(mean(log 1.5, log 0.5, log 1)) = 0.75^(1/3) = 0.9086 inside [0.8, 1.2], A=+1:
    #   each token -0.9086. s_1 = 0.75^(1/2) = 0.8660, A=-1: -min(-0.866, -0.866) = +0.8660.
    s0, s1 = 0.75 ** (1 / 3), 0.75**0.5
    loss, metrics = L.policy_loss(GOLD_LOGP, GOLD_OLD, GOLD_ADV, GOLD_MASK, ratio_level="sequence")
    close(loss, (-3 * s0 + 2 * s1) / 5)
    close(metrics["ratio_mean"], (3 * s0 + 2 * s1) / 5)
    close(metrics["clip_frac_low"] + metrics["clip_frac_high"], 0.0)
    loss, _ = L.policy_loss(
        GOLD_LOGP,
        GOLD_OLD,
        GOLD_ADV,
        GOLD_MASK,
        ratio_level="sequence",
        aggregation="seq-mean-token-mean",
    )
    close(loss, (-s0 + s1) / 2)
    # With ε_low = 0.1, s_1 = 0.866 < 0.9 is clipped for A<0: the term is +0.9 on both tokens.
    loss, metrics = L.policy_loss(
        GOLD_LOGP, GOLD_OLD, GOLD_ADV, GOLD_MASK, ratio_level="sequence", clip_eps_low=0.1
    )
    close(loss, (-3 * s0 + 2 * 0.9) / 5)
    close(metrics["clip_frac_low"], 2 / 5)


def test_policy_loss_golden_with_kl():
    # Reference such that x = logp - ref = [[0, 1, -1], [0.5, 0, ·]].
    x = np.array([[0.0, 1.0, -1.0], [0.5, 0.0, 0.0]], np.float32)
    ref = GOLD_LOGP - x
    e = math.e
    k3 = [0.0, 1 / e, e - 2, math.exp(-0.5) - 0.5, 0.0]
    beta = 0.1
    for est, kl in {"k1": [0, 1, -1, 0.5, 0], "k2": [0, 0.5, 0.5, 0.125, 0], "k3": k3}.items():
        loss, metrics = L.policy_loss(
            GOLD_LOGP, GOLD_OLD, GOLD_ADV, GOLD_MASK, ref_logp=ref, kl_coef=beta, kl_estimator=est
        )
        close(loss, (-2.7 + 2.3 + beta * sum(kl)) / 5)
        close(metrics["kl_ref"], sum(kl) / 5)


# ---------------------------------------------------------------------------------------------
# policy_loss: gradients against a naive per-token loop


def naive_loss(
    logp,
    old,
    adv,
    mask,
    *,
    eps_low=0.2,
    eps_high=0.2,
    ratio_level="token",
    aggregation="token-mean",
    max_len=None,
    ref=None,
    kl_coef=0.0,
    kl_estimator="k3",
):
    """The loss written token by token. logp is differentiated; the rest are numpy arrays.

    Clipping is decided from concrete float64 values: a clipped token contributes a constant.
    """
    n, t_len = old.shape
    lp_val = np.asarray(jax.lax.stop_gradient(logp), np.float64)
    seq_terms = []
    for i in range(n):
        toks = [t for t in range(t_len) if mask[i, t]]
        if ratio_level == "sequence" and toks:
            s_val = math.exp(sum(lp_val[i, t] - old[i, t] for t in toks) / len(toks))
        terms = []
        for t in toks:
            if ratio_level == "token":
                rho_val = math.exp(lp_val[i, t] - old[i, t])
                rho = jnp.exp(logp[i, t] - old[i, t])
            else:
                rho_val = s_val
                rho = s_val * jnp.exp(logp[i, t] - lp_val[i, t])
            a = float(adv[i])
            if a > 0 and rho_val > 1 + eps_high:
                term = -(1 + eps_high) * a
            elif a < 0 and rho_val < 1 - eps_low:
                term = -(1 - eps_low) * a
            else:
                term = -rho * a
            if kl_coef:
                x = logp[i, t] - ref[i, t]
                kl = {"k1": x, "k2": x * x / 2, "k3": jnp.exp(-x) + x - 1}[kl_estimator]
                term = term + kl_coef * kl
            terms.append(term)
        seq_terms.append(terms)
    total = sum(len(ts) for ts in seq_terms)
    if aggregation == "token-mean":
        return sum(sum(ts) for ts in seq_terms) / total
    if aggregation == "seq-mean-token-mean":
        return sum(sum(ts) / len(ts) for ts in seq_terms if ts) / n
    if aggregation == "seq-mean-token-sum":
        return sum(sum(ts) for ts in seq_terms if ts) / n
    return sum(sum(ts) for ts in seq_terms if ts) / (n * max_len)


def random_batch(seed, n=4, t=5, scale=0.4, zero_row=False):
    rng = np.random.default_rng(seed)
    old = rng.normal(-1.5, 0.5, (n, t)).astype(np.float32)
    logp = (old + rng.normal(0, scale, (n, t))).astype(np.float32)
    ref = (old + rng.normal(0, scale, (n, t))).astype(np.float32)
    adv = rng.normal(size=n).astype(np.float32)
    lengths = rng.integers(1, t + 1, n)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    if zero_row:
        mask[1] = 0
    return logp, old, adv, mask, ref


@pytest.mark.parametrize("ratio_level", LEVELS)
@pytest.mark.parametrize("aggregation", AGGS)
def test_gradient_matches_naive_loop(aggregation, ratio_level):
    logp, old, adv, mask, ref = random_batch(1, n=4, t=5, scale=0.3)
    # Push sequence 0 up and sequence 1 down so both clipping sides occur at either ratio level.
    adv[:2] = [1.0, -1.0]
    logp[0] += 0.3
    logp[1] -= 0.3
    kw = dict(aggregation=aggregation, max_len=7, kl_coef=0.05)
    eps_low, eps_high = (0.2, 0.28) if ratio_level == "token" else (0.05, 0.1)

    def ours(lp):
        return L.policy_loss(
            lp,
            old,
            adv,
            mask,
            ratio_level=ratio_level,
            ref_logp=ref,
            clip_eps_low=eps_low,
            clip_eps_high=eps_high,
            **kw,
        )

    def naive(lp):
        return naive_loss(
            lp,
            old,
            adv,
            mask,
            ratio_level=ratio_level,
            ref=ref,
            eps_low=eps_low,
            eps_high=eps_high,
            **kw,
        )

    (loss, metrics), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(logp))
    # The data must exercise clipping on both sides, or the comparison proves little.
    assert metrics["clip_frac_low"] > 0 and metrics["clip_frac_high"] > 0
    lp = jnp.asarray(logp)
    close(loss, naive(lp), rtol=1e-5, atol=1e-6)
    close(grad, jax.grad(naive)(lp), rtol=1e-5, atol=1e-6)


def test_gspo_token_gradient_equals_sequence_objective():
    # [GSPO]: with seq-mean-token-mean, the GSPO-token loss has the gradient of
    # mean_i −min(s_i A_i, clip(s_i) A_i), where s_i is differentiated as a whole.
    logp, old, adv, mask, _ = random_batch(2, n=8, t=5, scale=0.3)
    eps = 0.05

    def sequence_objective(lp):
        m = jnp.asarray(mask)
        s = jnp.exp(jnp.sum(m * (lp - old), -1) / jnp.sum(m, -1))
        return jnp.mean(-jnp.minimum(s * adv, jnp.clip(s, 1 - eps, 1 + eps) * adv))

    def ours(lp):
        return L.policy_loss(
            lp,
            old,
            adv,
            mask,
            ratio_level="sequence",
            aggregation="seq-mean-token-mean",
            clip_eps_low=eps,
            clip_eps_high=eps,
        )

    lp = jnp.asarray(logp)
    (loss, metrics), grad = jax.value_and_grad(ours, has_aux=True)(lp)
    assert metrics["clip_frac_low"] + metrics["clip_frac_high"] > 0
    close(loss, sequence_objective(lp))
    close(grad, jax.grad(sequence_objective)(lp))


# ---------------------------------------------------------------------------------------------
# policy_loss: microbatch accumulation, masking, equivalences


@jax.jit
def _linear_logp(w, hidden, tokens):
    # Module-level and jitted: one compile per batch shape for the whole file, not one per op.
    return L.token_logprobs(jnp.einsum("ntd,dv->ntv", hidden, w), tokens)


def tiny_policy(n, t, d=4, v=6, seed=0):
    """A linear 'model' so gradients are w.r.t. shared parameters, as in a trainer."""
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(n, t, d)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, v, (n, t)), jnp.int32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)

    def logp_fn(w, rows):
        return _linear_logp(w, hidden[rows], tokens[rows])

    return w, logp_fn


# objective, mismatch correction, per-token (REINFORCE++) advantages
VARIANTS = {
    "ppo_clip": ("ppo_clip", "none", False),
    "dual_clip+tis_sequence": ("dual_clip", "tis_sequence", False),
    "cispo+mask_token": ("cispo", "mask_token", False),
    "token_advantages+geo_mask": ("ppo_clip", "geo_mask", True),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ratio_level", LEVELS)
@pytest.mark.parametrize("aggregation", AGGS)
def test_microbatch_accumulation_equals_full_batch(aggregation, ratio_level, variant):
    objective, correction, per_token = VARIANTS[variant]
    n, t, max_len = 8, 5, 9
    w, logp_fn = tiny_policy(n, t)
    rng = np.random.default_rng(3)
    logp0 = np.asarray(logp_fn(w, slice(None)))
    old = logp0 + rng.normal(0, 0.3, (n, t)).astype(np.float32)
    ref = logp0 + rng.normal(0, 0.3, (n, t)).astype(np.float32)
    adv = np.asarray(L.compute_advantages(jnp.asarray(rng.normal(size=n), jnp.float32), 4))
    # Unequal lengths (19 tokens in the first microbatch, 6 in the second), one empty sequence.
    lengths = np.array([5, 5, 4, 5, 1, 0, 2, 3])
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    sampler = old + rng.normal(0, 0.3, (n, t)).astype(np.float32)
    if per_token:  # normalised over the whole batch first, as the trainer's batch is
        adv = np.asarray(L.token_advantages(adv, mask))
    kw = dict(
        aggregation=aggregation,
        ratio_level=ratio_level,
        max_len=max_len,
        kl_coef=0.1,
        clip_eps_high=0.28,
        objective=objective,
        correction=correction,
        correction_cap=1.1 if correction == "geo_mask" else 1.3,
    )

    def loss_fn(w, rows, normalizer=None):
        return L.policy_loss(
            logp_fn(w, rows),
            old[rows],
            adv[rows],
            mask[rows],
            ref_logp=ref[rows],
            normalizer=normalizer,
            sampler_logp=sampler[rows],
            **kw,
        )

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (full_loss, full_metrics), full_grad = grad_fn(w, slice(None))
    norm = L.loss_normalizer(mask, aggregation, max_len)
    parts = [grad_fn(w, slice(s, s + 4), norm) for s in (0, 4)]
    close(sum(p[0][0] for p in parts), full_loss, rtol=1e-5, atol=1e-6)
    close(sum(p[1] for p in parts), full_grad, rtol=1e-5, atol=1e-6)
    merged = L.merge_metrics([p[0][1] for p in parts])
    for k in L.METRIC_NAMES:
        close(merged[k], full_metrics[k], rtol=1e-5, atol=1e-6)
    assert abs(float(full_loss)) > 1e-3 and float(jnp.abs(full_grad).max()) > 1e-3

    if aggregation == "token-mean" and variant == "ppo_clip":
        # Averaging self-normalised microbatch losses is not the full loss when microbatches hold
        # different token counts: the reason for the normaliser (and a check the data bite).
        unweighted = np.mean([float(loss_fn(w, slice(s, s + 4))[0]) for s in (0, 4)])
        assert abs(unweighted - float(full_loss)) > 1e-4


@pytest.mark.parametrize("ratio_level", LEVELS)
@pytest.mark.parametrize("aggregation", AGGS)
def test_masked_positions_change_neither_loss_nor_gradient(aggregation, ratio_level):
    logp, old, adv, mask, ref = random_batch(4, zero_row=True)

    def run(lp, old, ref):
        def f(x):
            return L.policy_loss(
                x,
                old,
                adv,
                mask,
                aggregation=aggregation,
                ratio_level=ratio_level,
                max_len=8,
                ref_logp=ref,
                kl_coef=0.1,
            )

        return jax.value_and_grad(f, has_aux=True)(jnp.asarray(lp))

    (loss, metrics), grad = run(logp, old, ref)
    off = mask == 0
    junk = np.array([np.nan, np.inf, -np.inf, 1e30, -1e4, 50.0], np.float32)
    garbage = np.resize(junk, off.sum())
    lp2, old2, ref2 = logp.copy(), old.copy(), ref.copy()
    lp2[off], old2[off], ref2[off] = garbage, garbage[::-1], np.roll(garbage, 1)
    (loss2, metrics2), grad2 = run(lp2, old2, ref2)
    assert np.isfinite(float(loss))
    close(loss2, loss, rtol=0, atol=0)
    close(grad2, grad, rtol=0, atol=0)
    assert np.all(np.asarray(grad)[off] == 0)
    for k in L.METRIC_NAMES:
        close(metrics2[k], metrics[k], rtol=0, atol=0)


@pytest.mark.parametrize("ratio_level", LEVELS)
@pytest.mark.parametrize("aggregation", AGGS)
def test_empty_mask_gives_zero_not_nan(aggregation, ratio_level):
    logp, old, adv, mask, ref = random_batch(5)
    mask = np.zeros_like(mask)

    def f(lp):
        return L.policy_loss(
            lp,
            old,
            adv,
            mask,
            aggregation=aggregation,
            ratio_level=ratio_level,
            max_len=5,
            ref_logp=ref,
            kl_coef=0.1,
        )

    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
    assert float(loss) == 0.0
    assert np.all(np.asarray(grad) == 0)
    assert all(float(v) == 0.0 for v in metrics.values())


@pytest.mark.parametrize("aggregation", AGGS)
@pytest.mark.parametrize("rho", [1.0, 1.1, 1.5])
def test_sequence_ratio_equals_token_ratio_when_token_ratios_are_equal(aggregation, rho):
    # All token ratios equal ρ ⇒ s_i = ρ: same loss, gradient (unclipped: ρ·A·∇logp both ways;
    # clipped at 1.5: zero for A>0 both ways) and metrics. ρ = 1 is the on-policy case.
    logp, _, adv, mask, ref = random_batch(6)
    old = logp - np.float32(math.log(rho))

    def f(level):
        g = jax.value_and_grad(
            lambda lp: L.policy_loss(
                lp,
                old,
                adv,
                mask,
                ratio_level=level,
                aggregation=aggregation,
                max_len=6,
                ref_logp=ref,
                kl_coef=0.02,
            ),
            has_aux=True,
        )
        return g(jnp.asarray(logp))

    (lt, mt), gt = f("token")
    (ls, ms), gs = f("sequence")
    close(ls, lt, rtol=1e-5, atol=1e-6)
    close(gs, gt, rtol=1e-5, atol=1e-6)
    for k in L.METRIC_NAMES:
        close(ms[k], mt[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ratio_level", LEVELS)
@pytest.mark.parametrize("aggregation", AGGS)
def test_on_policy_gradient_is_reinforce(aggregation, ratio_level):
    n, t, max_len = 8, 5, 10
    w, logp_fn = tiny_policy(n, t, seed=7)
    rng = np.random.default_rng(7)
    adv = L.compute_advantages(jnp.asarray(rng.integers(0, 2, n), jnp.float32), 4)
    mask = (np.arange(t)[None] < rng.integers(1, t + 1, n)[:, None]).astype(np.float32)
    old = jax.lax.stop_gradient(logp_fn(w, slice(None)))
    norm = L.loss_normalizer(mask, aggregation, max_len)
    kw = dict(aggregation=aggregation, ratio_level=ratio_level, max_len=max_len)

    def grpo(w):
        return L.policy_loss(logp_fn(w, slice(None)), old, adv, mask, **kw)[0]

    def reinforce(w):
        # −Σ_i A_i Σ_t c_it logp_it / normaliser, with c = m / Σ_t m for seq-mean-token-mean.
        c = mask / mask.sum(-1, keepdims=True) if aggregation == "seq-mean-token-mean" else mask
        return -jnp.sum(adv[:, None] * c * logp_fn(w, slice(None))) / norm

    loss, grad = jax.value_and_grad(grpo)(w)
    close(grad, jax.grad(reinforce)(w), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(grad).max()) > 1e-2
    # The value is −Σ m A / normaliser, not the REINFORCE surrogate's value.
    c = mask / mask.sum(-1, keepdims=True) if aggregation == "seq-mean-token-mean" else mask
    close(loss, -np.sum(np.asarray(adv)[:, None] * c) / float(norm), atol=1e-6)
    if aggregation == "seq-mean-token-mean":
        # Group-centred advantages sum to 0: the loss reads 0 while the gradient is not 0.
        close(loss, 0.0, atol=1e-6)
    # Directly in logp: ∂loss/∂logp_it = −A_i c_it / normaliser.
    g_logp = jax.grad(lambda lp: L.policy_loss(lp, old, adv, mask, **kw)[0])(old)
    close(g_logp, -np.asarray(adv)[:, None] * c / float(norm), rtol=1e-5, atol=1e-7)


def test_loss_normalizer_values():
    mask = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], np.float32)
    assert float(L.loss_normalizer(mask, "token-mean")) == 3
    assert float(L.loss_normalizer(mask, "seq-mean-token-mean")) == 3
    assert float(L.loss_normalizer(mask, "seq-mean-token-sum")) == 3
    assert float(L.loss_normalizer(mask, "seq-mean-token-sum-norm", max_len=5)) == 15
    with pytest.raises(ValueError, match="needs max_len"):
        L.loss_normalizer(mask, "seq-mean-token-sum-norm")


def test_policy_loss_under_jit_with_traced_normalizer_and_coefs():
    logp, old, adv, mask, ref = random_batch(8)

    @functools.partial(jax.jit, static_argnames=("aggregation",))
    def f(lp, norm, beta, eps_high, aggregation):
        return L.policy_loss(
            lp,
            old,
            adv,
            mask,
            aggregation=aggregation,
            ref_logp=ref,
            kl_coef=beta,
            clip_eps_high=eps_high,
            normalizer=norm,
        )

    for agg in ("token-mean", "seq-mean-token-mean"):
        norm = L.loss_normalizer(mask, agg)
        got, _ = f(logp, norm, 0.1, 0.28, agg)
        want, _ = L.policy_loss(
            logp, old, adv, mask, aggregation=agg, ref_logp=ref, kl_coef=0.1, clip_eps_high=0.28
        )
        close(got, want)


def test_accepts_bool_mask_and_numpy_ints():
    logp, old, adv, mask, _ = random_batch(9)
    kw = dict(aggregation="seq-mean-token-sum-norm")
    want, _ = L.policy_loss(logp, old, adv, mask, max_len=6, **kw)
    got, _ = L.policy_loss(logp, old, adv, mask.astype(bool), max_len=np.int64(6), **kw)
    close(got, want, rtol=0, atol=0)
    close(L.compute_advantages(adv, np.int64(2)), L.compute_advantages(adv, 2), rtol=0, atol=0)


def test_policy_loss_validation():
    logp, old, adv, mask, ref = random_batch(9)
    with pytest.raises(ValueError, match="'token-mean', 'seq-mean-token-mean'"):
        L.policy_loss(logp, old, adv, mask, aggregation="sum")
    with pytest.raises(ValueError, match="'token', 'sequence'"):
        L.policy_loss(logp, old, adv, mask, ratio_level="group")
    with pytest.raises(ValueError, match="KL estimator"):
        L.policy_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=0.1, kl_estimator="k5")
    with pytest.raises(ValueError, match="needs max_len"):
        L.policy_loss(logp, old, adv, mask, aggregation="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        L.policy_loss(logp, old, adv, mask, aggregation="seq-mean-token-sum-norm", max_len=0)
    with pytest.raises(ValueError, match="old_logp shape"):
        L.policy_loss(logp, old[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="mask shape"):
        L.policy_loss(logp, old, adv, mask[:-1])
    with pytest.raises(ValueError, match="advantages must be"):
        L.policy_loss(logp, old, adv[:, None], mask)  # [N, 1]: neither [N] nor [N, T]
    with pytest.raises(ValueError, match="ref_logp shape"):
        L.policy_loss(logp, old, adv, mask, ref_logp=ref[:, :2], kl_coef=0.1)
    with pytest.raises(ValueError, match="ref_logp is None"):
        L.policy_loss(logp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="clip_eps_low"):
        L.policy_loss(logp, old, adv, mask, clip_eps_low=1.0)
    with pytest.raises(ValueError, match="2-D"):
        L.policy_loss(logp[0], old[0], adv, mask[0])
    with pytest.raises(ValueError, match="normalizer must be a scalar"):
        L.policy_loss(logp, old, adv, mask, normalizer=jnp.ones(2))
    # With a normaliser, seq-mean-token-sum-norm needs no max_len.
    L.policy_loss(logp, old, adv, mask, aggregation="seq-mean-token-sum-norm", normalizer=20.0)


# ---------------------------------------------------------------------------------------------
# token_logprobs, entropy, and the hidden-state path


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def logits_batch(n=2, t=7, v=11, seed=0):
    rng = np.random.default_rng(seed)
    logits = (3 * rng.normal(size=(n, t, v))).astype(np.float32)
    tokens = rng.integers(0, v, (n, t)).astype(np.int32)
    return logits, tokens


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7, 100])
def test_token_logprobs_and_entropy_match_numpy(chunk_size):
    logits, tokens = logits_batch()

    @jax.jit
    def both(z, tok):
        return [
            (
                L.token_logprobs(z, tok, chunk_size, temperature=temp),
                L.entropy(z, chunk_size, temperature=temp),
            )
            for temp in (1.0, 0.7)
        ]

    for temp, (got_lp, got_h) in zip((1.0, 0.7), both(logits, tokens), strict=True):
        ls = np_log_softmax(logits / temp)
        want_lp = np.take_along_axis(ls, tokens[..., None], -1)[..., 0]
        want_h = -(np.exp(ls) * ls).sum(-1)
        assert got_lp.dtype == jnp.float32 and got_lp.shape == tokens.shape
        close(got_lp, want_lp, rtol=1e-5, atol=1e-5)
        close(got_h, want_h, rtol=1e-5, atol=1e-5)


def test_entropy_golden_and_masked_vocab():
    v = 8
    uniform = jnp.zeros((1, 2, v))
    close(L.entropy(uniform), np.full((1, 2), math.log(v)))
    # A vocabulary masked with -inf leaves the uniform entropy over the rest, without NaN.
    masked = uniform.at[..., 4:].set(-jnp.inf)
    close(jax.jit(L.entropy, static_argnums=1)(masked, 1), np.full((1, 2), math.log(4)))
    g = jax.jit(jax.grad(lambda z: L.entropy(z).sum()))(masked.at[..., 0].set(1.0))
    assert np.all(np.isfinite(np.asarray(g)))


def test_chunked_gradients_equal_unchunked():
    logits, tokens = logits_batch(t=9)
    z = jnp.asarray(logits)
    coef = jnp.asarray(np.random.default_rng(1).normal(size=tokens.shape), jnp.float32)

    def f(z, c):
        return jnp.sum(coef * L.token_logprobs(z, tokens, c)) + jnp.sum(coef * L.entropy(z, c))

    chunked, whole = jax.jit(lambda z: (jax.grad(f)(z, 4), jax.grad(f)(z, None)))(z)
    close(chunked, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tied, softcap", [(False, None), (True, 2.0)])
def test_from_hidden_equals_logits_path(tied, softcap):
    rng = np.random.default_rng(2)
    n, t, d, v = 2, 7, 5, 13
    hidden = jnp.asarray(rng.normal(size=(n, t, d)), jnp.float32)
    w_dv = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, v, (n, t)), jnp.int32)
    coef = jnp.asarray(rng.normal(size=(n, t)), jnp.float32)

    def plain(h, w):
        z = jnp.einsum("ntd,dv->ntv", h, w)
        if softcap is not None:
            z = softcap * jnp.tanh(z / softcap)
        return L.token_logprobs(z, tokens, temperature=0.8), L.entropy(z, temperature=0.8)

    def from_hidden(h, w, chunk):
        kw = dict(embed_VD=w.T) if tied else dict(unembed_DV=w)
        return L.token_logprobs_from_hidden(
            h,
            tokens,
            chunk_size=chunk,
            final_logit_softcap=softcap,
            temperature=0.8,
            return_entropy=True,
            **kw,
        )

    def scalar(fn):
        return lambda h, w: jnp.sum(coef * fn(h, w)[0]) + jnp.sum(coef * fn(h, w)[1])

    @jax.jit
    def everything(h, w):
        return dict(
            plain=plain(h, w),
            whole=from_hidden(h, w, None),
            chunked=from_hidden(h, w, 3),
            plain_grad=jax.grad(scalar(plain), argnums=(0, 1))(h, w),
            chunked_grad=jax.grad(scalar(lambda h, w: from_hidden(h, w, 3)), argnums=(0, 1))(h, w),
        )

    out = everything(hidden, w_dv)
    want_lp, want_h = out["plain"]
    # Independent check of the cap itself, in numpy.
    z = np.einsum("ntd,dv->ntv", np.asarray(hidden, np.float64), np.asarray(w_dv, np.float64))
    if softcap is not None:
        z = softcap * np.tanh(z / softcap)
    ls = np_log_softmax(z / 0.8)
    close(want_lp, np.take_along_axis(ls, np.asarray(tokens)[..., None], -1)[..., 0], atol=1e-5)
    for key in ("whole", "chunked"):
        lp, h = out[key]
        close(lp, want_lp, rtol=1e-5, atol=1e-5)
        close(h, want_h, rtol=1e-5, atol=1e-5)
    for a, b in zip(out["chunked_grad"], out["plain_grad"], strict=True):
        close(a, b, rtol=1e-4, atol=1e-5)


def _all_avals(jaxpr):
    """Every intermediate abstract value in a jaxpr, including nested ones (scan, remat...)."""
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        for p in eqn.params.values():
            for sub in p if isinstance(p, tuple | list) else (p,):
                if hasattr(sub, "eqns"):  # a Jaxpr
                    yield from _all_avals(sub)
                elif hasattr(getattr(sub, "jaxpr", None), "eqns"):  # a ClosedJaxpr
                    yield from _all_avals(sub.jaxpr)


def _largest_f32(fn, *args):
    avals = _all_avals(jax.make_jaxpr(fn)(*args).jaxpr)
    return max(math.prod(a.shape) for a in avals if getattr(a, "dtype", None) == jnp.float32)


def test_chunked_paths_never_form_full_float32_vocab_arrays():
    n, t, d, v, chunk = 2, 16, 8, 64, 4
    full = n * t * v
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(n, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, v, (n, t)), jnp.int32)

    def train_step(h, w, chunk):
        def f(h, w):
            lp, ent = L.token_logprobs_from_hidden(
                h, tokens, unembed_DV=w, chunk_size=chunk, return_entropy=True
            )
            return jnp.sum(lp) + jnp.sum(ent)

        return jax.grad(f, argnums=(0, 1))(h, w)

    # Forward and backward: nothing larger than one chunk of logits (or the D×V weight).
    assert _largest_f32(functools.partial(train_step, chunk=chunk), hidden, w) <= n * chunk * v
    assert _largest_f32(functools.partial(train_step, chunk=None), hidden, w) >= full

    # From bf16 logits: the float32 log-softmax exists one chunk at a time.
    logits = jnp.zeros((n, t, v), jnp.bfloat16)
    chunked = _largest_f32(
        lambda z: L.token_logprobs(z, tokens, chunk) + L.entropy(z, chunk), logits
    )
    assert chunked <= n * chunk * v
    assert _largest_f32(lambda z: L.token_logprobs(z, tokens), logits) >= full


def test_logprob_helpers_validation():
    logits, tokens = logits_batch()
    with pytest.raises(ValueError, match="chunk_size"):
        L.token_logprobs(logits, tokens, 0)
    with pytest.raises(ValueError, match="tokens shape"):
        L.token_logprobs(logits, tokens[:, :3])
    with pytest.raises(ValueError, match="integer"):
        L.token_logprobs(logits, tokens.astype(np.float32))
    with pytest.raises(ValueError, match="3-D"):
        L.entropy(logits[0])
    with pytest.raises(ValueError, match="temperature"):
        L.entropy(logits, temperature=0.0)
    hidden = np.zeros((2, 7, 5), np.float32)
    with pytest.raises(ValueError, match="exactly one"):
        L.token_logprobs_from_hidden(hidden, tokens)
    with pytest.raises(ValueError, match="exactly one"):
        w = np.zeros((5, 11), np.float32)
        L.token_logprobs_from_hidden(hidden, tokens, unembed_DV=w, embed_VD=w.T)
    with pytest.raises(ValueError, match="does not match hidden width"):
        L.token_logprobs_from_hidden(hidden, tokens, unembed_DV=np.zeros((11, 5), np.float32))
    with pytest.raises(ValueError, match="softcap"):
        L.token_logprobs_from_hidden(
            hidden, tokens, unembed_DV=np.zeros((5, 11), np.float32), final_logit_softcap=0.0
        )
