"""Registered policy objectives and KL estimators, and the loss that combines them.

`policy_loss` computes the importance ratio (per token or per sequence), applies the registered
objective per token, adds β·KL by a registered estimator, and aggregates with an exact
whole-batch normaliser. Papers: see `rl_reason.losses`.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rl_reason.core.checks import (
    Array,
    ArrayLike,
    check_choice,
    concrete_float,
    float_dtype,
    positive_int,
    safe_div,
)
from rl_reason.core.corrections import CORRECTIONS, mismatch_correction
from rl_reason.core.registry import Registry

_sg = jax.lax.stop_gradient

# ---------------------------------------------------------------------------------------------
# KL estimators

KL_ESTIMATORS = Registry("KL estimator")
"""KL estimators by name, as functions of x = logp − ref_logp (see `kl_penalty`)."""

register_kl_estimator = KL_ESTIMATORS.register


@register_kl_estimator("k1")
def _k1(x: Array) -> Array:
    return x


@register_kl_estimator("k2")
def _k2(x: Array) -> Array:
    return 0.5 * x**2


@register_kl_estimator("k3")
def _k3(x: Array) -> Array:
    # expm1 keeps precision near x = 0, where the estimator is O(x²) and the terms cancel.
    return jnp.expm1(-x) + x


def kl_penalty(logp: ArrayLike, ref_logp: ArrayLike, estimator: str = "k3") -> Array:
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π [KL].

    With x = logp − ref_logp (any matching shapes, e.g. [N, T]):

    - ``"k1"``: x. Unbiased, high variance, can be negative.
    - ``"k2"``: x²/2. Biased, low variance, ≥ 0; its gradient is that of the reverse KL.
    - ``"k3"``: exp(−x) + x − 1. Unbiased, ≥ 0; the estimator used by [GRPO] (eq. 4). Note that
      exp(−x) overflows float32 for x < −88, i.e. where π_ref is ~e^88 times likelier than π.

    Gradients flow to both arguments; `policy_loss` stops the one through ``ref_logp``.
    """
    KL_ESTIMATORS.check(estimator)
    logp = jnp.asarray(logp)
    ref_logp = jnp.asarray(ref_logp)
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp shape {logp.shape} != ref_logp shape {ref_logp.shape}")
    dtype = float_dtype(logp, ref_logp)
    return KL_ESTIMATORS[estimator](logp.astype(dtype) - ref_logp.astype(dtype))


# ---------------------------------------------------------------------------------------------
# Policy objectives


class ObjectiveInputs(NamedTuple):
    """What a policy objective sees, per completion token ([N, T]; masked positions hold 0).

    ratio: the importance ratio ρ, differentiable (for ratio_level="sequence" the GSPO-token
      form: value s_i on every token, gradient s_i·∇logp).
    log_ratio: logp − old_logp per token (differentiable through logp).
    logp: the policy's token log-probs (differentiable).
    advantages: [N, 1] (one per sequence) or [N, T] (per token), constant.
    clip_eps_low, clip_eps_high: the configured clip bounds.
    dual_clip_c: the lower bound c of "dual_clip" (c > 1).
    cispo_eps_low, cispo_eps_high: the bounds of the clipped weight of "cispo".
    """

    ratio: Array
    log_ratio: Array
    logp: Array
    advantages: Array
    clip_eps_low: float
    clip_eps_high: float
    dual_clip_c: float = 3.0
    cispo_eps_low: float = 1.0
    cispo_eps_high: float = 4.0


POLICY_OBJECTIVES = Registry("policy objective")
"""Per-token policy surrogates by name: fn(ObjectiveInputs) -> loss [N, T], before the KL
term, the mask and the aggregation (which `policy_loss` applies to every objective alike)."""

register_policy_objective = POLICY_OBJECTIVES.register


