"""KV cache for GRPO-style decoding: a prompt part shared by a group, a per-sample part.

GRPO samples G completions of each of P prompts. The prompt is prefilled once; its keys and
values are stored once per prompt (`prefix`, [P, K, Sp, H] per layer) and attended to by all G
rows of its group, so decoding reads the prompt cache once per group instead of G times. New
tokens go into the per-sample part (`layers`, [B = P*G, K, S, H] per layer), all rows writing the
same slot `index` at each step (prompts are left-padded, so every row advances in lockstep).

The layout is head-major: for each (row, kv-head) the slots of one head are contiguous, which is
the operand layout of the batched q.k and p.v matmuls of decode attention. The slot-major
[B, S, K, H] layout made XLA transpose the whole cache on every step (benchmarks/sampling.py
--profile measured ~7 ms of a ~30 ms llama-20m step); writing one token's [B, K, 1, H] slice is
a strided copy of B*K*H values instead.

The per-sample part may hold fewer slots than the completion budget: the sampler decodes in
segments of growing length (`grow` between them), so attention reads only the slots that can be
live in the current segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

# Logical axis names of every cache array (models/partitioning.py maps them onto a mesh).
KV_AXES = ("batch", "kv_heads", "cache_seq", "head_dim")
SEQ_AXIS = KV_AXES.index("cache_seq")


@struct.dataclass
class LayerKV:
    k: jax.Array  # [rows, K, slots, H]
    v: jax.Array


@struct.dataclass
class KVCache:
    prefix: tuple[LayerKV, ...]  # per layer, [P, K, Sp, H]
    prefix_mask: jax.Array  # [P, Sp] bool: real prompt tokens
    prefix_positions: jax.Array  # [P, Sp] int32: RoPE positions of the prompt tokens
    layers: tuple[LayerKV, ...]  # per layer, [B, K, S, H]
    # int32: suffix slots written so far, a scalar when every row advances in lockstep, or [B]
    # per row (the continuous-batching engine's slots hold samples at different lengths).
    index: jax.Array

    @property
    def group_size(self) -> int:
        return self.layers[0].k.shape[0] // self.prefix_mask.shape[0]

    @property
    def slots(self) -> int:
        """Per-sample slots held now (S)."""
        return self.layers[0].k.shape[SEQ_AXIS]

    @property
    def max_new_tokens(self) -> int:
        return self.slots


def heads_first(kv: LayerKV) -> LayerKV:
    """[B, T, K, H] keys/values (a full forward's) in the cache layout [B, K, T, H]."""
    return LayerKV(jnp.swapaxes(kv.k, 1, 2), jnp.swapaxes(kv.v, 1, 2))


def from_prefill(
    prefix_kvs: tuple[LayerKV, ...],
    prompt_mask_PT: jax.Array,
    prompt_positions_PT: jax.Array,
    group_size: int,
    max_new_tokens: int,
) -> KVCache:
    """A cache holding the prefilled prompts and `max_new_tokens` per-sample slots.

    `prefix_kvs` are the per-layer keys/values of `Transformer(..., return_kv=True)`,
    [P, Tp, K, H]; they are stored head-major.
    """
    if max_new_tokens < 1:
        raise ValueError(f"a cache needs >= 1 per-sample slot, got {max_new_tokens}")
    p = prompt_mask_PT.shape[0]
    prefix = tuple(heads_first(kv) for kv in prefix_kvs)

    def empty(kv: LayerKV) -> LayerKV:
        _, k, _, h = kv.k.shape
        shape = (p * group_size, k, max_new_tokens, h)
        return LayerKV(jnp.zeros(shape, kv.k.dtype), jnp.zeros(shape, kv.v.dtype))

    return KVCache(
        prefix=prefix,
        prefix_mask=prompt_mask_PT.astype(bool),
        prefix_positions=prompt_positions_PT.astype(jnp.int32),
        layers=tuple(empty(kv) for kv in prefix),
        index=jnp.zeros((), jnp.int32),
    )


def grow(cache: KVCache, slots: int) -> KVCache:
    """The cache with room for `slots` per-sample slots (new ones zero, written ones kept)."""
    have = cache.slots
    if slots < have:
        raise ValueError(f"grow: cannot shrink a cache of {have} slots to {slots}")
    if slots == have:
        return cache
    pad = [(0, 0)] * 4
    pad[SEQ_AXIS] = (0, slots - have)
    layers = tuple(LayerKV(jnp.pad(kv.k, pad), jnp.pad(kv.v, pad)) for kv in cache.layers)
    return cache.replace(layers=layers)


def write(kv: LayerKV, k_B1KH: jax.Array, v_B1KH: jax.Array, index: jax.Array) -> LayerKV:
    """Keys/values of one new token per row [B, 1, K, H] written at slot `index` (a scalar, or
    [B]: one slot per row)."""
    k_new, v_new = jnp.swapaxes(k_B1KH, 1, 2), jnp.swapaxes(v_B1KH, 1, 2)  # [B, K, 1, H]
    if jnp.ndim(index) == 1:
        # A scatter of B * K * H values; a vmapped dynamic_update_slice lowers to a select over
        # the whole cache on the CPU (~1 ms of a 14 ms llama-20m step at 64 rows).
        rows = jnp.arange(k_new.shape[0])
        put = lambda c, n: c.at[rows, :, index, :].set(n[:, :, 0, :].astype(c.dtype))
        return LayerKV(put(kv.k, k_new), put(kv.v, v_new))
    return LayerKV(
        jax.lax.dynamic_update_slice_in_dim(kv.k, k_new.astype(kv.k.dtype), index, SEQ_AXIS),
        jax.lax.dynamic_update_slice_in_dim(kv.v, v_new.astype(kv.v.dtype), index, SEQ_AXIS),
    )
