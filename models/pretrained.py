"""Hugging Face checkpoint directories in and out: `from_pretrained` and `save_pretrained`.

A directory holds config.json and the weights as model.safetensors, or as shards
model-0000i-of-0000n.safetensors with model.safetensors.index.json. Loading never materialises
a random init: the module is built abstractly (`nnx.eval_shape`) and each parameter is created
from the memory-mapped file with `jax.make_array_from_callback`, so that with a mesh each device
reads only its own slice and host memory holds about one copy of the weights (the page cache of
the mapping aside). Saving writes one tensor at a time.

    model = from_pretrained("/ckpt/Qwen2.5-0.5B", dtype="bfloat16", mesh=mesh)
    model.cfg                                       # its ModelConfig
    save_pretrained(model, "/out/policy")           # loadable by transformers
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from models import hf, safetensors_io
from models.config import ModelConfig
from models.partitioning import LOGICAL_RULES, state_shardings
from models.transformer import Transformer

CONFIG_FILE = "config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' 5GB

# config.json keys that describe the architecture: hf_config writes them from the ModelConfig,
# so `extra_config` may not contradict them.
_STRUCTURAL = frozenset(
    {
        "architectures",
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "tie_word_embeddings",
        "torch_dtype",
        "dtype",
    }
)


def _dtype_name(dtype: Any, what: str) -> str:
    try:
        return np.dtype(dtype).name
    except TypeError:
        raise ValueError(f"{what}={dtype!r} is not a dtype (use e.g. 'bfloat16')") from None


def _read_config_json(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory: expected a Hugging Face model dir")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"No {CONFIG_FILE} in {path}: not a Hugging Face model directory")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None


def load_config(path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a Hugging Face model directory (its config.json), with overrides."""
    return hf.config_from_hf(_read_config_json(Path(path)), **overrides)


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    param_dtype: Any = None,
    mesh: Mesh | None = None,
    rules=LOGICAL_RULES,
    **config_overrides: Any,
) -> Transformer:
    """A `Transformer` with the weights of a local Hugging Face directory; `.cfg` is its config.

    Args:
      path: directory with config.json and model.safetensors (or index-sharded safetensors).
      dtype: compute dtype (default: the checkpoint's `torch_dtype`).
      param_dtype: storage dtype of the parameters (default: the checkpoint's); weights are cast
        slice by slice on the host.
      mesh: place each parameter by its logical axis names and `rules`; every device reads only
        its own slice. None: everything on the default device.
      **config_overrides: ModelConfig fields to change, e.g. max_seq_len=4096. Fields that
        change a weight's shape make the load fail with the tensor named.
    """
    path = Path(path)
    overrides = dict(config_overrides)
    if dtype is not None:
        overrides["dtype"] = _dtype_name(dtype, "dtype")
    if param_dtype is not None:
        overrides["param_dtype"] = _dtype_name(param_dtype, "param_dtype")
    cfg = load_config(path, **overrides)
    tensors = safetensors_io.open_checkpoint(path)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    shardings = None
    if mesh is not None:
        flat = nnx.to_flat_state(state_shardings(nnx.state(model, nnx.Param), mesh, rules))
        shardings = {p: s.get_value() if isinstance(s, nnx.Variable) else s for p, s in flat}
    try:
        hf.load_hf_tensors(model, tensors, shardings)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return model


def save_pretrained(
    model: Transformer,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_config: Mapping[str, Any] | None = None,
) -> list[str]:
    """Writes config.json and safetensors that `transformers.AutoModelForCausalLM` loads.

    Weights are written in the param dtype, one tensor at a time, as shards plus an index once
    they exceed `max_shard_bytes`. `extra_config` adds non-architectural keys to config.json
    (e.g. the source checkpoint's bos/eos/pad token ids). A model with LoRA adapters is refused:
    save `models.lora.merge_lora(model)`. Returns the weight files written.
    """
    config = hf.hf_config(model.cfg)
    clash = sorted(set(extra_config or {}) & _STRUCTURAL)
    if clash:
        raise ValueError(
            f"extra_config may not set architecture keys {clash}: they follow model.cfg"
        )
    config.update(extra_config or {})
    entries = hf.hf_tensor_entries(model)
    names = safetensors_io.write_checkpoint(path, entries, max_shard_bytes=max_shard_bytes)
    # Last, so that a directory with a config.json has complete weights.
    (Path(path) / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return names
