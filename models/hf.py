"""Hugging Face (transformers) config and weight mapping, per model family.

Supported now: the Llama and Qwen2 architectures (`LlamaForCausalLM`, `Qwen2ForCausalLM`). They
share one tensor layout; Qwen2 adds q/k/v biases. A further family is an entry in `_FAMILIES`
(its config keys) plus, if it has tensors the others lack, a few lines in `_weight_specs`.

Layouts. HF `nn.Linear` weights are [out, in]; ours are [in, out] with the head axes split out:
q_proj [D, N, H], k_proj/v_proj [D, K, H], o_proj [N, H, D], mlp gate/up [D, F], down [F, D],
lm_head [D, V]. Both sides rotate the two halves of each head (HF's `rotate_half`), so q and k
need no permutation, only a reshape and a transpose.

    hf_config(cfg)                -> dict for config.json
    config_from_hf(config_dict)   -> ModelConfig
    to_hf_state_dict(model)       -> {hf_name: np.ndarray}
    load_hf_state_dict(model, sd) -> None (updates the model in place)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.transformer import Transformer

# Tensors that some checkpoints carry but that are recomputed, never loaded (old Llama exports
# saved the RoPE inverse frequencies as a buffer).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class _Family:
    model_type: str
    architecture: str
    qkv_bias: bool
    # config.json keys this family writes beyond the shared ones.
    extra_config: Callable[[ModelConfig], dict[str, Any]]
    # Raises ValueError when a config.json asks for something our model cannot represent.
    check_config: Callable[[Mapping[str, Any]], None]


def _llama_extra(cfg: ModelConfig) -> dict[str, Any]:
    return {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}


def _llama_check(hf: Mapping[str, Any]) -> None:
    # Llama's attention_bias also puts a bias on o_proj, which our attention does not have.
    if hf.get("attention_bias", False):
        raise ValueError(
            "Llama config has attention_bias=True (biases on q/k/v/o); our model "
            "supports q/k/v biases only (the Qwen2 layout)"
        )
    if hf.get("mlp_bias", False):
        raise ValueError("Llama config has mlp_bias=True; our MLP has no biases")
    if hf.get("pretraining_tp", 1) not in (None, 1):
        raise ValueError(f"pretraining_tp={hf['pretraining_tp']} is not supported; use 1")


def _qwen2_extra(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_layers,
    }


def _qwen2_check(hf: Mapping[str, Any]) -> None:
    if hf.get("use_sliding_window", False):
        raise ValueError(
            "Qwen2 config has use_sliding_window=True; Qwen2-style sliding "
            "windows (by max_window_layers) are not supported"
        )


_FAMILIES: dict[str, _Family] = {
    "llama": _Family(
        "llama",
        "LlamaForCausalLM",
        qkv_bias=False,
        extra_config=_llama_extra,
        check_config=_llama_check,
    ),
    "qwen2": _Family(
        "qwen2",
        "Qwen2ForCausalLM",
        qkv_bias=True,
        extra_config=_qwen2_extra,
        check_config=_qwen2_check,
    ),
}

_TORCH_DTYPES = ("float32", "bfloat16", "float16")


def _family_of(cfg: ModelConfig) -> _Family:
    """The family whose architecture represents `cfg` exactly, or a ValueError saying why not."""
    unsupported = {
        "mlp_activation": cfg.mlp_activation != "silu",
        "norm_scale_plus_one": cfg.norm_scale_plus_one,
        "qk_norm": cfg.qk_norm,
        "attn_logit_softcap": cfg.attn_logit_softcap is not None,
        "final_logit_softcap": cfg.final_logit_softcap is not None,
        "scale_embeddings": cfg.scale_embeddings,
        "post_norms": cfg.post_norms,
        "sliding_window": cfg.sliding_window is not None,
        "query_scale": (
            cfg.query_scale is not None and not math.isclose(cfg.query_scale, cfg.head_dim**-0.5)
        ),
    }
    bad = [name for name, is_set in unsupported.items() if is_set]
    if bad:
        raise ValueError(
            f"ModelConfig fields {bad} have no Llama/Qwen2 equivalent; only these "
            "two families are mapped to Hugging Face so far"
        )
    return _FAMILIES["qwen2" if cfg.qkv_bias else "llama"]


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers `config.json` dict: Qwen2 when `cfg.qkv_bias`, else Llama.

    Keys follow the layout of checkpoints on the Hub (`rope_theta`, `rope_scaling`,
    `torch_dtype`), which transformers 4.x reads directly and 5.x converts on load.
    """
    family = _family_of(cfg)
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
        "hidden_act": "silu",
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
    out.update(family.extra_config(cfg))
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
    if model_type not in _FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: {sorted(_FAMILIES)}"
        )
    family = _FAMILIES[model_type]
    family.check_config(hf)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported by the {model_type} mapping")
    heads = int(hf["num_attention_heads"])
    theta, llama3 = _rope_from_hf(hf)
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"checkpoint dtype {dtype!r} is not one of {_TORCH_DTYPES}")
    cfg = ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        embed_dim=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        mlp_dim=int(hf["intermediate_size"]),
        norm_eps=float(hf["rms_norm_eps"]),
        rope_theta=theta,
        rope_llama3_scaling=llama3,
        # Absent means untied: the Llama and Qwen2 config classes both default to False.
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=family.qkv_bias,
        max_seq_len=int(hf["max_position_embeddings"]),
        param_dtype=dtype,
        dtype=dtype,
    )
    return cfg.replace(**overrides) if overrides else cfg


