"""config.json <-> ModelConfig for each Hugging Face family: Llama, Qwen2, Qwen3, Gemma-2.

A family fixes some ModelConfig fields (Gemma-2 always has (1 + w) norms, sqrt(D) embedding
scaling and post-norms; Qwen3 always has QK-norm; Qwen2 always has q/k/v biases) and reads or
writes the rest from its own config keys. A ModelConfig is exported as the family its fixed
fields select (post_norms -> Gemma-2, qk_norm -> Qwen3, qkv_bias -> Qwen2, else Llama); if it
differs from that family anywhere else, it has no HF equivalent and export refuses it. A
config.json asking for something our model cannot compute is refused on import.

Keys are written in the layout of checkpoints on the Hub (`rope_theta`, `rope_scaling`,
`torch_dtype`), which transformers 4.x reads directly and 5.x converts on load; both layouts
(5.x writes `rope_parameters` and `dtype`) are read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from models.config import ModelConfig

_TORCH_DTYPES = ("float32", "bfloat16", "float16")
# HF activation name -> ours; HF's MLPs of all four families apply ACT2FN[name].
_ACT_FROM_HF = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_ACT_TO_HF = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
_SLIDING, _FULL = "sliding_attention", "full_attention"

# What the non-Gemma families all lack.
_PLAIN = {
    "norm_scale_plus_one": False,
    "qk_norm": False,
    "qkv_bias": False,
    "attn_logit_softcap": None,
    "final_logit_softcap": None,
    "scale_embeddings": False,
    "post_norms": False,
    "sliding_window": None,
}


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    # ModelConfig fields every model of this family has, with their values.
    fixed: Mapping[str, Any]
    # config.json keys this family writes beyond the shared ones.
    to_hf: Callable[[ModelConfig], dict[str, Any]]
    # ModelConfig fields read from this family's own keys; ValueError for what we cannot compute.
    from_hf: Callable[[Mapping[str, Any]], dict[str, Any]]
    # transformers' default for an absent tie_word_embeddings in this family's config class.
    tied_by_default: bool
    activation_key: str = "hidden_act"


def _refuse(hf: Mapping[str, Any], key: str, why: str) -> None:
    if hf.get(key):
        raise ValueError(f"{hf.get('model_type')} config has {key}={hf[key]!r}; {why}")


def _only_full_attention(hf: Mapping[str, Any]) -> None:
    _refuse(
        hf,
        "use_sliding_window",
        "Qwen-style sliding windows (on layers past max_window_layers) are not supported",
    )
    layer_types = hf.get("layer_types") or []
    if any(t != _FULL for t in layer_types):
        raise ValueError(
            f"{hf.get('model_type')} config has layer_types {layer_types}; only full_attention "
            "layers are supported for this family"
        )


def _default_query_scale(cfg: ModelConfig) -> bool:
    return cfg.query_scale is None or math.isclose(cfg.query_scale, cfg.head_dim**-0.5)


def _llama_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}


def _llama_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    # Llama's attention_bias also puts a bias on o_proj, which our attention does not have.
    _refuse(hf, "attention_bias", "our attention supports q/k/v biases only (the Qwen2 layout)")
    _refuse(hf, "mlp_bias", "our MLP has no biases")
    if hf.get("pretraining_tp", 1) not in (None, 1):
        raise ValueError(f"pretraining_tp={hf['pretraining_tp']} is not supported; use 1")
    return {}


def _qwen_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_layers,
    }


def _qwen2_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    _only_full_attention(hf)
    return {}


def _qwen3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**_qwen_to_hf(cfg), "attention_bias": False}


def _qwen3_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    _only_full_attention(hf)
    _refuse(hf, "attention_bias", "Qwen3 biases include o_proj, which our attention does not have")
    return {}


def _gemma2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    scale = cfg.query_scale if cfg.query_scale is not None else cfg.head_dim**-0.5
    scalar = scale**-2
    # Gemma checkpoints store an integer (head_dim or embed_dim / num_heads); keep it one.
    if math.isclose(scalar, round(scalar), rel_tol=1e-9):
        scalar = round(scalar)
    return {
        "query_pre_attn_scalar": scalar,
        "attn_logit_softcapping": cfg.attn_logit_softcap,
        "final_logit_softcapping": cfg.final_logit_softcap,
        # With no sliding layers the value is unused, but transformers builds a sliding mask
        # regardless and refuses None.
        "sliding_window": cfg.sliding_window or cfg.max_seq_len,
        "layer_types": [
            _SLIDING if cfg.layer_window(i) is not None else _FULL for i in range(cfg.num_layers)
        ],
        "attention_bias": False,
    }


def _window_pattern(hf: Mapping[str, Any]) -> dict[str, Any]:
    """(sliding_window, sliding_window_every) from `layer_types`: ours slide on layers 0, k, 2k."""
    n = int(hf["num_hidden_layers"])
    # Gemma2Config's default when layer_types is absent: even layers slide.
    default = [_SLIDING if i % 2 == 0 else _FULL for i in range(n)]
    layer_types = list(hf.get("layer_types") or default)
    window = hf.get("sliding_window", 4096)
    if len(layer_types) != n or set(layer_types) - {_SLIDING, _FULL}:
        raise ValueError(
            f"layer_types must list {n} entries of {_SLIDING!r}/{_FULL!r}, got {layer_types}"
        )
    sliding = [i for i, t in enumerate(layer_types) if t == _SLIDING]
    if not sliding:
        return {"sliding_window": None, "sliding_window_every": 2}
    if window is None:
        raise ValueError(f"config has {_SLIDING} layers {sliding} but sliding_window=None")
    every = sliding[1] - sliding[0] if len(sliding) > 1 else n
    if sliding != list(range(0, n, every)):
        raise ValueError(
            f"sliding-window layers {sliding} are not every k-th layer from layer 0; our model "
            "cannot represent this pattern"
        )
    return {"sliding_window": int(window), "sliding_window_every": every}


def _gemma2_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    _refuse(hf, "attention_bias", "our Gemma-2 attention has no biases")
    _refuse(hf, "use_bidirectional_attention", "our decoder is causal")
    caps = {}
    # Absent keys take Gemma2Config's defaults, as transformers would.
    for ours, theirs, default in (
        ("attn_logit_softcap", "attn_logit_softcapping", 50.0),
        ("final_logit_softcap", "final_logit_softcapping", 30.0),
    ):
        value = hf.get(theirs, default)
        caps[ours] = None if value is None else float(value)
    return {
        **caps,
        **_window_pattern(hf),
        "query_scale": float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
    }


FAMILIES: dict[str, Family] = {
    "llama": Family(
        "llama", "LlamaForCausalLM", _PLAIN, _llama_to_hf, _llama_from_hf, tied_by_default=False
    ),
    "qwen2": Family(
        "qwen2",
        "Qwen2ForCausalLM",
        {**_PLAIN, "qkv_bias": True},
        _qwen_to_hf,
        _qwen2_from_hf,
        tied_by_default=False,
    ),
    "qwen3": Family(
        "qwen3",
        "Qwen3ForCausalLM",
        {**_PLAIN, "qk_norm": True},
        _qwen3_to_hf,
        _qwen3_from_hf,
        tied_by_default=False,
    ),
    "gemma2": Family(
        "gemma2",
        "Gemma2ForCausalLM",
        {
            "norm_scale_plus_one": True,
            "scale_embeddings": True,
            "post_norms": True,
            "qk_norm": False,
            "qkv_bias": False,
        },
        _gemma2_to_hf,
        _gemma2_from_hf,
        tied_by_default=True,
        activation_key="hidden_activation",
    ),
}


def family_of(cfg: ModelConfig) -> Family:
    """The family whose architecture represents `cfg` exactly, or a ValueError saying why not."""
    if cfg.post_norms:
        name = "gemma2"
    elif cfg.qk_norm:
        name = "qwen3"
    else:
        name = "qwen2" if cfg.qkv_bias else "llama"
    family = FAMILIES[name]
    need = {k: v for k, v in family.fixed.items() if getattr(cfg, k) != v}
    if name != "gemma2" and not _default_query_scale(cfg):
        need["query_scale"] = "1/sqrt(head_dim)"
    if need:
        has = {k: getattr(cfg, k) for k in need}
        raise ValueError(
            f"ModelConfig has no Hugging Face equivalent: as {family.architecture} (the family "
            f"its post_norms/qk_norm/qkv_bias select) it needs {need}, but has {has}"
        )
    return family


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers `config.json` dict for `cfg`, in its family's architecture."""
    family = family_of(cfg)
    out: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        family.activation_key: _ACT_TO_HF[cfg.mlp_activation],
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "torch_dtype": cfg.param_dtype,
    }
    if cfg.rope_llama3_scaling is not None:
        factor, low, high, original = cfg.rope_llama3_scaling
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": float(factor),
            "low_freq_factor": float(low),
            "high_freq_factor": float(high),
            "original_max_position_embeddings": int(original),
        }
    out.update(family.to_hf(cfg))
    return out


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, tuple[float, float, float, int] | None]:
    """(rope_theta, llama3 scaling) from either config layout.

    transformers 5 writes `rope_parameters` = {rope_type, rope_theta, ...}; Hub checkpoints and
    transformers 4 write `rope_theta` plus an optional `rope_scaling` dict.
    """
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ValueError(f"RoPE scaling type {rope_type!r} is not supported (only 'llama3')")
    return float(theta), (
        float(scaling["factor"]),
        float(scaling["low_freq_factor"]),
        float(scaling["high_freq_factor"]),
        int(scaling["original_max_position_embeddings"]),
    )


