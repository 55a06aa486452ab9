"""GRPO-family losses as pure functions: group advantages, KL estimators, the clipped surrogate.

Axis letters: N sequences in a batch, grouped contiguously in groups of G samples of the same
prompt (P = N / G prompts); T completion positions; V vocabulary; D model width. ``mask_NT`` is 1
on completion tokens and 0 on prompt/padding positions.

One RL step uses this module as::

    adv_N = compute_advantages(rewards_N, group_size, estimator="grpo", valid=valid_N)
    norm = loss_normalizer(mask_NT, aggregation, max_len)        # once, for the whole batch
    for each microbatch b:                                       # or the whole batch at once
        logp = token_logprobs(logits_NTV, tokens_NT, chunk_size=512)
        loss_b, metrics_b = policy_loss(logp, old_logp, adv, mask, ..., normalizer=norm)
    # Σ_b loss_b and Σ_b ∇loss_b equal the whole-batch loss and gradient exactly;
    # merge_metrics(stacked metrics_b) equals the whole-batch metrics.

Papers cited below:
  [GRPO]  Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
          Language Models", arXiv:2402.03300.
  [DrGRPO] Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective",
          arXiv:2503.20783.
  [DAPO]  Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
          arXiv:2503.14476.
  [GSPO]  Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv:2507.18071.
  [RLOO]  Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
          Learning from Human Feedback in LLMs", arXiv:2402.14740 (after Kool et al. 2019).
  [PPO]   Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347.
  [KL]    Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.
  [Gemma2] Gemma Team 2024, "Gemma 2: Improving Open Language Models at a Practical Size",
          arXiv:2408.00118.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

_sg = jax.lax.stop_gradient


# ---------------------------------------------------------------------------------------------
# Small utilities


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(map(repr, choices))}")


def _safe_div(num: Array, den: Array) -> Array:
    """num / den, and 0 where den == 0 (a sequence or batch with no tokens).

    The inner `where` keeps the unused branch finite, so gradients stay NaN-free too.
    """
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def _concrete_float(x: Any) -> float | None:
    """The Python value of x if it is known at trace time, else None (x is a tracer)."""
    try:
        return float(x)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _positive_int(what: str, x: Any) -> int:
    """x as a Python int (numpy integers welcome), or a ValueError saying what is wrong."""
    try:
        if isinstance(x, bool):
            raise TypeError
        value = operator.index(x)
    except TypeError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"{what} must be a positive int, got {x!r}")
    return value


def _float_dtype(*xs: ArrayLike) -> jnp.dtype:
    # At least float32: bf16 log-probs make exp(logp - old_logp) too coarse to clip at 1 ± 0.2.
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


# ---------------------------------------------------------------------------------------------
# Advantages


def _grpo_advantage(r_PG: Array, w_PG: Array, n_P1: Array, eps: float) -> Array:
    mean = _safe_div(jnp.sum(w_PG * r_PG, -1, keepdims=True), n_P1)
    dev = r_PG - mean
    var = _safe_div(jnp.sum(w_PG * dev**2, -1, keepdims=True), n_P1)  # population, ddof=0
    # sqrt has an infinite derivative at 0; keep it away so gradients w.r.t. rewards stay finite.
    std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1)), 0)
    return dev / (std + eps)


def _dr_grpo_advantage(r_PG: Array, w_PG: Array, n_P1: Array, eps: float) -> Array:
    del eps
    return r_PG - _safe_div(jnp.sum(w_PG * r_PG, -1, keepdims=True), n_P1)


def _rloo_advantage(r_PG: Array, w_PG: Array, n_P1: Array, eps: float) -> Array:
    del eps
    others_sum = jnp.sum(w_PG * r_PG, -1, keepdims=True) - r_PG
    # A reward with no valid peer has no baseline; the caller zeroes it (n == 1 ⇒ all equal).
    return r_PG - _safe_div(others_sum, n_P1 - 1)


ADVANTAGE_ESTIMATORS: dict[str, Callable[[Array, Array, Array, float], Array]] = {
    "grpo": _grpo_advantage,
    "dr_grpo": _dr_grpo_advantage,
    "rloo": _rloo_advantage,
}
"""Advantage estimators by name: fn(rewards_PG, valid_PG as 0/1, n_valid_P1, eps) -> adv_PG."""


def compute_advantages(
    rewards: ArrayLike,
    group_size: int,
    estimator: str = "grpo",
    eps: float = 1e-6,
    valid: ArrayLike | None = None,
) -> Array:
    """Outcome advantages relative to each prompt's group of G samples.

    ``rewards`` is [N] with N = P·G and the G samples of a prompt contiguous. With mean_g and
    std_g the mean and population standard deviation (ddof=0) of the group's valid rewards:

    - ``"grpo"`` [GRPO, outcome supervision]: A_i = (r_i − mean_g) / (std_g + eps).
    - ``"dr_grpo"`` [DrGRPO]: A_i = r_i − mean_g. Dropping the std removes the question-difficulty
      bias (groups with nearly equal rewards are no longer up-weighted).
    - ``"rloo"`` [RLOO]: A_i = r_i − (1/(G−1)) Σ_{j≠i} r_j, the leave-one-out baseline, which is
      independent of r_i and hence unbiased; equals G/(G−1)·(r_i − mean_g).

    ``valid`` [N] (bool) marks rewards that exist (e.g. the verifier did not time out). Invalid
    rewards are left out of their group's statistics (G becomes the group's valid count) and get
    advantage 0. A group whose valid rewards are all equal (including a single valid reward, or
    none) gets exactly 0: r − mean alone can leave a rounding residue (the float32 mean of three
    0.1s is off by 7e-9), which grpo's division by std + eps would turn into a spurious signal.

    Returns:
      advantages [N], float (at least float32).
    """
    _check_choice("advantage estimator", estimator, tuple(ADVANTAGE_ESTIMATORS))
    r = jnp.asarray(rewards)
    if r.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {r.shape}")
    group_size = _positive_int("group_size", group_size)
    n = r.shape[0]
    if n % group_size:
        raise ValueError(
            f"rewards length {n} is not divisible by group_size {group_size}; the batch must "
            "hold whole groups of G samples per prompt, contiguous"
        )
    r = r.astype(_float_dtype(r))
    if valid is None:
        ok = jnp.ones(r.shape, bool)
    else:
        ok = jnp.asarray(valid)
        if ok.shape != r.shape:
            raise ValueError(f"valid must have the shape of rewards {r.shape}, got {ok.shape}")
        ok = ok.astype(bool)

    r_PG = r.reshape(-1, group_size)
    ok_PG = ok.reshape(-1, group_size)
    # Invalid entries may hold NaN or garbage; replace them before any arithmetic.
    r_PG = jnp.where(ok_PG, r_PG, 0)
    w_PG = ok_PG.astype(r.dtype)
    n_P1 = jnp.sum(w_PG, -1, keepdims=True)
    adv_PG = ADVANTAGE_ESTIMATORS[estimator](r_PG, w_PG, n_P1, eps)

    hi = jnp.max(jnp.where(ok_PG, r_PG, -jnp.inf), -1, keepdims=True)
    lo = jnp.min(jnp.where(ok_PG, r_PG, jnp.inf), -1, keepdims=True)
    all_equal_P1 = hi <= lo  # also true for an empty group (-inf <= inf)
    adv_PG = jnp.where(ok_PG & ~all_equal_P1, adv_PG, 0)
    return adv_PG.reshape(n)


# ---------------------------------------------------------------------------------------------
# KL estimators


def _k1(x: Array) -> Array:
    return x


def _k2(x: Array) -> Array:
    return 0.5 * x**2


def _k3(x: Array) -> Array:
    # expm1 keeps precision near x = 0, where the estimator is O(x²) and the terms cancel.
    return jnp.expm1(-x) + x


KL_ESTIMATORS: dict[str, Callable[[Array], Array]] = {"k1": _k1, "k2": _k2, "k3": _k3}
"""KL estimators by name, as functions of x = logp − ref_logp (see `kl_penalty`)."""


def kl_penalty(logp: ArrayLike, ref_logp: ArrayLike, estimator: str = "k3") -> Array:
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π [KL].

    With x = logp − ref_logp (any matching shapes, e.g. [N, T]):

    - ``"k1"``: x. Unbiased, high variance, can be negative.
    - ``"k2"``: x²/2. Biased, low variance, ≥ 0; its gradient is that of the reverse KL.
    - ``"k3"``: exp(−x) + x − 1. Unbiased, ≥ 0; the estimator used by [GRPO] (eq. 4). Note that
      exp(−x) overflows float32 for x < −88, i.e. where π_ref is ~e^88 times likelier than π.

    Gradients flow to both arguments; `policy_loss` stops the one through ``ref_logp``.
    """
    _check_choice("KL estimator", estimator, tuple(KL_ESTIMATORS))
    logp = jnp.asarray(logp)
    ref_logp = jnp.asarray(ref_logp)
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp shape {logp.shape} != ref_logp shape {ref_logp.shape}")
    dtype = _float_dtype(logp, ref_logp)
    return KL_ESTIMATORS[estimator](logp.astype(dtype) - ref_logp.astype(dtype))


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
    "tokens",
)
"""Keys of the metrics dict returned by `policy_loss` (always all present)."""