# --- weights ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
    """One tensor: its HF name, our parameter path, and how the layouts relate.

    kind "linear": ours is [in axes..., out axes...] with `n_in` leading input axes; HF is the
    [out, in] matrix. kind "flat": ours has head axes that HF flattens (biases). kind "same".
    """

    hf_name: str
    path: tuple[str | int, ...]
    kind: str
    n_in: int = 1


def _weight_specs(cfg: ModelConfig) -> list[_Spec]:
    specs = [
        _Spec("model.embed_tokens.weight", ("embedding",), "same"),
        _Spec("model.norm.weight", ("final_norm", "scale"), "same"),
    ]
    if not cfg.tie_embeddings:
        specs.append(_Spec("lm_head.weight", ("lm_head",), "linear"))
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        layer = ("layers", i)
        specs += [
            _Spec(pre + "input_layernorm.weight", layer + ("attn_norm", "scale"), "same"),
            _Spec(pre + "post_attention_layernorm.weight", layer + ("mlp_norm", "scale"), "same"),
            _Spec(pre + "self_attn.q_proj.weight", layer + ("attn", "q_proj"), "linear"),
            _Spec(pre + "self_attn.k_proj.weight", layer + ("attn", "k_proj"), "linear"),
            _Spec(pre + "self_attn.v_proj.weight", layer + ("attn", "v_proj"), "linear"),
            _Spec(pre + "self_attn.o_proj.weight", layer + ("attn", "o_proj"), "linear", n_in=2),
            _Spec(pre + "mlp.gate_proj.weight", layer + ("mlp", "gate"), "linear"),
            _Spec(pre + "mlp.up_proj.weight", layer + ("mlp", "up"), "linear"),
            _Spec(pre + "mlp.down_proj.weight", layer + ("mlp", "down"), "linear"),
        ]
        if cfg.qkv_bias:
            specs += [
                _Spec(pre + f"self_attn.{n}_proj.bias", layer + ("attn", f"{n}_bias"), "flat")
                for n in "qkv"
            ]
    return specs


def _to_hf(x: np.ndarray, spec: _Spec) -> np.ndarray:
    if spec.kind == "linear":
        n_in = math.prod(x.shape[: spec.n_in])
        return np.ascontiguousarray(x.reshape(n_in, -1).T)
    if spec.kind == "flat":
        return x.reshape(-1)
    return x


def _hf_shape(ours: tuple[int, ...], spec: _Spec) -> tuple[int, ...]:
    if spec.kind == "linear":
        return (math.prod(ours[spec.n_in :]), math.prod(ours[: spec.n_in]))
    if spec.kind == "flat":
        return (math.prod(ours),)
    return ours


def _from_hf(w: np.ndarray, spec: _Spec, ours: tuple[int, ...]) -> np.ndarray:
    if spec.kind == "linear":
        return w.T.reshape(ours)
    return w.reshape(ours)


