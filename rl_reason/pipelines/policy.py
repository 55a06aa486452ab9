"""The policy a recipe trains: loaded from a Hugging Face checkpoint (with fresh LoRA adapters
when config.lora.rank > 0) and exported back to that layout, LoRA merged, tokenizer beside it.

Under LoRA only the adapters train; the frozen base weights are also the KL reference.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import multihost_utils

from models import LoRAConfig, Transformer, add_lora, from_pretrained, merge_lora, save_pretrained
from rl_reason.pipelines.recipe_options import ModelOptions

# Files that make an export directory a complete Hugging Face model with its tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
# config.json keys of the source checkpoint carried into the export (not architecture keys).
_CARRIED_CONFIG_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass
class Policy:
    """`nnx.split` of the policy: params are what trains (all weights, or the LoRA adapters),
    frozen the base weights under LoRA (else None)."""

    graphdef: Any
    params: Any
    frozen: Any
    model_cfg: Any
    lora: LoRAConfig | None

    def model(self) -> Transformer:
        states = (self.params,) if self.frozen is None else (self.params, self.frozen)
        return nnx.merge(self.graphdef, *states)

    @property
    def trainer_kwargs(self) -> dict[str, Any]:
        return {} if self.frozen is None else {"frozen": self.frozen}


def load_policy(
    path: str | Path,
    model: ModelOptions,
    lora: LoRAConfig | None,
    mesh,
    *,
    seed: int = 0,
) -> Policy:
    """The checkpoint at `path` on `mesh`, with fresh LoRA adapters when `lora` is set."""
    overrides = {"max_seq_len": model.max_seq_len} if model.max_seq_len else {}
    transformer = from_pretrained(
        path,
        dtype=model.dtype or None,
        param_dtype=model.param_dtype or None,
        mesh=mesh,
        **overrides,
    )
    if lora is None:
        graphdef, params = nnx.split(transformer)
        return Policy(graphdef, params, None, transformer.cfg, None)
    add_lora(transformer, lora, nnx.Rngs(seed))
    graphdef, adapters, base = nnx.split(transformer, nnx.LoRAParam, nnx.Param)
    return Policy(graphdef, adapters, base, transformer.cfg, lora)


def export_policy(
    graphdef, params, frozen, out_dir: str | Path, *, source_dir: str | Path | None = None
) -> Path:
    """The policy (LoRA merged) as a Hugging Face directory, with the source's tokenizer files
    and bos/eos/pad ids; every process must call it, process 0 writes."""
    states = (params,) if frozen is None else (params, frozen)
    if jax.process_count() > 1:
        # Weights sharded over hosts: every process takes part in gathering them to the host;
        # process 0 then holds each one whole (on its first device) and writes.
        states = tuple(multihost_utils.process_allgather(s, tiled=True) for s in states)
    out_dir = Path(out_dir)
    if jax.process_index() == 0:
        if jax.process_count() > 1:
            states = tuple(jax.tree.map(jnp.asarray, s) for s in states)
        model = nnx.merge(graphdef, *states)
        if nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
            model = merge_lora(model)
        extra = {}
        if source_dir is not None:
            source = json.loads((Path(source_dir) / "config.json").read_text())
            extra = {k: source[k] for k in _CARRIED_CONFIG_KEYS if source.get(k) is not None}
            out_dir.mkdir(parents=True, exist_ok=True)
            for name in TOKENIZER_FILES:
                if (Path(source_dir) / name).is_file():
                    shutil.copy2(Path(source_dir) / name, out_dir / name)
        save_pretrained(model, out_dir, extra_config=extra)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("rl_reason.pipelines.policy.export")
    return out_dir