def loss_normalizer(mask_NT: ArrayLike, aggregation: str, max_len: int | None = None) -> Array:
    """The denominator of `policy_loss` for this batch, as a float32 scalar.

    Compute it once on the whole batch and pass it as ``policy_loss(..., normalizer=...)`` to each
    microbatch; the microbatch losses and gradients then sum to the whole-batch ones exactly.

    - ``"token-mean"``: Σ_{i,t} m_it, the number of completion tokens.
    - ``"seq-mean-token-mean"``, ``"seq-mean-token-sum"``: N, the number of sequences.
    - ``"seq-mean-token-sum-norm"``: N·max_len.
    """
    _check_choice("aggregation", aggregation, AGGREGATIONS)
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
    _positive_int("max_len", max_len)


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
) -> tuple[Array, dict[str, Array]]:
    """Clipped surrogate policy loss with an optional KL penalty [PPO, GRPO].

    Args:
      logp: [N, T] log-probs of the sampled tokens under the policy being trained (differentiated).
      old_logp: [N, T] log-probs under the policy that sampled them (constant).
      advantages: [N] one advantage per sequence, e.g. from `compute_advantages` (constant).
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

    Per-token loss, with A_i the advantage of sequence i and ρ_it the importance ratio:

        ℓ_it = −min(ρ_it·A_i, clip(ρ_it, 1 − ε_low, 1 + ε_high)·A_i) + β·KL(logp_it, ref_logp_it)

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
        clip_frac_low   fraction with A < 0 and ρ < 1 − ε_low (clipped, no gradient)
        clip_frac_high  fraction with A > 0 and ρ > 1 + ε_high (clipped, no gradient)
        ratio_mean      mean ρ (the sequence ratio s_i on each token for ratio_level="sequence")
        kl_ref          mean KL(π ‖ π_ref) by ``kl_estimator`` (0 without ref_logp)
        approx_kl_old   mean k3 estimate of KL(π_old ‖ π) = ρ − 1 − log ρ with the token ratio
        tokens          Σ m, the weight of this call's means.
      Across microbatches, combine them weighted by ``tokens``: `merge_metrics` does this, and
      gives exactly the whole-batch metrics.
    """
    _check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    _check_choice("aggregation", aggregation, AGGREGATIONS)
    _check_choice("KL estimator", kl_estimator, tuple(KL_ESTIMATORS))
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
    if advantages.shape != (n,):
        raise ValueError(
            f"advantages must be [N] = ({n},), one per sequence, got shape {advantages.shape}"
        )
    if ref_logp is not None:
        ref_logp = jnp.asarray(ref_logp)
        if ref_logp.shape != logp.shape:
            raise ValueError(f"ref_logp shape {ref_logp.shape} != logp shape {logp.shape}")
    beta = _concrete_float(kl_coef)
    if ref_logp is None and beta != 0:
        # A traced kl_coef may be non-zero, so it needs ref_logp as well; pass 0.0 to turn KL off.
        raise ValueError(
            f"kl_coef={kl_coef!r} but ref_logp is None; pass the reference log-probs or kl_coef=0.0"
        )
    lo, hi = _concrete_float(clip_eps_low), _concrete_float(clip_eps_high)
    if lo is not None and not 0 <= lo < 1:
        raise ValueError(f"clip_eps_low must be in [0, 1), got {clip_eps_low}")
    if hi is not None and not hi >= 0:
        raise ValueError(f"clip_eps_high must be >= 0, got {clip_eps_high}")
    if normalizer is None:
        if aggregation == "seq-mean-token-sum-norm":
            _check_max_len(max_len)
    elif jnp.shape(normalizer) != ():
        raise ValueError(f"normalizer must be a scalar, got shape {jnp.shape(normalizer)}")

    dtype = _float_dtype(logp, old_logp, advantages)
    on = mask != 0
    m = mask.astype(dtype)
    # Replace masked positions before any arithmetic so NaN/inf padding reaches neither the value
    # nor (through exp, whose derivative would multiply 0 by inf) the gradient.
    lp = jnp.where(on, logp.astype(dtype), 0)
    old = jnp.where(on, _sg(old_logp).astype(dtype), 0)
    adv = _sg(advantages).astype(dtype)[:, None]
    tokens_N = jnp.sum(m, -1)

    log_ratio = lp - old
    if ratio_level == "token":
        ratio = jnp.exp(log_ratio)
    else:
        seq_ratio_N = jnp.exp(_safe_div(jnp.sum(m * log_ratio, -1), tokens_N))
        ratio = _sg(seq_ratio_N)[:, None] * jnp.exp(lp - _sg(lp))
    clipped = jnp.clip(ratio, 1 - clip_eps_low, 1 + clip_eps_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    if ref_logp is not None:
        ref = jnp.where(on, _sg(ref_logp).astype(dtype), 0)
        kl = KL_ESTIMATORS[kl_estimator](lp - ref)
        per_token = per_token + kl_coef * kl
    else:
        kl = jnp.zeros_like(lp)

    seq_sum_N = jnp.sum(m * per_token, -1)
    if aggregation == "seq-mean-token-mean":
        numerator = jnp.sum(_safe_div(seq_sum_N, tokens_N))
    else:
        numerator = jnp.sum(seq_sum_N)
    if normalizer is None:
        normalizer = loss_normalizer(mask, aggregation, max_len)
    loss = _safe_div(numerator, jnp.asarray(normalizer, dtype))

    total = jnp.sum(tokens_N)
    ratio_v = _sg(ratio)
    metrics = {
        "clip_frac_low": (adv < 0) & (ratio_v < 1 - clip_eps_low),
        "clip_frac_high": (adv > 0) & (ratio_v > 1 + clip_eps_high),
        "ratio_mean": ratio_v,
        "kl_ref": _sg(kl),
        "approx_kl_old": _sg(_k3(old - lp)),
    }
    metrics = {k: _safe_div(jnp.sum(m * v.astype(dtype)), total) for k, v in metrics.items()}
    metrics["tokens"] = _sg(total)
    return loss, metrics


def merge_metrics(
    metrics: Mapping[str, ArrayLike] | Sequence[Mapping[str, ArrayLike]],
) -> dict[str, Array]:
    """Combine `policy_loss` metrics of several microbatches into whole-batch metrics.

    Args:
      metrics: a list of metrics dicts, or one dict whose values have a leading microbatch axis
        (what `jax.lax.scan` over microbatches returns).

    Returns:
      One metrics dict: each mean weighted by its microbatch's ``tokens``, and ``tokens`` summed.
    """
    if not isinstance(metrics, Mapping):
        metrics = jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)
    if "tokens" not in metrics:
        raise ValueError(f"metrics need a 'tokens' entry to weight by; got keys {list(metrics)}")
    w = jnp.asarray(metrics["tokens"])
    total = jnp.sum(w)
    out = {k: _safe_div(jnp.sum(w * jnp.asarray(v)), total) for k, v in metrics.items()}
    out["tokens"] = total
    return out


