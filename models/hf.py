"""Hugging Face (transformers) config and weight mapping: Llama, Qwen2, Qwen3 and Gemma-2.

The config side (config.json <-> ModelConfig, and what each family fixes) is in
`models.hf_families`; this module maps the weights. All four families share one tensor layout
apart from Qwen2's q/k/v biases, Qwen3's q_norm/k_norm and Gemma-2's norm names (its
`post_attention_layernorm` is the norm *after* attention, where Llama's is the one before the MLP).

Layouts. HF `nn.Linear` weights are [out, in]; ours are [in, out] with the head axes split out:
q_proj [D, N, H], k_proj/v_proj [D, K, H], o_proj [N, H, D], mlp gate/up [D, F], down [F, D],
lm_head [D, V]. Both sides rotate the two halves of each head (HF's `rotate_half`), so q and k
need no permutation, only a reshape and a transpose. Gemma's norm weights w are stored as w on
both sides ((1 + w) is applied in the forward).

    hf_config(cfg)                   -> dict for config.json
    config_from_hf(config_dict)      -> ModelConfig
    to_hf_state_dict(model)          -> {hf_name: np.ndarray}
    hf_tensor_entries(model)         -> [(hf_name, shape, dtype, fetch)], one tensor at a time
    load_hf_state_dict(model, sd)    -> None (updates the model in place)
    load_hf_tensors(model, tensors, shardings) -> None (lazy arrays, placed shard by shard)
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
from models.hf_families import FAMILIES, config_from_hf, family_of, hf_config
from models.transformer import Transformer

__all__ = [
    "FAMILIES",
    "config_from_hf",
    "hf_config",
    "hf_tensor_entries",
    "load_hf_state_dict",
    "load_hf_tensors",
    "to_hf_state_dict",
]

# Tensors that some checkpoints carry but that are recomputed, never loaded (old Llama exports
# saved the RoPE inverse frequencies as a buffer).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

Path_ = tuple[str | int, ...]
# The base weights: LoRA adapters are nnx.LoRAParam, a subclass of nnx.Param.
_BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


@dataclasses.dataclass(frozen=True)
class _Spec:
    """One tensor: its HF name, our parameter path, and how the layouts relate.

    kind "linear": ours is [in axes..., out axes...] with `n_in` leading input axes; HF is the
    [out, in] matrix. kind "flat": ours has head axes that HF flattens (biases). kind "same".
    """

    hf_name: str
    path: Path_
    kind: str
    n_in: int = 1


def _weight_specs(cfg: ModelConfig) -> list[_Spec]:
    specs = [
        _Spec("model.embed_tokens.weight", ("embedding",), "same"),
        _Spec("model.norm.weight", ("final_norm", "scale"), "same"),
    ]
    if not cfg.tie_embeddings:
        specs.append(_Spec("lm_head.weight", ("lm_head",), "linear"))
    if cfg.post_norms:  # Gemma-2
        norms = {
            "input_layernorm": "attn_norm",
            "post_attention_layernorm": "post_attn_norm",
            "pre_feedforward_layernorm": "mlp_norm",
            "post_feedforward_layernorm": "post_mlp_norm",
        }
    else:
        norms = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        layer = ("layers", i)
        specs += [
            _Spec(pre + f"{theirs}.weight", layer + (ours, "scale"), "same")
            for theirs, ours in norms.items()
        ]
        specs += [
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
        if cfg.qk_norm:
            for n in "qk":
                path = layer + ("attn", f"{n}_norm", "scale")
                specs.append(_Spec(pre + f"self_attn.{n}_norm.weight", path, "same"))
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
    # Transposing and splitting axes are both strided views: for a memory-mapped tensor nothing
    # is read until a slice of the result is.
    if spec.kind == "linear":
        return w.T.reshape(ours)
    return w.reshape(ours)


def _param_at(model: Transformer, path: Path_) -> nnx.Variable:
    node: Any = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def _check_specs_cover(model: Transformer, specs: list[_Spec]) -> None:
    # A parameter the table does not know would be silently dropped on export / left at its
    # random init on load.
    ours = {path for path, _ in nnx.to_flat_state(nnx.state(model, _BASE))}
    mapped = {spec.path for spec in specs}
    if ours != mapped:
        raise ValueError(
            f"HF mapping and model parameters disagree: unmapped "
            f"{sorted(map(str, ours - mapped))}, absent "
            f"{sorted(map(str, mapped - ours))}"
        )


def _specs_for(model: Transformer) -> list[_Spec]:
    family_of(model.cfg)
    specs = _weight_specs(model.cfg)
    _check_specs_cover(model, specs)
    return specs


def hf_tensor_entries(
    model: Transformer,
) -> list[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]]:
    """(HF name, HF shape, dtype, fetch) per tensor; `fetch()` copies that one tensor to host.

    For writing a checkpoint tensor by tensor. With tied embeddings `lm_head.weight` is left
    out, as in HF checkpoints. A model with LoRA adapters is refused: merge them first
    (`models.lora.merge_lora`).
    """
    if nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        raise ValueError(
            "The model has LoRA adapters, which have no place in a Hugging Face checkpoint: "
            "export models.lora.merge_lora(model) instead"
        )
    entries = []
    for spec in _specs_for(model):
        value = _param_at(model, spec.path).get_value()
        if not getattr(value, "is_fully_addressable", True):
            raise ValueError(
                f"{spec.hf_name} is sharded across processes; gather it before exporting "
                "(export from a single-process run, or all-gather the parameters first)"
            )

        def fetch(value=value, spec=spec) -> np.ndarray:
            return _to_hf(np.asarray(jax.device_get(value)), spec)

        shape = _hf_shape(tuple(value.shape), spec)
        entries.append((spec.hf_name, shape, np.dtype(value.dtype), fetch))
    return entries


def to_hf_state_dict(model: Transformer) -> dict[str, np.ndarray]:
    """The model's weights under HF names and layouts, as numpy arrays in the param dtype.

    With tied embeddings `lm_head.weight` is left out, as in HF safetensors checkpoints (torch's
    `load_state_dict` then needs `strict=False`, or `model.tie_weights()` afterwards).
    """
    return {name: fetch() for name, _, _, fetch in hf_tensor_entries(model)}


def _as_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy/jax array or a torch tensor, keeping bfloat16 as bfloat16."""
    if hasattr(x, "detach"):  # a torch.Tensor; torch is importable if one was passed
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            # numpy has no bfloat16: reinterpret the bits as the ml_dtypes type jax uses.
            return x.view(torch.int16).numpy().view(jnp.bfloat16)
        return x.numpy()
    return x if isinstance(x, np.ndarray) else np.asarray(x)


