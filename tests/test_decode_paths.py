"""The sampler's fast paths against independent references: CDF inversion vs numpy, decoding in
segments of growing cache length vs a full forward pass, the head-major cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import Transformer, get_config, kv_cache
from rl_reason.rollout import sampling
from rl_reason.rollout.sampling import SamplingConfig, decode_segments, inverse_cdf, sample

CFG = get_config("tiny").replace(vocab_size=300)


def test_inverse_cdf_picks_the_token_whose_interval_holds_the_point():
    rng = np.random.default_rng(0)
    # 300 entries: not a multiple of the 128-entry blocks (the padded path), some -inf.
    logits = rng.normal(size=(8, 300)).astype(np.float32) * 2
    logits[:, rng.choice(300, 40, replace=False)] = -np.inf
    p = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    cdf = np.cumsum(p, -1)
    for trial in range(25):
        u = np.random.default_rng(trial).uniform(size=(8,)).astype(np.float32)
        tokens, lp = map(np.asarray, inverse_cdf(jnp.asarray(logits), jnp.asarray(u)))
        rows = np.arange(8)
        assert np.isfinite(logits[rows, tokens]).all()
        # The point (1 - u: see inverse_cdf) lies in the token's CDF interval, up to float32
        # rounding of the running sums.
        lo, hi = cdf[rows, tokens] - p[rows, tokens], cdf[rows, tokens]
        point = 1.0 - u.astype(np.float64)
        assert ((lo - 1e-5 <= point) & (point <= hi + 1e-5)).all(), trial
        np.testing.assert_allclose(lp, np.log(p[rows, tokens]), rtol=1e-5, atol=1e-5)


def test_inverse_cdf_never_draws_a_zero_probability_token_at_the_extremes():
    logits = np.full((4, 256), -np.inf, np.float32)
    logits[0, 0] = 0.0  # one possible token, at the start
    logits[1, 255] = 0.0  # at the very end of the last block
    logits[2, [3, 130]] = [0.0, -30.0]  # the second's mass is below float32 rounding of the sum
    logits[3, :] = 0.0
    for u in (0.0, 1e-7, 0.5, 1.0 - 2**-24):
        tokens, lp = inverse_cdf(jnp.asarray(logits), jnp.full((4,), u, jnp.float32))
        tokens = np.asarray(tokens)
        assert tokens[0] == 0 and tokens[1] == 255 and tokens[2] in (3, 130), (u, tokens)
        assert np.isfinite(np.asarray(lp)).all()
    # u near 0 picks the end of the distribution ((1 - u) * total), u near 1 its start.
    tokens, _ = inverse_cdf(jnp.asarray(logits[3:]), jnp.asarray([0.0], jnp.float32))
    assert int(tokens[0]) == 255


def test_inverse_cdf_frequencies_follow_softmax():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(1, 200)), jnp.float32)
    u = jax.random.uniform(jax.random.key(0), (100_000,))
    tokens = jax.jit(jax.vmap(lambda x: inverse_cdf(logits, x[None])[0][0]))(u)
    freq = np.bincount(np.asarray(tokens), minlength=200) / u.shape[0]
    p = np.asarray(jax.nn.softmax(logits[0]))
    # 5 binomial standard deviations per entry.
    assert (np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / u.shape[0]) + 1e-4).all()


def test_decode_segments():
    assert decode_segments(16, 4) == (16,)
    assert decode_segments(256, 4) == (256,)
    assert decode_segments(1024, 4) == (256, 512, 768, 1024)
    assert decode_segments(1024, 1) == (1024,)
    assert decode_segments(1000, 4) == (336, 672, 1000)
    with pytest.raises(ValueError, match="max_decode_segments"):
        SamplingConfig(max_decode_segments=0)


def test_cache_grow_keeps_written_slots_and_refuses_to_shrink():
    layer = kv_cache.LayerKV(jnp.ones((2, 3, 4, 5)), 2 * jnp.ones((2, 3, 4, 5)))
    cache = kv_cache.KVCache(
        prefix=(layer,),
        prefix_mask=jnp.ones((2, 6), bool),
        prefix_positions=jnp.zeros((2, 6), jnp.int32),
        layers=(layer,),
        index=jnp.asarray(4, jnp.int32),
    )
    grown = kv_cache.grow(cache, 7)
    assert grown.slots == 7 and grown.layers[0].k.shape == (2, 3, 7, 5)
    np.testing.assert_array_equal(grown.layers[0].v[:, :, :4], 2.0)
    np.testing.assert_array_equal(grown.layers[0].k[:, :, 4:], 0.0)
    with pytest.raises(ValueError, match="shrink"):
        kv_cache.grow(cache, 3)


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(0))


def test_segmented_decode_equals_full_forward_and_one_segment(model):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    kw = dict(group_size=2, max_new_tokens=530, buffer_len=768)
    cfg3 = SamplingConfig(max_decode_segments=3)  # caches of 256, 512, 768 slots
    out = jax.tree.map(np.asarray, sample(model, prompts, jax.random.key(0), config=cfg3, **kw))
    assert (out.lengths == 530).all()  # every row crossed two segment boundaries
    one = sample(
        model, prompts, jax.random.key(0), config=SamplingConfig(max_decode_segments=1), **kw
    )
    np.testing.assert_array_equal(out.tokens, np.asarray(one.tokens))
    np.testing.assert_allclose(out.policy_logprobs, np.asarray(one.policy_logprobs), atol=1e-5)

    # Independent path: the full forward pass over prompt + completion, no cache.
    g = 2
    ids = np.concatenate([np.repeat(out.prompt_ids, g, 0), out.tokens], 1)
    mask = np.concatenate([np.repeat(out.prompt_mask, g, 0), out.mask], 1)
    logits = nnx.jit(lambda m, i, k: m(i, mask_BT=k))(model, jnp.asarray(ids), jnp.asarray(mask))
    logp = np.asarray(jax.nn.log_softmax(logits))
    tp = out.prompt_ids.shape[1]
    expected = np.take_along_axis(logp[:, tp - 1 : -1], ids[:, tp:, None], -1)[..., 0]
    np.testing.assert_allclose(out.policy_logprobs * out.mask, expected * out.mask, atol=2e-5)
    # Temperature 1 with no filter: the sampling distribution is the policy.
    np.testing.assert_array_equal(out.sample_logprobs, out.policy_logprobs)


def test_compiled_once_per_segment_layout(model):
    before = sampling.compiled_count()
    for n in (70, 300):
        sample(model, [[1, 2]], jax.random.key(1), max_new_tokens=n, buffer_len=512)
    assert sampling.compiled_count() == before + 1