@register_policy_objective("ppo_clip")
def ppo_clip(x: ObjectiveInputs) -> Array:
    """−min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A) [PPO, GRPO]."""
    clipped = jnp.clip(x.ratio, 1 - x.clip_eps_low, 1 + x.clip_eps_high)
    return -jnp.minimum(x.ratio * x.advantages, clipped * x.advantages)


@register_policy_objective("dual_clip")
def dual_clip(x: ObjectiveInputs) -> Array:
    """Dual-clip PPO [DualClip]: ppo_clip, and for A < 0 the surrogate is bounded below by c·A.

        ℓ = −min(ρA, clip(ρ, 1 − ε_low, 1 + ε_high)A)                 for A ≥ 0
        ℓ = −max(min(ρA, clip(ρ, 1 − ε_low, 1 + ε_high)A), c·A)       for A < 0

    With A < 0 and a large ratio (a token the old policy found unlikely that is now likely),
    −ρA grows without bound in plain PPO; the second clip caps the loss at −c·A and gives no
    gradient there. For A < 0 PPO's surrogate is A·max(ρ, 1 − ε_low), so with c > 1 (3 in the
    paper) the bound binds exactly where ρ > c.
    """
    clipped = jnp.clip(x.ratio, 1 - x.clip_eps_low, 1 + x.clip_eps_high)
    surrogate = jnp.minimum(x.ratio * x.advantages, clipped * x.advantages)
    bounded = jnp.maximum(surrogate, x.dual_clip_c * x.advantages)
    return -jnp.where(x.advantages < 0, bounded, surrogate)


@register_policy_objective("cispo")
def cispo(x: ObjectiveInputs) -> Array:
    """CISPO [CISPO, eq. 4]: −sg(clip(ρ, 1 − ε_low^IS, 1 + ε_high^IS))·A·logp.

    The importance weight is clipped and its gradient stopped, so every token keeps a gradient
    A·ŵ·∇logp (PPO drops the tokens whose ratio left the clip range; CISPO only bounds their
    weight). MiniMax-M1 sets no lower bound in practice (ε_low^IS large: the default 1 makes
    the floor 0, which a ratio never reaches) and tunes ε_high^IS, whose value it does not
    publish; the default 4 caps the weight at 5. The bounds are `cispo_eps_low/high`, apart
    from PPO's ε. With ratio_level="sequence" the weight is the GSPO sequence ratio s_i.
    """
    weight = _sg(jnp.clip(x.ratio, 1 - x.cispo_eps_low, 1 + x.cispo_eps_high))
    return -weight * x.advantages * x.logp


# ---------------------------------------------------------------------------------------------
# Policy loss

AGGREGATIONS: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
"""Loss aggregation modes; see `policy_loss` for the formulas."""

RATIO_LEVELS: tuple[str, ...] = ("token", "sequence")
"""Importance-ratio levels: per token (PPO/GRPO) or per sequence (GSPO)."""

METRIC_NAMES: tuple[str, ...] = (
    "clip_frac_low",
    "clip_frac_high",
    "ratio_mean",
    "kl_ref",
    "approx_kl_old",
    "mismatch_token_frac",
    "mismatch_seq_frac",
    "tokens",
    "sequences",
)
"""Keys of the metrics dict returned by `policy_loss` (always all present)."""

SEQUENCE_METRICS: tuple[str, ...] = ("mismatch_seq_frac",)
"""Metrics that are means over sequences (weighted by ``sequences`` when merged)."""


