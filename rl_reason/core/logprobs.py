"""Token log-probs and entropy from logits or from final hidden states, optionally in chunks
over T so that the float32 [N, T, V] array never exists at once."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from rl_reason.core.checks import Array, ArrayLike, concrete_float, positive_int


def _check_chunk_size(chunk_size: Any) -> int | None:
    return None if chunk_size is None else positive_int("chunk_size (or None)", chunk_size)


def _check_temperature(temperature: Any) -> None:
    t = concrete_float(temperature)
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
    if final_logit_softcap is not None and concrete_float(final_logit_softcap) == 0:
        raise ValueError("final_logit_softcap must be a non-zero cap or None, got 0")

    def fn(h: Array, tok: Array) -> tuple[Array, Array | None]:
        z = jnp.einsum(spec, h, w, preferred_element_type=jnp.float32)
        if final_logit_softcap is not None:
            z = final_logit_softcap * jnp.tanh(z / final_logit_softcap)
        return _logp_and_entropy(_temper(z, temperature), tok, return_entropy)

    logp, ent = _map_over_time(fn, (hidden, tokens), chunk_size)
    return (logp, ent) if return_entropy else logp
