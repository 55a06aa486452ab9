"""CISPO, dual-clip PPO, REINFORCE++ and the sampler–trainer mismatch corrections, against
numbers worked out by hand and against a naive per-token loop in float64 numpy whose
gradients are derived by hand (so neither the values nor jax.grad of the library are reused).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_reason import losses as L
from rl_reason.core.config import GRPOConfig

RTOL = dict(rtol=1e-5, atol=1e-6)
AGGS = ("token-mean", "seq-mean-token-mean")


def close(a, b, **kw):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), **(RTOL | kw))


def random_batch(seed, n=4, t=5, spread=0.6):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-1.5, 0.4, (n, t)).astype(np.float32)
    old = (logp + rng.normal(0, spread, (n, t))).astype(np.float32)
    adv = rng.normal(0, 1, n).astype(np.float32)
    mask = (rng.random((n, t)) < 0.75).astype(np.float32)
    mask[:, 0] = 1
    sampler = (old + rng.normal(0, 0.5, (n, t))).astype(np.float32)
    return logp, old, adv, mask, sampler


# ---------------------------------------------------------------------------------------------
# The naive reference: one token at a time, branches decided on concrete float64 numbers.


def naive_terms(
    logp, old, adv, mask, objective, level="token", eps=(0.2, 0.2), c=3.0, cispo=(1.0, 4.0)
):
    """Per-token loss ℓ and dℓ/dlogp of the objective (before any correction or aggregation)."""
    logp, old = np.float64(logp), np.float64(old)
    n, t = logp.shape
    ell, grad = np.zeros((n, t)), np.zeros((n, t))
    lo, hi = 1 - eps[0], 1 + eps[1]
    for i in range(n):
        toks = [j for j in range(t) if mask[i, j]]
        seq = math.exp(sum(logp[i, j] - old[i, j] for j in toks) / len(toks)) if toks else 0
        for j in toks:
            a = adv[i] if np.ndim(adv) == 1 else adv[i][j]
            r = math.exp(logp[i, j] - old[i, j]) if level == "token" else seq
            # d r / d logp_ij is r itself (token) or s_i (GSPO-token): r in both cases.
            if objective == "cispo":
                w = min(max(r, 1 - cispo[0]), 1 + cispo[1])
                ell[i, j], grad[i, j] = -w * a * logp[i, j], -w * a
                continue
            plain, clipped = r * a, min(max(r, lo), hi) * a
            if plain < clipped or lo < r < hi:
                surrogate, d = plain, r * a
            else:
                surrogate, d = clipped, 0.0
            if objective == "dual_clip" and a < 0 and c * a > surrogate:
                surrogate, d = c * a, 0.0
            ell[i, j], grad[i, j] = -surrogate, -d
    return ell, grad


def naive_weights(old, sampler, mask, kind, cap):
    """Per-token correction weights, touched tokens and touched sequences."""
    n, t = old.shape
    w, tok, seqs = np.ones((n, t)), np.zeros((n, t), bool), np.zeros(n, bool)
    for i in range(n):
        toks = [j for j in range(t) if mask[i, j]]
        ratios = [math.exp(float(old[i, j]) - float(sampler[i, j])) for j in toks]
        if kind in ("tis_token", "mask_token"):
            for j, r in zip(toks, ratios, strict=True):
                if kind == "tis_token":
                    w[i, j], tok[i, j] = min(r, cap), r > cap
                else:
                    out = not 1 / cap <= r <= cap
                    w[i, j], tok[i, j] = (0.0 if out else 1.0), out
            seqs[i] = tok[i].any()
            continue
        if kind == "none":
            continue
        prod = math.prod(ratios)
        if kind == "tis_sequence":
            weight, out = min(prod, cap), prod > cap
        else:
            value = prod if kind == "mask_sequence" else prod ** (1 / len(toks))
            out = not 1 / cap <= value <= cap
            weight = 0.0 if out else 1.0
        for j in toks:
            w[i, j], tok[i, j] = weight, out
        seqs[i] = out
    return w, tok, seqs


def naive_loss(ell, grad, mask, aggregation, weight=None):
    weight = np.ones(mask.shape) if weight is None else weight
    ell, grad = ell * weight * mask, grad * weight * mask
    if aggregation == "token-mean":
        return ell.sum() / mask.sum(), grad / mask.sum()
    n_i = mask.sum(-1, keepdims=True)
    return (ell / n_i).sum() / len(mask), grad / n_i / len(mask)


def library(logp, old, adv, mask, **kw):
    fn = lambda lp: L.policy_loss(lp, old, adv, mask, **kw)
    (value, metrics), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(logp))
    return float(value), np.asarray(grad), metrics


# ---------------------------------------------------------------------------------------------
# CISPO


def test_cispo_golden_by_hand():
    # Ratios 0.5, 1 and 6 with A = 1: weights clip(ρ, 0, 5) = 0.5, 1, 5 (no lower bound).
    old = np.log(np.array([[0.2, 0.1, 0.05]], np.float32))
    logp = old + np.log(np.array([[0.5, 1.0, 6.0]], np.float32))
    adv, mask = np.ones(1, np.float32), np.ones((1, 3), np.float32)
    value, grad, _ = library(logp, old, adv, mask, objective="cispo")
    w = np.array([0.5, 1.0, 5.0])
    close(value, -(w * logp[0]).sum() / 3)  # token-mean: −Σ ŵ·A·logp / 3
    close(grad, -w[None] / 3)  # every token keeps a gradient, the 6x one with weight 5
    # A lower bound clips the 0.5 up to 0.8 (ε_low 0.2); ε_high 0.28 clips the 6 to 1.28.
    _, grad, _ = library(
        logp, old, adv, mask, objective="cispo", cispo_eps_low=0.2, cispo_eps_high=0.28
    )
    close(grad, -np.array([[0.8, 1.0, 1.28]]) / 3)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", AGGS)
def test_cispo_matches_naive_loop(level, aggregation):
    logp, old, adv, mask, _ = random_batch(1, spread=1.2)
    for bounds in ((1.0, 4.0), (0.2, 0.28)):
        value, grad, _ = library(
            logp,
            old,
            adv,
            mask,
            objective="cispo",
            ratio_level=level,
            aggregation=aggregation,
            cispo_eps_low=bounds[0],
            cispo_eps_high=bounds[1],
        )
        ell, d = naive_terms(logp, old, adv, mask, "cispo", level, cispo=bounds)
        want, want_grad = naive_loss(ell, d, mask, aggregation)
        close(value, want)
        close(grad, want_grad)
    assert np.abs(want_grad).min(where=mask > 0, initial=1) > 0  # no token lost its gradient


# ---------------------------------------------------------------------------------------------
# Dual-clip PPO


def test_dual_clip_golden_by_hand():
    # A = −1, ε = 0.2, c = 3; ratios 5, 1.5, 0.5:
    #   ρ = 5:   min(−5, −1.2) = −5, bounded by max(·, −3) = −3 → ℓ = 3, no gradient
    #   ρ = 1.5: min(−1.5, −1.2) = −1.5 > −3                  → ℓ = 1.5, dℓ/dlogp = −ρA = 1.5
    #   ρ = 0.5: min(−0.5, −0.8) = −0.8 (clipped)              → ℓ = 0.8, no gradient
    old = np.log(np.array([[0.1, 0.2, 0.4]], np.float32))
    logp = old + np.log(np.array([[5.0, 1.5, 0.5]], np.float32))
    mask = np.ones((1, 3), np.float32)
    value, grad, _ = library(logp, old, -np.ones(1, np.float32), mask, objective="dual_clip")
    close(value, (3 + 1.5 + 0.8) / 3)
    close(grad, [[0, 1.5 / 3, 0]])
    ppo, _, _ = library(logp, old, -np.ones(1, np.float32), mask)
    close(ppo, (5 + 1.5 + 0.8) / 3)  # plain PPO: the 5x token costs 5
    # c = 6 does not bind at ρ = 5; positive advantages are plain PPO's.
    close(
        library(logp, old, -np.ones(1, np.float32), mask, objective="dual_clip", dual_clip_c=6.0)[
            0
        ],
        ppo,
    )
    pos = [
        library(logp, old, np.ones(1, np.float32), mask, objective=o)[:2]
        for o in ("dual_clip", "ppo_clip")
    ]
    close(pos[0][0], pos[1][0])
    close(pos[0][1], pos[1][1])


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", AGGS)
def test_dual_clip_matches_naive_loop(level, aggregation):
    logp, old, adv, mask, _ = random_batch(2, spread=1.5)
    old = old - 0.8  # ratios mostly above c = 2, sequence ratios too
    value, grad, _ = library(
        logp,
        old,
        adv,
        mask,
        objective="dual_clip",
        ratio_level=level,
        aggregation=aggregation,
        dual_clip_c=2.0,
    )
    ell, d = naive_terms(logp, old, adv, mask, "dual_clip", level, c=2.0)
    want, want_grad = naive_loss(ell, d, mask, aggregation)
    close(value, want)
    close(grad, want_grad)
    # The batch has tokens where the second clip binds, so the objective differs from PPO's.
    assert (
        abs(library(logp, old, adv, mask, ratio_level=level, aggregation=aggregation)[0] - value)
        > 1e-3
    )


# ---------------------------------------------------------------------------------------------
# REINFORCE++


def test_reinforce_pp_token_advantages_golden_by_hand():
    # Returns R = [1, 0]; mask lengths 3 and 2; KL per token, β = 0.5.
    #   Σ_{s≥t} KL: seq 0 → [0.6, 0.5, 0.3]; seq 1 → [1.0, 0.5] (the masked 9 never counts)
    #   G = R − β·tail: [0.7, 0.75, 0.85] and [−0.5, −0.25]
    #   mean = 1.55 / 5 = 0.31; deviations 0.39, 0.44, 0.54, −0.81, −0.56
    #   var = (0.1521 + 0.1936 + 0.2916 + 0.6561 + 0.3136) / 5 = 0.3214
    mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
    kl = np.array([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0]], np.float32)
    got = L.token_advantages(np.array([1.0, 0.0]), mask, kl, kl_coef=0.5, eps=0.0)
    std = math.sqrt(0.3214)
    close(got, np.array([[0.39, 0.44, 0.54], [-0.81, -0.56, 0]]) / std * mask)
    # Without KL every token of a sequence has its sequence's z-scored return.
    got = L.token_advantages(np.array([1.0, 0.0]), mask, eps=0.0)
    # mean 3/5, std sqrt(0.24): (1 − 0.6)/0.49 and (0 − 0.6)/0.49
    s = math.sqrt(0.24)
    close(got, np.array([[0.4, 0.4, 0.4], [-0.6, -0.6, 0]]) / s)


def test_reinforce_pp_estimators_by_hand():
    r = jnp.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    # No baseline: an all-correct group keeps its rewards (the batch normalisation centres).
    close(L.compute_advantages(r, 4, "reinforce_pp"), r)
    # Baseline: group means 1 and 0.25 subtracted; the all-equal group is exactly 0.
    close(
        L.compute_advantages(r, 4, "reinforce_pp_baseline"), [0, 0, 0, 0, 0.75, -0.25, -0.25, -0.25]
    )
    assert L.is_token_level("reinforce_pp") and L.is_token_level("reinforce_pp_baseline")
    assert not L.is_token_level("grpo")


def naive_token_advantages(returns, mask, kl, beta, eps):
    n, t = mask.shape
    g = np.zeros((n, t))
    for i in range(n):
        for j in range(t):
            if mask[i, j]:
                tail = sum(float(kl[i, s]) for s in range(j, t) if mask[i, s])
                g[i, j] = float(returns[i]) - beta * tail
    vals = [g[i, j] for i in range(n) for j in range(t) if mask[i, j]]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    return np.where(mask > 0, (g - mean) / (std + eps), 0)


@pytest.mark.parametrize("estimator", ["reinforce_pp", "reinforce_pp_baseline"])
def test_reinforce_pp_loss_matches_naive_loop(estimator):
    logp, old, _, mask, _ = random_batch(3, n=8, t=6)
    rng = np.random.default_rng(4)
    rewards = rng.integers(0, 2, 8).astype(np.float32)
    ref = (old + rng.normal(0, 0.3, old.shape)).astype(np.float32)
    kl = np.float64(old) - ref  # k1, as the paper folds it in
    returns = L.compute_advantages(rewards, 4, estimator)
    adv = L.token_advantages(returns, mask, L.kl_penalty(old, ref, "k1"), kl_coef=0.1)
    base = rewards.reshape(2, 4)
    base = (base - base.mean(1, keepdims=True)) if estimator.endswith("baseline") else base
    want_adv = naive_token_advantages(base.reshape(-1), mask, kl, 0.1, 1e-6)
    close(adv, want_adv)
    close(np.sum(np.asarray(adv) * mask) / mask.sum(), 0, atol=1e-6)  # centred over the batch
    value, grad, _ = library(logp, old, adv, mask)
    ell, d = naive_terms(logp, old, want_adv, mask, "ppo_clip")
    want, want_grad = naive_loss(ell, d, mask, "token-mean")
    close(value, want)
    close(grad, want_grad)


# ---------------------------------------------------------------------------------------------
# Mismatch corrections


def test_corrections_golden_by_hand():
    # Ratios π_trainer/π_sampler: seq 0 → 3, 1.5, 1/4 (product 1.125); seq 1 → 1.1, 1.1 (1.21).
    mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
    sampler = np.full((2, 3), -2.0, np.float32)
    old = sampler + np.log(np.array([[3, 1.5, 0.25], [1.1, 1.1, 7.0]], np.float32))

    def run(kind, cap):
        cor, metrics = L.mismatch_correction(old, sampler, mask, kind, cap)
        w = np.broadcast_to(np.asarray(cor.weight), mask.shape) * mask
        return w, float(metrics["mismatch_token_frac"]), float(metrics["mismatch_seq_frac"])

    w, tok, seq = run("tis_token", 2.0)  # min(ρ, 2): the 3 is truncated
    close(w, [[2, 1.5, 0.25], [1.1, 1.1, 0]])
    assert (tok, seq) == (pytest.approx(1 / 5), pytest.approx(1 / 2))
    w, tok, seq = run("tis_sequence", 2.0)  # products under the cap
    close(w, [[1.125] * 3, [1.21, 1.21, 0]])
    assert (tok, seq) == (0, 0)
    w, tok, seq = run("tis_sequence", 1.2)  # 1.21 truncated to 1.2
    close(w, [[1.125] * 3, [1.2, 1.2, 0]])
    assert (tok, seq) == (pytest.approx(2 / 5), pytest.approx(1 / 2))
    w, tok, seq = run("mask_token", 2.0)  # 3 > 2 and 1/4 < 1/2 rejected
    close(w, [[0, 1, 0], [1, 1, 0]])
    assert (tok, seq) == (pytest.approx(2 / 5), pytest.approx(1 / 2))
    w, tok, seq = run("mask_sequence", 1.2)  # 1.125 kept, 1.21 rejected
    close(w, [[1, 1, 1], [0, 0, 0]])
    assert (tok, seq) == (pytest.approx(2 / 5), pytest.approx(1 / 2))
    w, tok, seq = run("geo_mask", 1.05)  # geometric means 1.125^(1/3) = 1.040 kept, 1.1 not
    close(w, [[1, 1, 1], [0, 0, 0]])
    w, tok, seq = run("none", 2.0)
    close(w, mask)
    assert (tok, seq) == (0, 0)


KINDS = ["tis_token", "tis_sequence", "mask_token", "mask_sequence", "geo_mask"]


@pytest.mark.parametrize("objective", ["ppo_clip", "dual_clip", "cispo"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_correction_composes_with_every_objective(objective, kind):
    logp, old, adv, mask, sampler = random_batch(5, n=6, t=5)
    cap = 1.3 if kind == "geo_mask" else 2.0
    value, grad, metrics = library(
        logp,
        old,
        adv,
        mask,
        objective=objective,
        correction=kind,
        correction_cap=cap,
        sampler_logp=sampler,
    )
    w, tok, seqs = naive_weights(old, sampler, mask, kind, cap)
    ell, d = naive_terms(logp, old, adv, mask, objective)
    want, want_grad = naive_loss(ell, d, mask, "token-mean", w)
    close(value, want)
    close(grad, want_grad)
    close(metrics["mismatch_token_frac"], (tok * mask).sum() / mask.sum())
    close(metrics["mismatch_seq_frac"], seqs.mean())
    assert 0 < seqs.mean() < 1  # the batch has sequences on both sides of the bound


def test_correction_metrics_merge_exactly_over_microbatches():
    logp, old, adv, mask, sampler = random_batch(6, n=8, t=5)
    mask[1] = 0  # a sequence with no tokens counts in neither mean
    kw = dict(correction="mask_token", sampler_logp=sampler, correction_cap=2.0)
    _, full = L.policy_loss(logp, old, adv, mask, **kw)
    norm = L.loss_normalizer(mask, "token-mean")
    parts = []
    for rows in (slice(0, 3), slice(3, 8)):  # uneven: weights matter
        kw["sampler_logp"] = sampler[rows]
        parts.append(
            L.policy_loss(logp[rows], old[rows], adv[rows], mask[rows], normalizer=norm, **kw)[1]
        )
    merged = L.merge_metrics(parts)
    for k in L.METRIC_NAMES:
        close(merged[k], full[k])
    assert float(full["sequences"]) == 7 and 0 < float(full["mismatch_seq_frac"]) < 1


def test_off_by_default_and_identity_without_a_gap():
    logp, old, adv, mask, _ = random_batch(7)
    base = library(logp, old, adv, mask)
    for kind in KINDS:  # sampler == trainer: every weight 1, nothing touched
        got = library(logp, old, adv, mask, correction=kind, sampler_logp=old)
        assert got[0] == base[0] and np.array_equal(got[1], base[1])
        assert float(got[2]["mismatch_token_frac"]) == 0


def test_validation_and_config_rules():
    logp, old, adv, mask, sampler = random_batch(8)
    with pytest.raises(ValueError, match="needs sampler_logp"):
        L.policy_loss(logp, old, adv, mask, correction="tis_token")
    with pytest.raises(ValueError, match="unknown mismatch correction 'tis'"):
        L.policy_loss(logp, old, adv, mask, correction="tis", sampler_logp=sampler)
    with pytest.raises(ValueError, match="dual_clip_c must be > 1"):
        L.policy_loss(logp, old, adv, mask, objective="dual_clip", dual_clip_c=1.0)
    with pytest.raises(ValueError, match="cap C must be a static number > 1"):
        L.mismatch_correction(old, sampler, mask, "tis_token", 1.0)
    with pytest.raises(ValueError, match="needs loss.recompute_old_logprobs=True"):
        GRPOConfig(loss=dict(correction="tis_token"))
    with pytest.raises(ValueError, match="only a token-level estimator"):
        GRPOConfig(loss=dict(reward_kl_coef=0.01))
    with pytest.raises(ValueError, match=r"loss.correction_cap=1.0 must be > 1"):
        GRPOConfig(loss=dict(correction_cap=1.0))
    with pytest.raises(ValueError, match=r"loss.dual_clip_c=0.5 must be > 1"):
        GRPOConfig(loss=dict(dual_clip_c=0.5))
    with pytest.raises(ValueError, match=r"loss.correction='tis' is not one of"):
        GRPOConfig(loss=dict(correction="tis", recompute_old_logprobs=True))
    cfg = GRPOConfig(loss=dict(advantage_estimator="reinforce_pp", reward_kl_coef=0.01))
    assert cfg.loss.needs_reference and not GRPOConfig().loss.needs_reference
    GRPOConfig(loss=dict(correction="geo_mask", correction_cap=1.001, recompute_old_logprobs=True))


# ---------------------------------------------------------------------------------------------
# GAE


def test_gae_golden_by_hand():
    v = np.array([[0.5, 0.6, 0.8]], np.float32)
    mask, r = np.ones((1, 3), np.float32), np.ones(1, np.float32)
    adv, ret = L.gae(r, v, mask, gamma=1.0, lam=1.0)
    close(adv, [[0.5, 0.4, 0.2]])  # Monte Carlo: R − V_t
    close(ret, [[1, 1, 1]])
    close(L.gae(r, v, mask, gamma=1.0, lam=0.0)[0], [[0.1, 0.2, 0.2]])  # δ_t = V_{t+1} − V_t
    # γ = λ = 0.5: δ = [0.5·0.6 − 0.5, 0.5·0.8 − 0.6, 1 − 0.8] = [−0.2, −0.2, 0.2];
    # A_2 = 0.2, A_1 = −0.2 + 0.25·0.2 = −0.15, A_0 = −0.2 + 0.25·(−0.15) = −0.2375.
    close(L.gae(r, v, mask, gamma=0.5, lam=0.5)[0], [[-0.2375, -0.15, 0.2]])
    # A masked position in the middle is skipped: the same numbers around it.
    v2 = np.array([[0.5, 9.0, 0.6, 0.8, 7.0]], np.float32)
    m2 = np.array([[1, 0, 1, 1, 0]], np.float32)
    close(L.gae(r, v2, m2, gamma=0.5, lam=0.5)[0], [[-0.2375, 0, -0.15, 0.2, 0]])


def naive_gae(rewards, values, mask, gamma, lam):
    """Plain loops over each row's mask tokens (jnp scalars, so jax.grad can run through)."""
    rows = []
    for i in range(values.shape[0]):
        toks = [j for j in range(values.shape[1]) if mask[i, j]]
        adv = {}
        for k, j in enumerate(toks):
            total = 0.0
            for l_, j2 in enumerate(toks[k:]):
                nxt = values[i, toks[k + l_ + 1]] if k + l_ + 1 < len(toks) else 0.0
                r = rewards[i] if k + l_ == len(toks) - 1 else 0.0
                total = total + (gamma * lam) ** l_ * (r + gamma * nxt - values[i, j2])
            adv[j] = total
        rows.append(jnp.stack([adv.get(j, jnp.zeros(())) for j in range(values.shape[1])]))
    return jnp.stack(rows)


def test_gae_matches_naive_loop_values_and_gradients():
    rng = np.random.default_rng(9)
    values = rng.normal(0, 1, (3, 6)).astype(np.float32)
    mask = (rng.random((3, 6)) < 0.7).astype(np.float32)
    mask[:, 0] = 1
    rewards = rng.normal(0, 1, 3).astype(np.float32)
    probe = rng.normal(0, 1, (3, 6)).astype(np.float32)
    for gamma, lam in ((1.0, 1.0), (0.99, 0.95), (0.9, 0.0)):
        got = L.gae(rewards, values, mask, gamma, lam)[0]
        want = naive_gae(jnp.asarray(rewards), jnp.asarray(values), mask, gamma, lam)
        close(got, want)
        g1 = jax.grad(lambda v, g=gamma, la=lam: jnp.sum(probe * L.gae(rewards, v, mask, g, la)[0]))
        g2 = jax.grad(
            lambda v, g=gamma, la=lam: jnp.sum(probe * naive_gae(rewards, v, mask, g, la))
        )
        close(g1(jnp.asarray(values)), g2(jnp.asarray(values)))
