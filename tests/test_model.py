"""The decoder: cached decode vs full forward, causality, padding, presets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import Transformer, get_config, kv_cache
from models.config import PRESETS, PUBLISHED_NUM_PARAMS

TINY = get_config("tiny")
# Every optional feature of the family switched on, at tiny size: GQA, qkv bias, QK-norm,
# Gemma norms, soft-capping, post-norms, sliding windows, scaled embeddings, untied head.
FEATURES = TINY.replace(
    qkv_bias=True,
    qk_norm=True,
    norm_scale_plus_one=True,
    attn_logit_softcap=5.0,
    final_logit_softcap=3.0,
    post_norms=True,
    sliding_window=3,
    scale_embeddings=True,
    tie_embeddings=False,
    mlp_activation="gelu_tanh",
    query_scale=0.1,
    rope_llama3_scaling=(8.0, 1.0, 4.0, 64),
)
CONFIGS = {"tiny": TINY, "features": FEATURES, "mqa": TINY.replace(num_kv_heads=1)}


def _model(cfg, seed=0):
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    if cfg.norm_scale_plus_one or cfg.qkv_bias:
        # Zero-initialised biases and (1+w) norm scales would hide wiring mistakes: randomise.
        state = nnx.state(model, nnx.Param)
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        leaves = [
            x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
            for x, k in zip(leaves, keys, strict=True)
        ]
        nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


@nnx.jit
def _fwd(model, ids, mask=None):
    return model(ids, mask_BT=mask)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decode_matches_full_forward(name):
    cfg = CONFIGS[name]
    model = _model(cfg)
    p, g, tp, n = 2, 3, 6, 7
    prompt_lens = np.array([6, 4])
    rng = np.random.default_rng(0)
    prompts = rng.integers(4, cfg.vocab_size, (p, tp))
    mask = np.arange(tp)[None] >= (tp - prompt_lens)[:, None]  # left padded
    cont = rng.integers(4, cfg.vocab_size, (p * g, n))  # a different continuation per sample

    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    graphdef, state = nnx.split(model)
    prefill = jax.jit(lambda st, ids, m: nnx.merge(graphdef, st)(ids, mask_BT=m, return_kv=True))
    decode = jax.jit(lambda st, tok, pos, c: nnx.merge(graphdef, st).decode(tok, pos, c))
    _, kvs = prefill(state, jnp.asarray(prompts), jnp.asarray(mask))
    cache = kv_cache.from_prefill(kvs, jnp.asarray(mask), jnp.asarray(positions), g, 8)
    prompt_len_b = np.repeat(prompt_lens, g)
    cached = []
    for t in range(n):
        logits, cache = decode(state, jnp.asarray(cont[:, t]), jnp.asarray(prompt_len_b + t), cache)
        cached.append(np.asarray(logits))
    cached = np.stack(cached, 1)

    # Reference: each sample's own unpadded sequence, right-padded into one batch, through the
    # full forward pass (no cache, no left padding, no prompt sharing).
    width = tp + n
    rows = np.zeros((p * g, width), np.int64)
    row_mask = np.zeros((p * g, width), bool)
    for b in range(p * g):
        row = np.concatenate([prompts[b // g][tp - prompt_lens[b // g] :], cont[b]])
        rows[b, : len(row)], row_mask[b, : len(row)] = row, True
    full = np.asarray(model(jnp.asarray(rows), mask_BT=jnp.asarray(row_mask)))
    for b in range(p * g):
        start = prompt_lens[b // g]
        np.testing.assert_allclose(cached[b], full[b, start : start + n], atol=1e-5, rtol=1e-5)


def test_causal():
    model = _model(FEATURES)
    ids = jax.random.randint(jax.random.key(0), (2, 10), 0, FEATURES.vocab_size)
    changed = ids.at[:, 6:].set((ids[:, 6:] + 1) % FEATURES.vocab_size)
    a, b = _fwd(model, ids), _fwd(model, changed)
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert np.abs(np.asarray(a[:, 6:] - b[:, 6:])).max() > 1e-3


def test_left_padding_is_invisible():
    model = _model(FEATURES)
    ids = jax.random.randint(jax.random.key(1), (1, 8), 4, FEATURES.vocab_size)
    padded = jnp.concatenate([jnp.zeros((1, 5), jnp.int32), ids], axis=1)
    mask = jnp.arange(13)[None] >= 5
    np.testing.assert_allclose(_fwd(model, padded, mask)[:, 5:], _fwd(model, ids), atol=1e-5)


def test_sliding_window_limits_attention():
    cfg = TINY.replace(sliding_window=2, sliding_window_every=1)
    model = _model(cfg)
    ids = jax.random.randint(jax.random.key(2), (1, 8), 4, cfg.vocab_size)
    # With a window of 2 on every layer of a 2-layer model, position 7 sees positions 5..7 only
    # (two hops of one step back), so token 0..4 cannot influence it.
    changed = ids.at[:, :5].set((ids[:, :5] + 7) % cfg.vocab_size)
    a, b = _fwd(model, ids), _fwd(model, changed)
    np.testing.assert_allclose(a[:, 7], b[:, 7], atol=1e-6)
    assert np.abs(np.asarray(a[:, 5] - b[:, 5])).max() > 1e-4


def test_bfloat16_runs_and_tracks_float32():
    model = _model(TINY)
    bf16 = Transformer(TINY.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(bf16, nnx.state(model))
    ids = jax.random.randint(jax.random.key(3), (2, 12), 0, TINY.vocab_size)
    a, b = _fwd(model, ids), _fwd(bf16, ids)
    assert b.dtype == jnp.float32  # logits stay float32 for the loss
    assert np.abs(np.asarray(a - b)).max() < 0.05


@pytest.mark.parametrize("name", sorted(PUBLISHED_NUM_PARAMS))
def test_real_presets_build_abstractly_with_published_size(name):
    cfg = PRESETS[name]
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    published = PUBLISHED_NUM_PARAMS[name]
    assert abs(count - published) / published < 0.01, (count, published)
    assert count == cfg.num_params()
    dtypes = {x.dtype for x in jax.tree.leaves(params)}
    assert dtypes == {jnp.dtype(cfg.param_dtype)}


def test_params_carry_logical_axis_names():
    abstract = nnx.eval_shape(lambda: Transformer(FEATURES, rngs=nnx.Rngs(0)))
    names = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        key = ".".join(map(str, path))
        names[key] = var.get_metadata()["out_sharding"]
        assert len(names[key]) == len(var.shape), key  # one name per dimension
    assert names["embedding"] == ("vocab", "embed")
    assert names["lm_head"] == ("embed", "vocab")
    assert names["layers.0.attn.q_proj"] == ("embed", "q_heads", "head_dim")
    assert names["layers.0.attn.k_proj"] == ("embed", "kv_heads", "head_dim")
    assert names["layers.1.mlp.down"] == ("mlp", "embed")


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        TINY.replace(num_heads=3)
    with pytest.raises(ValueError, match="Unknown model preset"):
        get_config("gpt-5")
    with pytest.raises(ValueError, match="mlp_activation"):
        TINY.replace(mlp_activation="relu2")
