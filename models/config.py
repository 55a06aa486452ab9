"""ModelConfig: one frozen dataclass for the Llama / Qwen2 / Qwen3 / Gemma-2 decoder family.

The presets carry the published shapes of real checkpoints so that sharding, memory and speed can
be planned (and tested under `jax.eval_shape`) without any weights on disk.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
# Rematerialisation of each block in the backward pass (see ModelConfig.remat).
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    Attention is grouped-query: `num_heads` query heads share `num_kv_heads` key/value heads
    (MHA when equal, MQA when 1). The MLP is gated: act(x W_gate) * (x W_up) W_down, with
    act = silu (SwiGLU: Llama, Qwen) or gelu_tanh (GeGLU: Gemma).
    """

    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    mlp_activation: str = "silu"
    norm_eps: float = 1e-6
    # Gemma stores RMSNorm scales as w and applies (1 + w).
    norm_scale_plus_one: bool = False
    rope_theta: float = 10_000.0
    # Llama-3 frequency scaling: (factor, low_freq_factor, high_freq_factor, original_max_pos).
    rope_llama3_scaling: tuple[float, float, float, int] | None = None
    tie_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on queries and keys before RoPE.
    attn_logit_softcap: float | None = None  # Gemma-2: cap * tanh(scores / cap).
    final_logit_softcap: float | None = None
    # Gemma multiplies the embeddings by sqrt(embed_dim) on the way in.
    scale_embeddings: bool = False
    # Gemma-2 normalises the attention and MLP outputs again before the residual add.
    post_norms: bool = False
    # Scores are q.k * query_scale; None means 1/sqrt(head_dim).
    query_scale: float | None = None
    # Sliding-window attention on every `sliding_window_every`-th layer (Gemma-2: even layers).
    sliding_window: int | None = None
    sliding_window_every: int = 2
    max_seq_len: int = 2048
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of activations and matmuls
    # What the backward pass keeps of each block's forward: "none" keeps every activation (the
    # fastest, the most memory); "full" keeps only the block's input and recomputes the rest;
    # "dots" keeps the outputs of the weight matmuls and recomputes the cheap elementwise work.
    remat: str = "none"

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")

        for name in (
            "vocab_size",
            "embed_dim",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "mlp_dim",
            "max_seq_len",
        ):
            value = getattr(self, name)
            need(
                isinstance(value, int) and value > 0,
                f"{name} must be a positive int, got {value!r}",
            )
        need(
            self.num_heads % self.num_kv_heads == 0,
            f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
            f"({self.num_kv_heads})",
        )
        need(
            self.mlp_activation in _ACTIVATIONS,
            f"mlp_activation {self.mlp_activation!r} is not one of {_ACTIVATIONS}",
        )
        need(
            self.param_dtype in _DTYPES, f"param_dtype {self.param_dtype!r} not in {list(_DTYPES)}"
        )
        need(self.dtype in _DTYPES, f"dtype {self.dtype!r} not in {list(_DTYPES)}")
        need(
            self.remat in REMAT_POLICIES,
            f"remat {self.remat!r} is not one of {REMAT_POLICIES}",
        )
        need(self.rope_theta > 0, "rope_theta must be positive")
        for cap in ("attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, cap)
            need(value is None or value > 0, f"{cap} must be None or positive")
        need(
            self.sliding_window is None or self.sliding_window > 0,
            "sliding_window must be None or positive",
        )

    @property
    def jnp_param_dtype(self) -> Any:
        return _DTYPES[self.param_dtype]

    @property
    def jnp_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def layer_window(self, layer: int) -> int | None:
        """Sliding window of `layer` (None: global attention)."""
        if self.sliding_window is None or layer % self.sliding_window_every != 0:
            return None
        return self.sliding_window

    def num_params(self) -> int:
        """Parameter count from the shapes alone (matches the module's actual count)."""
        d, h, k, hd, m = (
            self.embed_dim,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.mlp_dim,
        )
        attn = d * h * hd + 2 * d * k * hd + h * hd * d
        if self.qkv_bias:
            attn += h * hd + 2 * k * hd
        if self.qk_norm:
            attn += 2 * hd
        norms = (4 if self.post_norms else 2) * d
        layer = attn + 3 * d * m + norms
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embed + d


PRESETS: dict[str, ModelConfig] = {
    # Tests and CPU demos: compiles in about a second, trains on two cores.
    "tiny": ModelConfig(
        vocab_size=512,
        embed_dim=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        mlp_dim=384,
        max_seq_len=512,
    ),
    # The ~20M-parameter Llama shape the sampler benchmark uses.
    "llama-20m": ModelConfig(
        vocab_size=32_000,
        embed_dim=256,
        num_layers=4,
        num_heads=8,
        num_kv_heads=8,
        head_dim=32,
        mlp_dim=768,
        rope_theta=10_000.0,
        norm_eps=1e-5,
        tie_embeddings=False,
        max_seq_len=2048,
    ),
    # Qwen2.5-0.5B: 494,032,768 parameters (published).
    "qwen2.5-0.5b": ModelConfig(
        vocab_size=151_936,
        embed_dim=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        mlp_dim=4864,
        rope_theta=1e6,
        qkv_bias=True,
        norm_eps=1e-6,
        tie_embeddings=True,
        max_seq_len=32_768,
        param_dtype="bfloat16",
        dtype="bfloat16",
    ),
    # Qwen2.5-1.5B: 1,543,714,304 parameters (published).
    "qwen2.5-1.5b": ModelConfig(
        vocab_size=151_936,
        embed_dim=1536,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        head_dim=128,
        mlp_dim=8960,
        rope_theta=1e6,
        qkv_bias=True,
        norm_eps=1e-6,
        tie_embeddings=True,
        max_seq_len=32_768,
        param_dtype="bfloat16",
        dtype="bfloat16",
    ),
    # Llama-3.2-1B: 1,235,814,400 parameters (published).
    "llama-3.2-1b": ModelConfig(
        vocab_size=128_256,
        embed_dim=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        mlp_dim=8192,
        rope_theta=500_000.0,
        rope_llama3_scaling=(32.0, 1.0, 4.0, 8192),
        norm_eps=1e-5,
        tie_embeddings=True,
        max_seq_len=131_072,
        param_dtype="bfloat16",
        dtype="bfloat16",
    ),
    # Gemma-2-2B: 2,614,341,888 parameters (published).
    "gemma-2-2b": ModelConfig(
        vocab_size=256_000,
        embed_dim=2304,
        num_layers=26,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        mlp_dim=9216,
        mlp_activation="gelu_tanh",
        norm_scale_plus_one=True,
        rope_theta=10_000.0,
        tie_embeddings=True,
        scale_embeddings=True,
        post_norms=True,
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
        query_scale=256**-0.5,
        sliding_window=4096,
        sliding_window_every=2,
        norm_eps=1e-6,
        max_seq_len=8192,
        param_dtype="bfloat16",
        dtype="bfloat16",
    ),
}

# Published parameter counts, for the preset tests.
PUBLISHED_NUM_PARAMS = {
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "llama-3.2-1b": 1_235_814_400,
    "gemma-2-2b": 2_614_341_888,
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, with field overrides (e.g. dtype="bfloat16")."""
    if name not in PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; valid presets: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