# ---------------------------------------------------------------------------------------------
# Log-probs and entropy from logits, optionally in chunks over T


def _check_chunk_size(chunk_size: Any) -> int | None:
    return None if chunk_size is None else _positive_int("chunk_size (or None)", chunk_size)


def _check_temperature(temperature: Any) -> None:
    t = _concrete_float(temperature)
    if t is not None and not t > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _map_over_time(fn: Callable[..., Any], xs: Sequence[Array], chunk_size: int | None) -> Any:
    """fn applied to xs[:, s:s+chunk] (all xs share axes [N, T, ...]), outputs joined on axis 1.

    The chunks run sequentially (lax.map) and each one is rematerialised in the backward pass
    (jax.checkpoint), so neither pass keeps more than one chunk's intermediates alive; without the
    checkpoint the scan would save every chunk's [N, chunk, V] softmax for the backward pass,
    which is the full array again.
    """
    t = xs[0].shape[1]
    if chunk_size is None or chunk_size >= t:
        return fn(*xs)
    n_full = t // chunk_size

    @jax.checkpoint
    def one_chunk(i: Array) -> Any:
        start = i * chunk_size
        return fn(*(jax.lax.dynamic_slice_in_dim(x, start, chunk_size, axis=1) for x in xs))

    stacked = jax.lax.map(one_chunk, jnp.arange(n_full))  # leaves [n_full, N, chunk, ...]
    out = jax.tree.map(
        lambda y: jnp.moveaxis(y, 0, 1).reshape(y.shape[1], n_full * chunk_size, *y.shape[3:]),
        stacked,
    )
    if n_full * chunk_size < t:
        # A static tail instead of padding: padding would copy the whole [N, T, V] input.
        tail = fn(*(x[:, n_full * chunk_size :] for x in xs))
        out = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), out, tail)
    return out


