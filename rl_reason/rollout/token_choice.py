"""How each token is chosen: the sampling options, temperature / top-k / top-p, and the draw.

Tokens are drawn by inverting the CDF at one uniform number per sample and position
(`inverse_cdf`), not by Gumbel-max over the whole vocabulary, whose B x V random numbers cost
more than the rest of the token choice on a CPU. The number of token t of sample i comes from a
key folded from i and t (`sample_keys`, `token_uniforms`), so the static sampler and the
continuous-batching engine, which decodes samples in any slot and order, draw the same tokens.
Shared by rl_reason/rollout/sampling.py and engine.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick each token. temperature 0 is greedy; top_k 0 and top_p 1 are off.

    `vocab_size`: ids at or past it are never sampled (embedding rows padded beyond the
    tokenizer's vocabulary); None allows every row.

    `logit_bias`: (token id, bias) pairs added to those tokens' logits before temperature and
    truncation: they change the sampling distribution (and its log-probs), not the policy
    log-prob. Benchmarks use a stop-token bias for controlled, geometric completion lengths.

    `max_decode_segments`: decoding runs in up to this many segments of growing KV-cache length
    (`decode_segments`), so that early tokens do not attend over the whole budget; 1 compiles
    the decode step once.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    vocab_size: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    max_decode_segments: int = 4

    def __post_init__(self) -> None:
        if self.max_decode_segments < 1:
            raise ValueError(f"max_decode_segments must be >= 1, got {self.max_decode_segments}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        bias = tuple((int(t), float(b)) for t, b in self.logit_bias)
        if any(t < 0 for t, _ in bias):
            raise ValueError(f"logit_bias token ids must be >= 0, got {self.logit_bias}")
        object.__setattr__(self, "logit_bias", bias)


def filter_logits(logits_BV: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus) on float32 logits; removed entries -inf.

    Top-p keeps the smallest set of most likely tokens whose probability reaches top_p: a token
    stays if the mass of the tokens ranked above it is below top_p. Entries tied with the
    nucleus' least likely token are kept too.
    """
    x = logits_BV.astype(jnp.float32) / cfg.temperature
    if cfg.top_k > 0:
        kth = jax.lax.top_k(x, cfg.top_k)[0][:, -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if cfg.top_p < 1.0:
        sorted_x = jnp.sort(x, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_x, axis=-1)
        mass_above = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_above < cfg.top_p
        threshold = jnp.min(jnp.where(keep, sorted_x, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < threshold, -jnp.inf, x)
    return x


def _argmax_first(x_BV: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (first index of the max; a NaN counts as the max).

    XLA:CPU lowers argmax to a slow variadic (value, index) reduction: at 32 x 32000 it cost
    ~8 ms of a ~26 ms llama-20m decode step. Two plain reductions give the same index ~3x
    faster (see benchmarks/sampling.py --profile).
    """
    top = jnp.max(x_BV, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x_BV.shape, x_BV.ndim - 1)
    hit = (x_BV == top) | jnp.isnan(x_BV)
    return jnp.min(jnp.where(hit, iota, x_BV.shape[-1]), axis=-1)


# Vocabulary block of the two-level inverse-CDF search in `_categorical`.
_CDF_BLOCK = 128


def _first_reaching(cum_BN: jax.Array, weight_BN: jax.Array, target_B: jax.Array) -> jax.Array:
    """Per row, the first index whose running sum reaches the target and whose weight is > 0;
    the last index of positive weight when rounding left the target just above the total."""
    iota = jax.lax.broadcasted_iota(jnp.int32, cum_BN.shape, 1)
    n = cum_BN.shape[-1]
    hit = (cum_BN >= target_B[:, None]) & (weight_BN > 0)
    first = jnp.min(jnp.where(hit, iota, n), axis=-1)
    last = jnp.max(jnp.where(weight_BN > 0, iota, -1), axis=-1)
    return jnp.where(first == n, last, first)


def sample_keys(key: jax.Array, sample_ids_B: jax.Array) -> jax.Array:
    """One key per sample, folded from its id, so that a sample's draws do not depend on the
    row or slot it occupies, its neighbours, or the order in which samples are decoded (the
    continuous-batching engine relies on this to give the static sampler's tokens)."""
    return jax.vmap(jax.random.fold_in, (None, 0))(key, sample_ids_B)


def token_uniforms(keys_B: jax.Array, t_B: jax.Array) -> jax.Array:
    """The uniform number that picks token t_B[i] of sample i (`inverse_cdf`): one per sample
    and position. Gumbel-max would need B * V random numbers per step: at 32 x 32000 its
    threefry bits and logs cost ~5 ms of a llama-20m decode step on the CPU, more than the rest
    of the token choice. Inversion needs B."""
    draw = lambda k, t: jax.random.uniform(jax.random.fold_in(k, t), (), jnp.float32)
    return jax.vmap(draw)(keys_B, t_B)


def inverse_cdf(logits_BV: jax.Array, u_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The token whose CDF interval holds u (in [0, 1)) under softmax(logits), per row, and its
    log-prob.

    The CDF is searched in two levels, sums of 128-entry blocks and then within the chosen
    block, because a [B, V] cumsum is slow on the CPU. Entries of zero probability are skipped
    explicitly, so float rounding of the running sums cannot land on one.
    """
    b, v = logits_BV.shape
    blocks = -(-v // _CDF_BLOCK)
    top_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
    e_BV = jnp.exp(logits_BV - top_B1)
    if blocks * _CDF_BLOCK != v:
        e_BV = jnp.pad(e_BV, ((0, 0), (0, blocks * _CDF_BLOCK - v)))
    e_BNC = e_BV.reshape(b, blocks, _CDF_BLOCK)
    block_sum_BN = jnp.sum(e_BNC, axis=-1)
    block_cum_BN = jnp.cumsum(block_sum_BN, axis=-1)
    total_B = block_cum_BN[:, -1]
    # 1 - u lies in (0, 1]: a zero target would match a leading zero-probability entry.
    target_B = (1.0 - u_B) * total_B
    block_B = _first_reaching(block_cum_BN, block_sum_BN, target_B)
    before_B = jnp.where(
        block_B > 0,
        jnp.take_along_axis(block_cum_BN, jnp.maximum(block_B - 1, 0)[:, None], axis=-1)[:, 0],
        0.0,
    )
    inner_BC = jnp.take_along_axis(e_BNC, block_B[:, None, None], axis=1)[:, 0]
    inner_cum_BC = before_B[:, None] + jnp.cumsum(inner_BC, axis=-1)
    token_B = block_B * _CDF_BLOCK + _first_reaching(inner_cum_BC, inner_BC, target_B)
    picked_B = jnp.take_along_axis(logits_BV, token_B[:, None], axis=-1)[:, 0]
    return token_B.astype(jnp.int32), picked_B - top_B1[:, 0] - jnp.log(total_B)


def _token_logprob(logits_BV: jax.Array, token_B: jax.Array) -> jax.Array:
    """log softmax(logits)[token] per row, without forming the [B, V] log-probs."""
    picked = jnp.take_along_axis(logits_BV, token_B[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits_BV, axis=-1)


def _choose(logits_BV: jax.Array, u_B: jax.Array | None, cfg: SamplingConfig):
    """(token [B], sampling log-prob [B], policy log-prob [B]) from the rows' uniform numbers
    (`token_uniforms`; unused, and may be None, when greedy)."""
    logits_BV = logits_BV.astype(jnp.float32)
    # The policy log-prob is over every embedding row, as the trainer's forward pass sees it.
    raw_BV = logits_BV
    masks_vocab = cfg.vocab_size is not None and cfg.vocab_size < logits_BV.shape[-1]
    if masks_vocab:
        logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < cfg.vocab_size, logits_BV, -jnp.inf)
    if cfg.logit_bias:
        ids, bias = zip(*cfg.logit_bias, strict=True)
        logits_BV = logits_BV.at[:, jnp.asarray(ids)].add(jnp.asarray(bias, jnp.float32))
    if cfg.temperature == 0.0:
        token = _argmax_first(logits_BV).astype(jnp.int32)
        return token, jnp.zeros(token.shape, jnp.float32), _token_logprob(raw_BV, token)
    filters = cfg.temperature != 1.0 or cfg.top_k > 0 or cfg.top_p < 1.0 or bool(cfg.logit_bias)
    token, sample_lp = inverse_cdf(filter_logits(logits_BV, cfg) if filters else logits_BV, u_B)
    if not filters and not masks_vocab:
        return token, sample_lp, sample_lp  # the sampling distribution is the policy
    return token, sample_lp, _token_logprob(raw_BV, token)


def choose_tokens(logits_BV, keys_B, t_B, cfg: SamplingConfig):
    """Token t_B[i] of each sample i from its logits and key: (token, sampling log-prob,
    policy log-prob), each [B]."""
    u_B = token_uniforms(keys_B, t_B) if cfg.temperature > 0 else None
    return _choose(logits_BV, u_B, cfg)