def config_from_hf(hf: Mapping[str, Any] | Any, **overrides: Any) -> ModelConfig:
    """A ModelConfig from a transformers config (`config.json` dict, or a config object).

    `param_dtype` and `dtype` follow the checkpoint's `torch_dtype` (float32 when absent);
    `overrides` replace any field afterwards (e.g. dtype="bfloat16", max_seq_len=4096).
    """
    if not isinstance(hf, Mapping):
        hf = hf.to_dict()
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}"
        )
    family = FAMILIES[model_type]
    fields = {**family.fixed, **family.from_hf(hf)}
    act = hf.get(family.activation_key) or hf.get("hidden_act") or "silu"
    if act not in _ACT_FROM_HF:
        raise ValueError(
            f"{family.activation_key} {act!r} is not supported; supported: {sorted(_ACT_FROM_HF)}"
        )
    heads = int(hf["num_attention_heads"])
    theta, llama3 = _rope_from_hf(hf)
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"checkpoint dtype {dtype!r} is not one of {_TORCH_DTYPES}")
    tied = hf.get("tie_word_embeddings")
    cfg = ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        embed_dim=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        mlp_dim=int(hf["intermediate_size"]),
        mlp_activation=_ACT_FROM_HF[act],
        norm_eps=float(hf["rms_norm_eps"]),
        rope_theta=theta,
        rope_llama3_scaling=llama3,
        tie_embeddings=family.tied_by_default if tied is None else bool(tied),
        max_seq_len=int(hf["max_position_embeddings"]),
        param_dtype=dtype,
        dtype=dtype,
        **fields,
    )
    return cfg.replace(**overrides) if overrides else cfg