def loss_normalizer(mask_NT: ArrayLike, aggregation: str, max_len: int | None = None) -> Array:
    """The denominator of `policy_loss` for this batch, as a float32 scalar.

    Compute it once on the whole batch and pass it as ``policy_loss(..., normalizer=...)`` to each
    microbatch; the microbatch losses and gradients then sum to the whole-batch ones exactly.

    - ``"token-mean"``: Σ_{i,t} m_it, the number of completion tokens.
    - ``"seq-mean-token-mean"``, ``"seq-mean-token-sum"``: N, the number of sequences.
    - ``"seq-mean-token-sum-norm"``: N·max_len.
    """
    check_choice("aggregation", aggregation, AGGREGATIONS)
    mask = jnp.asarray(mask_NT)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [N, T], got shape {mask.shape}")
    n = mask.shape[0]
    if aggregation == "token-mean":
        return jnp.sum(mask.astype(jnp.float32))
    if aggregation == "seq-mean-token-sum-norm":
        _check_max_len(max_len)
        return jnp.asarray(n * operator.index(max_len), jnp.float32)
    return jnp.asarray(n, jnp.float32)


def _check_max_len(max_len: Any) -> None:
    if max_len is None:
        raise ValueError(
            "aggregation 'seq-mean-token-sum-norm' needs max_len (the generation budget, the "
            "constant of Dr. GRPO's N·max_len normaliser), or pass normalizer="
        )
    positive_int("max_len", max_len)


