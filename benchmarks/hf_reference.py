"""The PyTorch side of the benchmarks: our weights in a Hugging Face transformers model.

`torch_model` copies a `models.Transformer`'s weights (models/hf.py's mapping) into the
transformers class of its family; `check_same_logits` compares the two forward passes before
anything is timed, so that a wrong weight copy cannot pass for a speed difference.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import Transformer, hf


def torch_model(model: Transformer, dtype: str) -> Any:
    """A transformers causal LM holding `model`'s weights, in torch dtype `dtype`, eval mode."""
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(**hf.hf_config(model.cfg))
    config.bos_token_id = config.eos_token_id = None
    config.pad_token_id = 0
    ref = transformers.AutoModelForCausalLM.from_config(config).eval()
    state = {
        k: torch.from_numpy(np.array(v, dtype=np.float32))
        for k, v in hf.to_hf_state_dict(model).items()
    }
    result = ref.load_state_dict(state, strict=False)
    allowed_missing = ["lm_head.weight"] if model.cfg.tie_embeddings else []
    if list(result.unexpected_keys) or list(result.missing_keys) != allowed_missing:
        raise AssertionError(f"weight copy into transformers failed: {result}")
    ref = ref.to(getattr(torch, dtype))
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    return ref


def check_same_logits(model: Transformer, ref: Any, ids: np.ndarray) -> float:
    """Max |logit difference| of the two models on up to 4 rows of `ids` [B, T]; raises when it
    is not tiny."""
    import torch

    ids = ids[:4]
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)), np.float32)
    with torch.inference_mode():
        theirs = ref(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()
    diff = float(np.abs(ours - theirs).max())
    limit = 1e-3 if model.cfg.dtype == "float32" else 0.5
    if not diff <= limit:
        raise AssertionError(
            f"our logits and transformers' differ by {diff} (> {limit}): the "
            "weight copy or the config mapping is wrong"
        )
    return diff