def _logp_and_entropy(
    logits: Array, tokens: Array | None, want_entropy: bool
) -> tuple[Array | None, Array | None]:
    """Float32 log-prob of `tokens` and entropy, from logits [..., V]."""
    z = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(z, axis=-1)
    logp = None
    if tokens is not None:
        logp = jnp.take_along_axis(z, tokens[..., None], axis=-1)[..., 0] - lse
    ent = None
    if want_entropy:
        logp_all = z - lse[..., None]
        p = jnp.exp(logp_all)
        # Vocabulary entries masked to -inf/-1e30 have p = 0 and log p = -inf; 0·(-inf) is NaN.
        logp_all = jnp.where(p > 0, logp_all, 0)
        ent = -jnp.sum(p * logp_all, axis=-1)
    return logp, ent


def _temper(logits: Array, temperature: float) -> Array:
    if isinstance(temperature, int | float) and temperature == 1:
        return logits
    return logits.astype(jnp.float32) / temperature


def _check_logits_tokens(logits: Array, tokens: Array | None) -> None:
    if logits.ndim != 3:
        raise ValueError(f"logits must be 3-D [N, T, V], got shape {logits.shape}")
    if tokens is not None:
        if tokens.shape != logits.shape[:2]:
            raise ValueError(f"tokens shape {tokens.shape} != logits [N, T] {logits.shape[:2]}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")