def policy_loss(
    logp: ArrayLike,
    old_logp: ArrayLike,
    advantages: ArrayLike,
    mask: ArrayLike,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    ratio_level: str = "token",
    aggregation: str = "token-mean",
    max_len: int | None = None,
    ref_logp: ArrayLike | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    normalizer: ArrayLike | None = None,
    objective: str = "ppo_clip",
    dual_clip_c: float = 3.0,
    cispo_eps_low: float = 1.0,
    cispo_eps_high: float = 4.0,
    sampler_logp: ArrayLike | None = None,
    correction: str = "none",
    correction_cap: float = 2.0,
) -> tuple[Array, dict[str, Array]]:
    """Clipped surrogate policy loss with an optional KL penalty [PPO, GRPO].

    Args:
      logp: [N, T] log-probs of the sampled tokens under the policy being trained (differentiated).
      old_logp: [N, T] log-probs under the policy that sampled them (constant).
      advantages: [N] one advantage per sequence, e.g. from `compute_advantages`, or [N, T] one
        per token (REINFORCE++, `token_advantages`); constant.
      mask: [N, T] 1 on completion tokens, 0 elsewhere. Values of logp/old_logp/ref_logp at
        masked positions never reach the loss or its gradient (they may even be NaN).
      clip_eps_low, clip_eps_high: the ratio is clipped to [1 − ε_low, 1 + ε_high]. A larger
        ε_high ("clip-higher", 0.28 in [DAPO]) leaves more room to raise unlikely tokens. With
        ratio_level="sequence", [GSPO] uses far smaller values (about 3e-4 and 4e-4).
      ratio_level: "token" or "sequence" (see below).
      aggregation: one of `AGGREGATIONS` (see below).
      max_len: generation budget; needed by "seq-mean-token-sum-norm" unless normalizer is given.
      ref_logp: [N, T] log-probs under the reference policy (constant); needed if kl_coef != 0.
      kl_coef: β, weight of the per-token KL penalty.
      kl_estimator: name in `KL_ESTIMATORS`, applied to x = logp − ref_logp.
      normalizer: None to normalise within this batch as the aggregation says; otherwise the
        whole-batch denominator from `loss_normalizer`, for exact gradient accumulation.
      objective: name in `POLICY_OBJECTIVES`, the per-token surrogate of ρ and A; the default
        "ppo_clip" is the clipped term below.
      dual_clip_c: c of the "dual_clip" objective; cispo_eps_low/high: the weight bounds of the
        "cispo" objective (see each objective's docstring).
      sampler_logp: [N, T] the sampler's log-probs of the tokens under the plain policy, for a
        mismatch ``correction`` against ``old_logp`` (the trainer's rescoring of them).
      correction: name in `CORRECTIONS` ("none": off); its constant per-token weight w
        multiplies the objective's term (not the KL term), for any objective. Rejected tokens
        (w = 0) give no gradient and stay in the denominator, as clipped tokens do.
      correction_cap: C > 1 of the correction (`core.corrections`).

    Per-token loss, with A_i the advantage of sequence i and ρ_it the importance ratio:

        ℓ_it = −min(ρ_it·A_i, clip(ρ_it, 1 − ε_low, 1 + ε_high)·A_i) + β·KL(logp_it, ref_logp_it)

    (the first term is the "ppo_clip" objective; another registered objective replaces it, and a
    mismatch correction multiplies it by w_it).

    - ratio_level="token" [PPO, GRPO]: ρ_it = exp(logp_it − old_logp_it).
    - ratio_level="sequence" [GSPO]: s_i = exp(Σ_t m_it (logp_it − old_logp_it) / Σ_t m_it), the
      length-normalised sequence ratio, and ρ_it = sg(s_i)·exp(logp_it − sg(logp_it)): its value
      is s_i on every token, its gradient s_i·∇logp_it ("GSPO-token"). With
      "seq-mean-token-mean" the loss and its gradient are exactly those of the sequence objective
      mean_i −min(s_i A_i, clip(s_i) A_i); the other modes weight that term by the length Σ_t m.

    Aggregation (m the mask; every mode is a sum of per-sequence terms over a denominator):

    ======================== ==================================== ===================
    aggregation              loss                                 denominator
    ======================== ==================================== ===================
    token-mean [DAPO]        Σ_{i,t} m ℓ / Σ_{i,t} m               Σ_{i,t} m
    seq-mean-token-mean      (1/N) Σ_i (Σ_t m ℓ / Σ_t m) [GRPO]    N
    seq-mean-token-sum       (1/N) Σ_i Σ_t m ℓ                     N
    seq-mean-token-sum-norm  Σ_{i,t} m ℓ / (N·max_len) [DrGRPO]    N·max_len
    ======================== ==================================== ===================

    Gradient accumulation: the numerator is a sum over sequences of terms that depend only on
    that sequence (for "seq-mean-token-mean" the inner 1/Σ_t m stays per sequence, and the GSPO
    ratio s_i is per sequence), so with ``normalizer=loss_normalizer(whole_mask, aggregation,
    max_len)`` passed to every microbatch, the function returns (microbatch numerator) /
    normalizer and the sum of microbatch losses and of their gradients equals the whole-batch
    loss and gradient. Advantages must of course be computed on whole groups first. A sequence
    with no mask tokens contributes 0 (still counted in N), never NaN.

    Note that on-policy (logp == old_logp, β = 0) the loss value is −Σ m A / denominator, which
    is 0 for "seq-mean-token-mean" with group-centred advantages, while the gradient is the
    REINFORCE gradient −Σ m A ∇logp / denominator: a loss reading ~0 is not a sign of no learning.

    Returns:
      (loss, metrics): loss a scalar; metrics a dict with keys `METRIC_NAMES`, all without
      gradient. Each metric except ``tokens`` is a mean over this call's mask tokens (weights m):
        clip_frac_low   fraction with A < 0 and ρ < 1 − ε_low (clipped, no gradient; the PPO
                        bounds ε_low/ε_high, whatever the objective)
        clip_frac_high  fraction with A > 0 and ρ > 1 + ε_high (clipped, no gradient)
        ratio_mean      mean ρ (the sequence ratio s_i on each token for ratio_level="sequence")
        kl_ref          mean KL(π ‖ π_ref) by ``kl_estimator`` (0 without ref_logp)
        approx_kl_old   mean k3 estimate of KL(π_old ‖ π) = ρ − 1 − log ρ with the token ratio
        mismatch_token_frac, mismatch_seq_frac  the fraction of tokens / of sequences (a mean
                        over the sequences with a mask token) the correction touched
        tokens          Σ m, the weight of this call's means
        sequences       the number of sequences with a mask token (the weight of
                        `SEQUENCE_METRICS`).
      Across microbatches, combine them weighted by ``tokens`` (``sequences``): `merge_metrics`
      does this, and gives exactly the whole-batch metrics.
    """
    check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    check_choice("aggregation", aggregation, AGGREGATIONS)
    KL_ESTIMATORS.check(kl_estimator)
    POLICY_OBJECTIVES.check(objective)
    CORRECTIONS.check(correction)
    logp = jnp.asarray(logp)
    old_logp = jnp.asarray(old_logp)
    advantages = jnp.asarray(advantages)
    mask = jnp.asarray(mask)
    if logp.ndim != 2:
        raise ValueError(f"logp must be 2-D [N, T], got shape {logp.shape}")
    n, _ = logp.shape
    for name, x in (("old_logp", old_logp), ("mask", mask)):
        if x.shape != logp.shape:
            raise ValueError(f"{name} shape {x.shape} != logp shape {logp.shape} [N, T]")
    if advantages.shape not in ((n,), logp.shape):
        raise ValueError(
            f"advantages must be [N] = ({n},), one per sequence, or [N, T] = {logp.shape}, one "
            f"per token, got shape {advantages.shape}"
        )
    if correction != "none":
        if sampler_logp is None:
            raise ValueError(
                f"correction={correction!r} needs sampler_logp (the sampler's log-probs of the "
                "tokens); pass them or correction='none'"
            )
        sampler_logp = jnp.asarray(sampler_logp)
        if sampler_logp.shape != logp.shape:
            raise ValueError(f"sampler_logp shape {sampler_logp.shape} != logp {logp.shape}")
    if ref_logp is not None:
        ref_logp = jnp.asarray(ref_logp)
        if ref_logp.shape != logp.shape:
            raise ValueError(f"ref_logp shape {ref_logp.shape} != logp shape {logp.shape}")
    beta = concrete_float(kl_coef)
    if ref_logp is None and beta != 0:
        # A traced kl_coef may be non-zero, so it needs ref_logp as well; pass 0.0 to turn KL off.
        raise ValueError(
            f"kl_coef={kl_coef!r} but ref_logp is None; pass the reference log-probs or kl_coef=0.0"
        )
    lo, hi = concrete_float(clip_eps_low), concrete_float(clip_eps_high)
    if lo is not None and not 0 <= lo < 1:
        raise ValueError(f"clip_eps_low must be in [0, 1), got {clip_eps_low}")
    if hi is not None and not hi >= 0:
        raise ValueError(f"clip_eps_high must be >= 0, got {clip_eps_high}")
    c = concrete_float(dual_clip_c)
    if c is not None and not c > 1:
        raise ValueError(f"dual_clip_c must be > 1 (the bound c·A for A < 0), got {dual_clip_c}")
    lo, hi = concrete_float(cispo_eps_low), concrete_float(cispo_eps_high)
    if lo is not None and not 0 <= lo <= 1:
        raise ValueError(f"cispo_eps_low must be in [0, 1], got {cispo_eps_low}")
    if hi is not None and not hi >= 0:
        raise ValueError(f"cispo_eps_high must be >= 0, got {cispo_eps_high}")
    if normalizer is None:
        if aggregation == "seq-mean-token-sum-norm":
            _check_max_len(max_len)
    elif jnp.shape(normalizer) != ():
        raise ValueError(f"normalizer must be a scalar, got shape {jnp.shape(normalizer)}")

    dtype = float_dtype(logp, old_logp, advantages)
    on = mask != 0
    m = mask.astype(dtype)
    # Replace masked positions before any arithmetic so NaN/inf padding reaches neither the value
    # nor (through exp, whose derivative would multiply 0 by inf) the gradient.
    lp = jnp.where(on, logp.astype(dtype), 0)
    old = jnp.where(on, _sg(old_logp).astype(dtype), 0)
    adv = _sg(advantages).astype(dtype)
    adv = adv[:, None] if adv.ndim == 1 else jnp.where(on, adv, 0)
    tokens_N = jnp.sum(m, -1)

    log_ratio = lp - old
    if ratio_level == "token":
        ratio = jnp.exp(log_ratio)
    else:
        seq_ratio_N = jnp.exp(safe_div(jnp.sum(m * log_ratio, -1), tokens_N))
        ratio = _sg(seq_ratio_N)[:, None] * jnp.exp(lp - _sg(lp))
    per_token = POLICY_OBJECTIVES[objective](
        ObjectiveInputs(
            ratio,
            log_ratio,
            lp,
            adv,
            clip_eps_low,
            clip_eps_high,
            dual_clip_c,
            cispo_eps_low,
            cispo_eps_high,
        )
    )
    if correction != "none":
        cor, cor_metrics = mismatch_correction(old, sampler_logp, mask, correction, correction_cap)
        per_token = cor.weight.astype(dtype) * per_token
    else:
        cor_metrics = dict.fromkeys(("mismatch_token_frac", "mismatch_seq_frac"), jnp.zeros(()))
    if ref_logp is not None:
        ref = jnp.where(on, _sg(ref_logp).astype(dtype), 0)
        kl = KL_ESTIMATORS[kl_estimator](lp - ref)
        per_token = per_token + kl_coef * kl
    else:
        kl = jnp.zeros_like(lp)

    seq_sum_N = jnp.sum(m * per_token, -1)
    if aggregation == "seq-mean-token-mean":
        numerator = jnp.sum(safe_div(seq_sum_N, tokens_N))
    else:
        numerator = jnp.sum(seq_sum_N)
    if normalizer is None:
        normalizer = loss_normalizer(mask, aggregation, max_len)
    loss = safe_div(numerator, jnp.asarray(normalizer, dtype))

    total = jnp.sum(tokens_N)
    ratio_v = _sg(ratio)
    metrics = {
        "clip_frac_low": (adv < 0) & (ratio_v < 1 - clip_eps_low),
        "clip_frac_high": (adv > 0) & (ratio_v > 1 + clip_eps_high),
        "ratio_mean": ratio_v,
        "kl_ref": _sg(kl),
        "approx_kl_old": _sg(_k3(old - lp)),
    }
    metrics = {k: safe_div(jnp.sum(m * v.astype(dtype)), total) for k, v in metrics.items()}
    metrics.update({k: _sg(v).astype(dtype) for k, v in cor_metrics.items()})
    metrics["tokens"] = _sg(total)
    metrics["sequences"] = jnp.sum(tokens_N > 0).astype(dtype)
    return loss, metrics


