"""FLOPs and bytes of the model's work, counted from its shapes (the numerators of MFU).

Only the work a correct implementation must do is counted: matmuls with the weights, the
attention score and value products over the keys a token may see (causal, no padding), and
the lm-head only where logits are needed. Elementwise work (norms, RoPE, softmax) is left out,
as MFU conventions do; an implementation that does more than this (padding, spare cache slots)
is slower for it, not credited.
"""

from __future__ import annotations

from models.config import ModelConfig


def layer_matmul_params(cfg: ModelConfig) -> int:
    """Weights of one block's projections (q, k, v, o, gate, up, down)."""
    d, n, k, h, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    return d * n * h + 2 * d * k * h + n * h * d + 3 * d * f


def lm_head_params(cfg: ModelConfig) -> int:
    return cfg.embed_dim * cfg.vocab_size


def attention_flops(cfg: ModelConfig, keys_seen: float) -> float:
    """Score and value products of one query token over `keys_seen` keys, all layers."""
    return 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * keys_seen


def forward_flops(cfg: ModelConfig, tokens: int, keys_seen: float, logit_tokens: int) -> float:
    """A forward pass over `tokens` query tokens that see `keys_seen` keys on average, with
    logits at `logit_tokens` of them."""
    body = 2.0 * tokens * cfg.num_layers * layer_matmul_params(cfg)
    return (
        body + tokens * attention_flops(cfg, keys_seen) + 2.0 * logit_tokens * lm_head_params(cfg)
    )


def causal_keys_seen(length: int) -> float:
    """Mean keys seen per token of a causal sequence of `length` (itself included)."""
    return (length + 1) / 2


def prefill_flops(cfg: ModelConfig, prompts: int, prompt_len: int) -> float:
    """The prompt pass of generation: logits at each prompt's last token only."""
    return forward_flops(cfg, prompts * prompt_len, causal_keys_seen(prompt_len), prompts)


def decode_flops(cfg: ModelConfig, rows: int, prompt_len: int, new_tokens: int) -> float:
    """Feeding `new_tokens - 1` sampled tokens back (the first comes from the prefill), each
    seeing the prompt and the tokens before it."""
    steps = new_tokens - 1
    if steps <= 0:
        return 0.0
    mean_keys = prompt_len + 1 + (steps - 1) / 2
    return forward_flops(cfg, rows * steps, mean_keys, rows * steps)


def decode_step_bytes(
    cfg: ModelConfig, rows: int, prompts: int, prompt_len: int, own_keys: float
) -> float:
    """Bytes one decode step must read: every projection and lm-head weight once, the prompt
    keys/values once per prompt (a group shares them) and each row's own `own_keys`."""
    size = {"float32": 4, "bfloat16": 2, "float16": 2}
    weights = cfg.num_layers * layer_matmul_params(cfg) + lm_head_params(cfg)
    kv_per_key = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * size[cfg.dtype]
    return weights * size[cfg.param_dtype] + kv_per_key * (prompts * prompt_len + rows * own_keys)


def train_flops(cfg: ModelConfig, rows: int, prompt_len: int, completion_len: int) -> float:
    """Forward + backward (3x the forward) of rows of prompt + completion, with the lm-head on
    the completion positions only (the ones the loss reads)."""
    length = prompt_len + completion_len
    return 3.0 * forward_flops(cfg, rows * length, causal_keys_seen(length), rows * completion_len)