def _default_sharding(param: nnx.Variable) -> jax.sharding.Sharding:
    # A concrete parameter keeps its placement; an abstract one goes to the default device.
    sharding = getattr(param.get_value(), "sharding", None)
    return sharding if sharding is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])


def load_hf_tensors(
    model: Transformer,
    tensors: Mapping[str, np.ndarray],
    shardings: Mapping[Path_, jax.sharding.Sharding] | None = None,
) -> None:
    """Replace the model's weights, in place, by HF-named arrays that may be lazy (memory-mapped).

    Every expected key must be present with its HF shape and no other key may appear (apart from
    saved RoPE buffers); otherwise a ValueError lists the missing, unexpected and mis-shaped keys
    and nothing is changed. With tied embeddings `lm_head.weight` may be present but must equal
    the embedding. Each parameter is built with `jax.make_array_from_callback` on
    `shardings[path]` (default: its current sharding, or the default device for an abstract
    model), so each device reads and casts only its own slice of the tensor; values are cast to
    the config's param dtype. The model may be abstract (`nnx.eval_shape(...)`), so that a
    checkpoint loads without first materialising a random init.
    """
    cfg = model.cfg
    specs = _specs_for(model)
    expected = {spec.hf_name for spec in specs}
    given = {k for k in tensors if not k.endswith(_IGNORED_SUFFIXES)}
    tied_head = cfg.tie_embeddings and "lm_head.weight" in given
    if tied_head:
        given.discard("lm_head.weight")

    missing, unexpected = sorted(expected - given), sorted(given - expected)
    shape_errors = []
    views: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.hf_name not in tensors:
            continue
        w = tensors[spec.hf_name]
        ours = tuple(_param_at(model, spec.path).get_value().shape)
        want = _hf_shape(ours, spec)
        if tuple(w.shape) != want:
            shape_errors.append(f"{spec.hf_name}: got {tuple(w.shape)}, expected {want}")
            continue
        views[spec.hf_name] = _from_hf(w, spec, ours)
    if tied_head:
        head, embed = tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")
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
            f"HF state dict does not fit this {family_of(cfg).architecture} "
            f"config: " + "; ".join(p for p in parts if p)
        )

    dtype = np.dtype(cfg.jnp_param_dtype)
    arrays = {}
    for spec in specs:
        param = _param_at(model, spec.path)
        sharding = (shardings or {}).get(spec.path) or _default_sharding(param)
        view = views[spec.hf_name]

        # A fresh C-ordered copy per slice: the device buffer must not alias the file mapping.
        def read(index, view=view) -> np.ndarray:
            return np.array(view[index], dtype=dtype, order="C")

        arrays[spec.path] = jax.make_array_from_callback(view.shape, sharding, read)
    for spec in specs:
        _param_at(model, spec.path).set_value(arrays[spec.path])


def load_hf_state_dict(model: Transformer, state_dict: Mapping[str, Any]) -> None:
    """`load_hf_tensors` for an in-memory state dict of numpy, jax or torch tensors.

    Each parameter keeps its current sharding (the default device for an abstract model).
    """
    load_hf_tensors(model, {k: _as_numpy(v) for k, v in state_dict.items()})