def merge_metrics(
    metrics: Mapping[str, ArrayLike] | Sequence[Mapping[str, ArrayLike]],
) -> dict[str, Array]:
    """Combine `policy_loss` metrics of several microbatches into whole-batch metrics.

    Args:
      metrics: a list of metrics dicts, or one dict whose values have a leading microbatch axis
        (what `jax.lax.scan` over microbatches returns).

    Returns:
      One metrics dict: each mean weighted by its microbatch's ``tokens`` (those in
      `SEQUENCE_METRICS` by ``sequences``), and ``tokens`` and ``sequences`` summed.
    """
    if not isinstance(metrics, Mapping):
        metrics = jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)
    if "tokens" not in metrics:
        raise ValueError(f"metrics need a 'tokens' entry to weight by; got keys {list(metrics)}")
    weights = {"tokens": jnp.asarray(metrics["tokens"])}
    if "sequences" in metrics:
        weights["sequences"] = jnp.asarray(metrics["sequences"])
    out = {}
    for k, v in metrics.items():
        w = weights["sequences" if k in SEQUENCE_METRICS and "sequences" in weights else "tokens"]
        out[k] = safe_div(jnp.sum(w * jnp.asarray(v)), jnp.sum(w))
    out.update({k: jnp.sum(w) for k, w in weights.items()})
    return out
