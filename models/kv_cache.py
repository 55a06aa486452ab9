"""KV cache for GRPO-style decoding: a prompt part shared by a group, a per-sample part.

GRPO samples G completions of each of P prompts. The prompt is prefilled once; its keys and
values are stored once per prompt (`prefix`, [P, Sp, K, H] per layer) and attended to by all G
rows of its group, so decoding reads the prompt cache once per group instead of G times. New
tokens go into the per-sample part (`layers`, [B = P*G, S, K, H] per layer), all rows writing the
same slot `index` at each step (prompts are left-padded, so every row advances in lockstep).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

# Logical axis names of every cache array (models/partitioning.py maps them onto a mesh).
KV_AXES = ("batch", "cache_seq", "kv_heads", "head_dim")


@struct.dataclass
class LayerKV:
    k: jax.Array  # [rows, slots, K, H]
    v: jax.Array


@struct.dataclass
class KVCache:
    prefix: tuple[LayerKV, ...]  # per layer, [P, Sp, K, H]
    prefix_mask: jax.Array  # [P, Sp] bool: real prompt tokens
    prefix_positions: jax.Array  # [P, Sp] int32: RoPE positions of the prompt tokens
    layers: tuple[LayerKV, ...]  # per layer, [B, S, K, H]
    index: jax.Array  # int32 scalar: suffix slots written so far

    @property
    def group_size(self) -> int:
        return self.layers[0].k.shape[0] // self.prefix_mask.shape[0]

    @property
    def max_new_tokens(self) -> int:
        return self.layers[0].k.shape[1]


def from_prefill(
    prefix_kvs: tuple[LayerKV, ...],
    prompt_mask_PT: jax.Array,
    prompt_positions_PT: jax.Array,
    group_size: int,
    max_new_tokens: int,
) -> KVCache:
    """A cache holding the prefilled prompts and room for `max_new_tokens` per sample."""
    p = prompt_mask_PT.shape[0]

    def empty(kv: LayerKV) -> LayerKV:
        shape = (p * group_size, max_new_tokens) + kv.k.shape[2:]
        return LayerKV(jnp.zeros(shape, kv.k.dtype), jnp.zeros(shape, kv.v.dtype))

    return KVCache(
        prefix=tuple(prefix_kvs),
        prefix_mask=prompt_mask_PT.astype(bool),
        prefix_positions=prompt_positions_PT.astype(jnp.int32),
        layers=tuple(empty(kv) for kv in prefix_kvs),
        index=jnp.zeros((), jnp.int32),
    )