def token_logprobs(
    logits_NTV: ArrayLike,
    tokens_NT: ArrayLike,
    chunk_size: int | None = None,
    *,
    temperature: float = 1.0,
) -> Array:
    """log softmax(logits / temperature)[tokens] in float32, [N, T].

    With ``chunk_size``, positions are processed ``chunk_size`` at a time over T, so the float32
    log-softmax is only ever [N, chunk_size, V] (forward and backward) instead of [N, T, V]; the
    result equals the unchunked one. Pass the sampling temperature so the ratio compares the
    distribution the tokens were actually drawn from. Token ids must lie in [0, V).
    """
    logits = jnp.asarray(logits_NTV)
    tokens = jnp.asarray(tokens_NT)
    _check_logits_tokens(logits, tokens)
    chunk_size = _check_chunk_size(chunk_size)
    _check_temperature(temperature)

    def fn(z: Array, tok: Array) -> Array:
        return _logp_and_entropy(_temper(z, temperature), tok, False)[0]

    return _map_over_time(fn, (logits, tokens), chunk_size)


def entropy(
    logits_NTV: ArrayLike, chunk_size: int | None = None, *, temperature: float = 1.0
) -> Array:
    """Entropy −Σ_v p_v log p_v of softmax(logits / temperature) in float32, [N, T].

    ``chunk_size`` bounds memory as in `token_logprobs`.
    """
    logits = jnp.asarray(logits_NTV)
    _check_logits_tokens(logits, None)
    chunk_size = _check_chunk_size(chunk_size)
    _check_temperature(temperature)

    def fn(z: Array) -> Array:
        return _logp_and_entropy(_temper(z, temperature), None, True)[1]

    return _map_over_time(fn, (logits,), chunk_size)


# Largest float32 logits that token_logprobs_from_hidden forms at once when no chunk is given.
AUTO_CHUNK_BYTES = 256 * 2**20


