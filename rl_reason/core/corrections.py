"""Registered sampler–trainer mismatch corrections.

The sampler and the trainer score the same tokens under the same weights, one by decoding with
a KV cache and one by a full forward pass; in bfloat16, or with a different inference stack,
the two differ. With u_it = old_logp_it − sampler_logp_it, the log of the importance weight
π_trainer / π_sampler of token t of sequence i, a correction gives every token a constant
weight w_it that multiplies the policy objective's per-token loss (`policy_loss`), so it
composes with every registered objective. Both log-probs are of the plain policy (temperature 1,
untruncated): the sampler's `policy_logprobs` and the trainer's rescoring
(`loss.recompute_old_logprobs`), so neither temperature nor top-k / top-p truncation enters the
weight, only the numerical gap.

A correction is fn(u_NT, m_NT, cap) -> `Correction`, with u_NT 0 where m_NT is 0 and cap C > 1.
Papers: [TIS] Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
Training" (fengyao.notion.site/off-policy-rl); [MIS] Liu, Li et al. 2025, "When Speed Kills
Stability: Demystifying RL Collapse from the Training-Inference Mismatch"
(yingru.notion.site/When-Speed-Kills-Stability); the geometric-mean mask as in verl's
rollout correction ("geometric" rejection sampling).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rl_reason.core.checks import Array, concrete_float, safe_div
from rl_reason.core.registry import Registry


class Correction(NamedTuple):
    """weight [N, T] or [N, 1] (constant); touched_tokens [N, T] and touched_sequences [N],
    bool: what the correction changed (weight truncated, token or sequence rejected)."""

    weight: Array
    touched_tokens: Array
    touched_sequences: Array


CORRECTIONS = Registry("mismatch correction")
"""Mismatch corrections by name: fn(u_NT, m_NT, cap) -> Correction (see the module docstring)."""

register_correction = CORRECTIONS.register


def _per_sequence(weight_N: Array, touched_N: Array, m: Array) -> Correction:
    return Correction(weight_N[:, None], touched_N[:, None] & (m > 0), touched_N)


def _per_token(weight: Array, touched: Array, m: Array) -> Correction:
    touched = touched & (m > 0)
    return Correction(weight, touched, jnp.any(touched, -1))


@register_correction("none")
def _none(u: Array, m: Array, cap: float) -> Correction:
    del cap
    off = jnp.zeros(u.shape, bool)
    return Correction(jnp.ones_like(u), off, off[:, 0])


@register_correction("tis_token")
def _tis_token(u: Array, m: Array, cap: float) -> Correction:
    """w_it = min(exp(u_it), C) [TIS]."""
    log_cap = math.log(cap)
    return _per_token(jnp.exp(jnp.minimum(u, log_cap)), u > log_cap, m)


@register_correction("tis_sequence")
def _tis_sequence(u: Array, m: Array, cap: float) -> Correction:
    """w_i = min(Π_t exp(u_it), C) on every token of sequence i [MIS, sequence-level TIS]."""
    log_cap = math.log(cap)
    s_N = jnp.sum(m * u, -1)  # in log space: the product of ratios overflows float32
    return _per_sequence(jnp.exp(jnp.minimum(s_N, log_cap)), s_N > log_cap, m)


@register_correction("mask_token")
def _mask_token(u: Array, m: Array, cap: float) -> Correction:
    """w_it = 1[1/C ≤ exp(u_it) ≤ C]: tokens outside the band are rejected [MIS, token]."""
    out = jnp.abs(u) > math.log(cap)
    return _per_token(jnp.where(out, 0.0, 1.0).astype(u.dtype), out, m)


@register_correction("mask_sequence")
def _mask_sequence(u: Array, m: Array, cap: float) -> Correction:
    """w_i = 1[1/C ≤ Π_t exp(u_it) ≤ C]: whole sequences are rejected [MIS, sequence]."""
    out = jnp.abs(jnp.sum(m * u, -1)) > math.log(cap)
    return _per_sequence(jnp.where(out, 0.0, 1.0).astype(u.dtype), out, m)


@register_correction("geo_mask")
def _geo_mask(u: Array, m: Array, cap: float) -> Correction:
    """w_i = 1[1/C ≤ exp(Σ_t m u / Σ_t m) ≤ C]: the geometric-mean ratio decides; it does not
    grow with length as the product does, so C can be tight (1.001 rejects a mean gap of 1e-3)."""
    out = jnp.abs(safe_div(jnp.sum(m * u, -1), jnp.sum(m, -1))) > math.log(cap)
    return _per_sequence(jnp.where(out, 0.0, 1.0).astype(u.dtype), out, m)


def mismatch_correction(
    old_logp: Array, sampler_logp: Array, mask: Array, kind: str = "none", cap: float = 2.0
) -> tuple[Correction, dict[str, Array]]:
    """The correction `kind` of [N, T] log-probs, and its metrics (means over this call):

      mismatch_token_frac  fraction of mask tokens it touched (weight truncated or rejected)
      mismatch_seq_frac    fraction of sequences (with a mask token) it touched

    ``cap`` C > 1: TIS truncates weights at C; the masks reject ratios outside [1/C, C].
    Gradients never flow through the weights.
    """
    CORRECTIONS.check(kind)
    c = concrete_float(cap)
    if c is None or not c > 1:
        raise ValueError(
            f"the correction cap C must be a static number > 1 (the band is [1/C, C]), got {cap}"
        )
    on = mask != 0
    m = mask.astype(jnp.float32)
    u = jax.lax.stop_gradient(jnp.where(on, old_logp - sampler_logp, 0).astype(jnp.float32))
    cor = CORRECTIONS[kind](u, m, cap)
    weight = jax.lax.stop_gradient(cor.weight)
    has_tokens = jnp.any(on, -1)
    metrics = {
        "mismatch_token_frac": safe_div(jnp.sum(m * cor.touched_tokens), jnp.sum(m)),
        "mismatch_seq_frac": safe_div(
            jnp.sum(cor.touched_sequences & has_tokens), jnp.sum(has_tokens)
        ),
    }
    return cor._replace(weight=weight), metrics