def _param_at(model: Transformer, path: tuple[str | int, ...]) -> nnx.Param:
    node: Any = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def _check_specs_cover(model: Transformer, specs: list[_Spec]) -> None:
    # A parameter the table does not know would be silently dropped on export / left at its
    # random init on load.
    ours = {path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    mapped = {spec.path for spec in specs}
    if ours != mapped:
        raise ValueError(
            f"HF mapping and model parameters disagree: unmapped "
            f"{sorted(map(str, ours - mapped))}, absent "
            f"{sorted(map(str, mapped - ours))}"
        )


def to_hf_state_dict(model: Transformer) -> dict[str, np.ndarray]:
    """The model's weights under HF names and layouts, as numpy arrays in the param dtype.

    With tied embeddings `lm_head.weight` is left out, as in HF safetensors checkpoints (torch's
    `load_state_dict` then needs `strict=False`, or `model.tie_weights()` afterwards).
    """
    _family_of(model.cfg)
    specs = _weight_specs(model.cfg)
    _check_specs_cover(model, specs)
    out = {}
    for spec in specs:
        value = jax.device_get(_param_at(model, spec.path).get_value())
        out[spec.hf_name] = _to_hf(np.asarray(value), spec)
    return out


def _as_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy/jax array or a torch tensor, keeping bfloat16 as bfloat16."""
    if hasattr(x, "detach"):  # a torch.Tensor; torch is importable if one was passed
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            # numpy has no bfloat16: reinterpret the bits as the ml_dtypes type jax uses.
            return x.view(torch.int16).numpy().view(jnp.bfloat16)
        return x.numpy()
    return np.asarray(x)


def load_hf_state_dict(model: Transformer, state_dict: Mapping[str, Any]) -> None:
    """Replace the model's weights, in place, by HF-named tensors (numpy, jax or torch).

    Every expected key must be present with its HF shape and no other key may appear (apart from
    saved RoPE buffers); otherwise a ValueError lists the missing, unexpected and mis-shaped keys
    and nothing is changed. With tied embeddings `lm_head.weight` may be present but must equal
    the embedding. Values are cast to the config's param dtype and placed with each parameter's
    current sharding. The model may be abstract (`nnx.eval_shape(lambda: Transformer(...))`), so
    that a checkpoint loads without first materialising a random init.
    """
    cfg = model.cfg
    _family_of(cfg)
    specs = _weight_specs(cfg)
    _check_specs_cover(model, specs)
    expected = {spec.hf_name for spec in specs}
    given = {k for k in state_dict if not k.endswith(_IGNORED_SUFFIXES)}
    tied_head = cfg.tie_embeddings and "lm_head.weight" in given
    if tied_head:
        given.discard("lm_head.weight")

    missing, unexpected = sorted(expected - given), sorted(given - expected)
    shape_errors = []
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.hf_name not in state_dict:
            continue
        w = _as_numpy(state_dict[spec.hf_name])
        ours = tuple(_param_at(model, spec.path).get_value().shape)
        want = _hf_shape(ours, spec)
        if tuple(w.shape) != want:
            shape_errors.append(f"{spec.hf_name}: got {tuple(w.shape)}, expected {want}")
            continue
        arrays[spec.hf_name] = _from_hf(w, spec, ours)
    if tied_head:
        head = _as_numpy(state_dict["lm_head.weight"])
        embed = arrays.get("model.embed_tokens.weight")
        if embed is not None and (head.shape != embed.shape or not np.array_equal(head, embed)):
            shape_errors.append(
                "lm_head.weight: the config ties embeddings but lm_head.weight "
                "differs from model.embed_tokens.weight (set "
                "tie_embeddings=False to load it as a separate head)"
            )
    if missing or unexpected or shape_errors:
        parts = [
            f"missing keys {missing}" if missing else "",
            f"unexpected keys {unexpected}" if unexpected else "",
            f"shape/value mismatches {shape_errors}" if shape_errors else "",
        ]
        raise ValueError(
            f"HF state dict does not fit this {_family_of(cfg).architecture} "
            f"config: " + "; ".join(p for p in parts if p)
        )

    dtype = np.dtype(cfg.jnp_param_dtype)
    for spec in specs:
        param = _param_at(model, spec.path)
        # Cast on the host and transfer straight to the target sharding: a sharded model's
        # weights never pass whole through one device.
        value = np.ascontiguousarray(arrays[spec.hf_name], dtype=dtype)
        sharding = getattr(param.get_value(), "sharding", None)
        param.set_value(
            jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)
        )
