"""Tiny random models of each Hugging Face family, for smoke runs and tests.

`build_tiny_model(dir, family, texts)` writes a Hugging Face directory (config.json,
safetensors, tokenizer.json with a ChatML template) that `models.from_pretrained` and
transformers both load: the same path a real checkpoint takes, in well under a second.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import Transformer, save_pretrained
from models import get_config as model_preset

_TINY_SHAPE = dict(
    embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128
)
# family -> (preset whose family-specific fields it keeps, field changes)
TINY_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama-3.2-1b", {}),
    "qwen2": ("qwen2.5-0.5b", {}),
    "qwen3": ("qwen2.5-0.5b", {"qkv_bias": False, "qk_norm": True}),
    "gemma2": ("gemma-2-2b", {"query_scale": 16**-0.5, "sliding_window": 64}),
}
TINY_VOCAB = 512
# Embedding rows past the vocabulary, as real checkpoints pad them (Qwen2.5: 151,936 rows for
# 151,665 tokens): the sampler must never emit one.
TINY_EMBEDDING_ROWS = TINY_VOCAB + 64
TINY_MAX_SEQ_LEN = 1024
# A random model with 0.02-std embeddings is nearly uniform over its vocabulary and almost never
# samples eos. Sharper embeddings (all rows x5, tied: also the output rows) and a stronger eos row
# (x3 more) make some samples stop early while greedy decoding does not: completions differ in
# length, so the overlong penalty varies within a group and smoke steps make real updates.
TINY_EMBED_SCALE = 5.0
TINY_EOS_SCALE = 3.0
# ChatML, and Qwen2.5's way with tools: `tools` are announced in the system turn (after the
# system message, if any), a "tool" message is a user turn holding <tool_response>...; without
# either the text is plain ChatML.
_CHATML = (
    "{% if tools %}"
    "{{ '<|im_start|>system\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ 'You can call these tools:\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}"
    '{{ \'\\n</tools>\\nTo call one, write <tool_call>\\n{"name": ..., "arguments": '
    "{...}}\\n</tool_call>; the result comes back in <tool_response>.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message['content'] + "
    "'\\n</tool_response><|im_end|>\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2.5's tool-call tokens (added tokens, kept in decoded text), for multi-turn smoke runs.
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")


def build_tiny_model(
    directory: str | Path,
    family: str,
    texts: Sequence[str],
    *,
    seed: int = 0,
    tool_tokens: bool = False,
) -> Path:
    """A random `family` model and a byte-level BPE tokenizer (ChatML template, eos
    <|endoftext|>, no bos, like Qwen's) trained on `texts`, written as a Hugging Face
    directory: TINY_VOCAB tokens, TINY_EMBEDDING_ROWS embedding rows. `tool_tokens`: Qwen's
    `<tool_call>` ... tokens are single tokens too."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=list(_TINY_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    if tool_tokens:
        tok.add_tokens(list(TOOL_TOKENS))
    # Reserved tokens fill the vocabulary to exactly TINY_VOCAB whatever the corpus supports (as
    # Llama 3's reserved tokens do), so every tiny model has the same shapes.
    spare = TINY_VOCAB - tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(spare)])
    tok.save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "chat_template": _CHATML,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    eos = tok.token_to_id("<|endoftext|>")

    preset, changes = TINY_FAMILIES[family]
    cfg = model_preset(preset).replace(
        **_TINY_SHAPE,
        **changes,
        vocab_size=TINY_EMBEDDING_ROWS,
        max_seq_len=TINY_MAX_SEQ_LEN,
        dtype="float32",
        param_dtype="float32",
    )

    model = _random_model(cfg, seed)
    embedding = model.embedding.get_value() * TINY_EMBED_SCALE
    embedding = embedding.at[eos].multiply(TINY_EOS_SCALE)
    if tool_tokens:
        # ... and the end of a tool call as strong as eos: random trajectories call the tool.
        embedding = embedding.at[tok.token_to_id(TOOL_TOKENS[1])].multiply(TINY_EOS_SCALE)
    model.embedding.set_value(embedding)
    save_pretrained(model, directory, extra_config={"eos_token_id": eos, "pad_token_id": eos})
    return directory


def _random_model(cfg, seed: int) -> Transformer:
    """A Transformer with numpy-drawn weights: norm scales at their identity (1, or 0 for
    (1 + w) norms), everything else N(0, 0.02). Drawing them with jax would compile a
    random-number kernel per shape, seconds for a model that is random anyway."""
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape, dtype = var.get_value().shape, var.get_value().dtype
        if var.get_metadata()["out_sharding"] == ("norm",):
            value = np.full(shape, 0.0 if cfg.norm_scale_plus_one else 1.0)
        else:
            value = rng.normal(0.0, 0.02, shape)
        var.set_value(jnp.asarray(value, dtype))
    return model