def auto_chunk_size(n: int, t: int, v: int, budget_bytes: int = AUTO_CHUNK_BYTES) -> int | None:
    """Positions per chunk so that [n, chunk, v] float32 logits fit `budget_bytes` (None: all
    [n, t, v] fit, no chunking)."""
    per_position = 4 * n * v
    if per_position * t <= budget_bytes:
        return None
    return max(1, budget_bytes // per_position)


def token_logprobs_from_hidden(
    hidden_NTD: ArrayLike,
    tokens_NT: ArrayLike,
    *,
    unembed_DV: ArrayLike | None = None,
    embed_VD: ArrayLike | None = None,
    chunk_size: int | None = None,
    final_logit_softcap: float | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> Array | tuple[Array, Array]:
    """Token log-probs (and entropy) from final hidden states, never forming all [N, T, V] logits.

    logits = hidden · W, with W given as ``unembed_DV`` [D, V] or, for tied embeddings, as the
    input embedding ``embed_VD`` [V, D] (exactly one of the two). The product accumulates in
    float32. With ``final_logit_softcap`` c the logits become c·tanh(logits / c) [Gemma2]; then
    they are divided by ``temperature``. With ``chunk_size`` only [N, chunk_size, V] logits exist
    at a time, in the forward and the backward pass (the gradient w.r.t. W is accumulated over
    chunks). ``chunk_size=None`` chunks only when the whole [N, T, V] float32 logits would exceed
    `AUTO_CHUNK_BYTES` (then in the largest chunks that fit it): a big vocabulary is never
    materialised whole, and small ones keep the faster single pass (chunks are recomputed in the
    backward pass).

    Returns:
      logp [N, T] float32, or (logp [N, T], entropy [N, T]) with ``return_entropy=True``.
    """
    hidden = jnp.asarray(hidden_NTD)
    tokens = jnp.asarray(tokens_NT)
    if (unembed_DV is None) == (embed_VD is None):
        raise ValueError("pass exactly one of unembed_DV [D, V] or embed_VD [V, D]")
    if hidden.ndim != 3:
        raise ValueError(f"hidden must be 3-D [N, T, D], got shape {hidden.shape}")
    if tokens.shape != hidden.shape[:2]:
        raise ValueError(f"tokens shape {tokens.shape} != hidden [N, T] {hidden.shape[:2]}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if unembed_DV is not None:
        w = jnp.asarray(unembed_DV)
        spec, d = "ntd,dv->ntv", w.shape[0] if w.ndim == 2 else None
    else:
        w = jnp.asarray(embed_VD)
        spec, d = "ntd,vd->ntv", w.shape[1] if w.ndim == 2 else None
    if d != hidden.shape[-1]:
        raise ValueError(
            f"unembedding shape {w.shape} does not match hidden width D={hidden.shape[-1]} "
            "(unembed_DV is [D, V], embed_VD is [V, D])"
        )
    vocab = w.shape[1] if spec == "ntd,dv->ntv" else w.shape[0]
    if spec == "ntd,dv->ntv" and jax.default_backend() == "cpu":
        # XLA:CPU's matmuls run this product and its two backward products ~25% faster with
        # the vocabulary-major [V, D] operand (benchmarks/train_step.py); XLA folds a plain
        # transpose into the dot and keeps the slow layout, so the barrier makes it a copy.
        w, spec = jax.lax.optimization_barrier(w.T), "ntd,vd->ntv"
    chunk_size = _check_chunk_size(chunk_size)
    if chunk_size is None:
        chunk_size = auto_chunk_size(*hidden.shape[:2], vocab)
    _check_temperature(temperature)
    if final_logit_softcap is not None and _concrete_float(final_logit_softcap) == 0:
        raise ValueError("final_logit_softcap must be a non-zero cap or None, got 0")

    def fn(h: Array, tok: Array) -> tuple[Array, Array | None]:
        z = jnp.einsum(spec, h, w, preferred_element_type=jnp.float32)
        if final_logit_softcap is not None:
            z = final_logit_softcap * jnp.tanh(z / final_logit_softcap)
        return _logp_and_entropy(_temper(z, temperature), tok, return_entropy)

    logp, ent = _map_over_time(fn, (hidden, tokens), chunk_size)
    return (logp, ent) if return_entropy else logp
