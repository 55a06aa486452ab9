"""The base model committed in models/bases/: its files, and the figures its README states.

If `python -m experiments.pretrain_base` rebuilt the directory, its base_info.json moved with it
and these tests still hold; a weight file replaced by anything else fails them.
"""

import collections
import json
import re

import numpy as np
import pytest
from safetensors import safe_open

from experiments.configs import r1_zero_tiny
from rl_reason.infra import sharding
from rl_reason.pipelines import base_model, r1_zero
from rl_reason.pipelines.grpo_stage import config_from
from rl_reason.trainer import GRPOConfig

BASE = base_model.SHIPPED_BASE


def _expected_shapes(hf: dict) -> dict[str, tuple[int, ...]]:
    """Llama tensor names and shapes, written out from config.json alone."""
    d, m, v = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
    hd = hf["head_dim"]
    q, kv = hf["num_attention_heads"] * hd, hf["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not hf["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (q, d),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.o_proj.weight": (d, q),
                p + "mlp.gate_proj.weight": (m, d),
                p + "mlp.up_proj.weight": (m, d),
                p + "mlp.down_proj.weight": (d, m),
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
            }
        )
    return shapes


def test_files_match_the_config_and_the_recorded_settings():
    hf = json.loads((BASE / "config.json").read_text())
    info = json.loads((BASE / base_model.INFO_FILE).read_text())
    assert hf["model_type"] == "llama"
    with safe_open(BASE / "model.safetensors", framework="numpy") as f:
        got = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"F32"}  # noqa: SIM118
    assert got == _expected_shapes(hf)
    assert sum(int(np.prod(s)) for s in got.values()) == info["pretrain"]["num_params"]

    settings = info["settings"]
    model = settings["model"]["overrides"]
    assert hf["num_hidden_layers"] == model["num_layers"]
    assert hf["hidden_size"] == model["embed_dim"]
    assert hf["intermediate_size"] == model["mlp_dim"]
    assert hf["max_position_embeddings"] == model["max_seq_len"]
    # The default experiment is the config this base was made with.
    assert settings == base_model.stage1_settings(r1_zero_tiny.get_config())


def test_loads_and_reproduces_its_documented_held_out_figures():
    """The README's numbers, exactly: greedy decoding on this machine type is deterministic."""
    config = r1_zero_tiny.get_config()
    info = base_model.read_info(BASE)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1, tensor=1))
    tokenizer, graphdef, params, _ = base_model.load_base(BASE, mesh, config)
    assert tokenizer.vocab_size == json.loads((BASE / "config.json").read_text())["vocab_size"]
    data = r1_zero.build_data(config, with_corpus=False)
    grpo_cfg = config_from(GRPOConfig, config.grpo)
    assert info["eval_settings"] == {
        "max_prompt_len": grpo_cfg.max_prompt_len,
        "max_new_tokens": grpo_cfg.max_new_tokens,
    }
    ev = base_model.evaluate(
        graphdef, params, tokenizer, data["task"], data["eval_set"], grpo_cfg, mesh
    )
    n = len(data["eval_set"])
    documented = info["eval"]
    assert documented["num_examples"] == n
    assert round(ev["accuracy"] * n) == documented["correct"]
    assert ev["mean_response_tokens"] == pytest.approx(documented["mean_response_tokens"], abs=1e-9)
    assert base_model.accuracy_by_ops(ev) == pytest.approx(documented["accuracy_by_ops"])
    assert f"{documented['correct']} / {n}" in (BASE / "README.md").read_text()


def test_transformers_reads_the_same_model():
    """The directory is a real Hugging Face checkpoint: transformers' Llama gives our logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from models import from_pretrained
    from rl_reason.infra.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(BASE)
    text = "Start with 17. Step 1: add 2. Step 2: subtract 5."
    ids = np.asarray([tokenizer.encode(text, add_bos=True)], np.int32)
    ours = np.asarray(from_pretrained(BASE)(ids))
    ref = transformers.AutoModelForCausalLM.from_pretrained(BASE, torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = ref(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_default_splits_cover_every_op_count():
    """Held-out, RL pool and corpus each hold many distinct problems of every length: no op
    count is left to a handful of problems by the small problem space of a split."""
    config = r1_zero_tiny.get_config()
    data = r1_zero.build_data(config)
    task = data["task"]
    ops = range(config.task.min_ops, config.task.max_ops + 1)
    questions = [
        re.search(r"Start with \d+\.(?: Step \d+: [a-z ]+ \d+\.)+", t)[0] for t in data["corpus"]
    ]
    splits = {
        "eval": {task.key(p) for p in data["eval_set"]},
        "rl_pool": {task.key(p) for p in data["rl_pool"]},
        "corpus": set(questions),
    }
    assert not splits["eval"] & splits["corpus"] and not splits["rl_pool"] & splits["corpus"]
    assert not splits["eval"] & splits["rl_pool"]
    for name, keys in splits.items():
        per_op = collections.Counter(q.count(" Step ") for q in keys)
        for k in ops:
            # Measured: eval 82/86/88 of 256, RL pool 602/759/687 of 2048, corpus 4746/11901/
            # 14146 distinct problems (2/3/4 ops; 7,220 two-op problems exist). With values <= 9
            # the corpus had 18 distinct two-op problems.
            assert per_op[k] >= len(keys) / 10, (name, k, per_op)
