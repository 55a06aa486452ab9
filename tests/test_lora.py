"""models/lora.py: adapters that start as the identity, train alone, switch off to the base model
and fold into an HF-exportable model with the adapted model's logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from models import (
    LoRAConfig,
    ModelConfig,
    Transformer,
    add_lora,
    from_pretrained,
    lora_off,
    merge_lora,
    save_pretrained,
)
from models.lora import TARGETS

# Qwen3-shaped (QK-norm, untied head) so that a merged model exports to Hugging Face.
CFG = ModelConfig(
    vocab_size=128,
    embed_dim=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    mlp_dim=96,
    qk_norm=True,
    tie_embeddings=False,
    max_seq_len=64,
)
IDS = np.random.default_rng(0).integers(0, 128, (2, 12)).astype(np.int32)
TARGET_IDS = np.random.default_rng(1).integers(0, 128, (2, 12)).astype(np.int32)


@functools.cache
def _base_state():
    # Drawn in numpy (no init compiles), at O(1) scale so that adapters move logits visibly.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def draw(x):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        return jnp.asarray(1.0 + 0.2 * noise if x.ndim == 1 else noise / np.sqrt(x.shape[0]))

    return graphdef, jax.tree.map(draw, state)


def _base() -> Transformer:
    # A fresh module each time; the (immutable) arrays are shared.
    return nnx.merge(*_base_state())


@nnx.jit
def _logits(model, ids):
    return model(ids)


def _np(model) -> np.ndarray:
    return np.asarray(_logits(model, jnp.asarray(IDS)))


def _loss(model):
    logits = model(jnp.asarray(IDS))
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(TARGET_IDS)).mean()


@nnx.jit
def _step(model, optimizer):
    loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return loss


def _flat(state) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def trained():
    """(base logits, base params, adapted model after 5 SGD steps on its adapters, losses)."""
    model = _base()
    base_logits = _np(model)
    base_params = _flat(nnx.state(model, nnx.Param))
    add_lora(model, LoRAConfig(rank=4, alpha=8.0), nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.LoRAParam)
    losses = [float(_step(model, optimizer)) for _ in range(5)]
    return base_logits, base_params, model, losses


def test_zero_initialised_adapters_leave_the_model_unchanged():
    model = _base()
    before = _np(model)
    add_lora(model, LoRAConfig(rank=4, alpha=8.0), nnx.Rngs(1))
    np.testing.assert_array_equal(_np(model), before)
    adapters = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    assert len(adapters) == 2 * len(TARGETS) * CFG.num_layers
    q = model.layers[0].attn.q_proj_lora
    assert q.a.get_value().shape == (64, 4) and q.b.get_value().shape == (4, 4, 16)
    assert q.a.get_metadata()["out_sharding"] == ("embed", "lora_rank")
    assert q.b.get_metadata()["out_sharding"] == ("lora_rank", "q_heads", "head_dim")
    o = model.layers[1].attn.o_proj_lora
    assert o.a.get_value().shape == (4, 16, 4) and o.b.get_value().shape == (4, 64)
    assert o.a.get_metadata()["out_sharding"] == ("q_heads", "head_dim", "lora_rank")
    down = model.layers[1].mlp.down_lora
    assert down.b.get_metadata()["out_sharding"] == ("lora_rank", "embed")
    # A is Gaussian with std 1/sqrt(fan_in), B zero.
    assert np.std(np.asarray(q.a.get_value())) == pytest.approx(64**-0.5, rel=0.2)
    assert not np.any(np.asarray(q.b.get_value()))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(model, LoRAConfig(rank=2, alpha=2.0), nnx.Rngs(2))


def test_only_adapters_train(trained):
    base_logits, base_params, model, losses = trained
    assert losses[-1] < losses[0] - 0.1, losses
    for path, value in _flat(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))).items():
        np.testing.assert_array_equal(value, base_params[path], err_msg=str(path))
    for block in model.layers:
        for sub, weight, _ in TARGETS.values():
            b = getattr(getattr(block, sub), weight + "_lora").b.get_value()
            assert np.abs(np.asarray(b)).max() > 1e-3, (sub, weight)
    assert np.abs(_np(model) - base_logits).max() > 1e-2


def test_split_and_adapters_off_give_the_base_model(trained):
    base_logits, _, model, _ = trained
    graphdef, lora_state, base_state = nnx.split(model, nnx.LoRAParam, nnx.Param)
    assert {type(v) for _, v in nnx.to_flat_state(lora_state)} == {nnx.LoRAParam}
    assert nnx.LoRAParam not in {type(v) for _, v in nnx.to_flat_state(base_state)}
    policy = nnx.merge(graphdef, lora_state, base_state)
    np.testing.assert_array_equal(_np(policy), _np(model))
    reference = nnx.merge(graphdef, lora_off(lora_state), base_state)
    np.testing.assert_array_equal(_np(reference), base_logits)
    # The reference shares the base weights: nothing is copied.
    assert reference.embedding.get_value() is model.embedding.get_value()


def test_merged_model_matches_the_adapted_one(trained, tmp_path):
    _, _, model, _ = trained
    merged = merge_lora(model)
    assert not nnx.to_flat_state(nnx.state(merged, nnx.LoRAParam))
    assert nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))  # the input keeps its adapters
    # Folding reassociates float32 sums: equal to the parity tolerance, not bitwise.
    np.testing.assert_allclose(_np(merged), _np(model), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="merge_lora"):
        save_pretrained(model, tmp_path / "unmerged")
    save_pretrained(merged, tmp_path)
    np.testing.assert_array_equal(_np(from_pretrained(tmp_path)), _np(merged))


@pytest.mark.ref
def test_transformers_loads_the_merged_export(trained, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, _, model, _ = trained
    save_pretrained(merge_lora(model), tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(ref).__name__ == "Qwen3ForCausalLM"
    with torch.inference_mode():
        theirs = ref(torch.as_tensor(IDS.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(theirs, _np(model), atol=1e-4, rtol=0)


def test_targets_subset_and_config_errors():
    model = _base()
    add_lora(model, LoRAConfig(rank=2, alpha=2.0, targets=("q", "down")), nnx.Rngs(0))
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    assert hasattr(attn, "q_proj_lora") and hasattr(mlp, "down_lora")
    assert not hasattr(attn, "k_proj_lora") and not hasattr(mlp, "gate_lora")
    with pytest.raises(ValueError, match="dropout"):
        LoRAConfig(rank=4, alpha=8.0, dropout=0.1)
    with pytest.raises(ValueError, match="unknown \\['qkv'\\]"):
        LoRAConfig(rank=4, alpha=8.0, targets=("qkv",))
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0, alpha=8.0)
