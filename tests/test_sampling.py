"""The sampler against independent paths: full forward passes, numpy, repeated prompts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import Transformer, get_config
from rl_reason.rollout import sampling
from rl_reason.rollout.sampling import SamplingConfig, filter_logits, sample

CFG = get_config("tiny").replace(vocab_size=64)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]


@pytest.fixture(scope="module")
def model():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    # Sharper than the default init so that samples and greedy paths are varied, not one
    # repeated token.
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 8, params))
    return model


@nnx.jit
def _fwd(model, ids, mask=None):
    return model(ids, mask_BT=mask)


def _np(out):
    return jax.tree.map(np.asarray, out)


def test_padded_prompts_give_identical_samples(model):
    key = jax.random.key(0)
    a = _np(sample(model, PROMPTS, key, group_size=2, max_new_tokens=12))
    b = _np(sample(model, PROMPTS, key, group_size=2, max_new_tokens=12, prompt_width=32))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    # Different cache widths change float32 reduction order; logits are of order 10 here.
    np.testing.assert_allclose(a.policy_logprobs, b.policy_logprobs, rtol=2e-5, atol=1e-5)
    # Each prompt alone (no padding at width 16 beyond its own) gives the same rows too.
    for i, prompt in enumerate(PROMPTS):
        alone = _np(sample(model, [prompt] * len(PROMPTS), key, group_size=2, max_new_tokens=12))
        np.testing.assert_array_equal(alone.tokens[2 * i : 2 * i + 2], a.tokens[2 * i : 2 * i + 2])


# Group size 2 and a 16-token buffer, as test_padded_prompts_give_identical_samples: the
# same executable.
def test_deterministic_for_a_key_and_different_across_keys(model):
    a = _np(sample(model, PROMPTS, jax.random.key(1), group_size=2, max_new_tokens=16))
    b = _np(sample(model, PROMPTS, jax.random.key(1), group_size=2, max_new_tokens=16))
    c = _np(sample(model, PROMPTS, jax.random.key(2), group_size=2, max_new_tokens=16))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    # The G samples of one prompt differ from each other (independent noise per row).
    assert all(len({tuple(r) for r in a.tokens[g : g + 2]}) > 1 for g in (0, 2, 4))


def test_shared_prefill_equals_repeated_prompts(model):
    key = jax.random.key(3)
    shared = _np(sample(model, PROMPTS, key, group_size=3, max_new_tokens=10))
    repeated = [p for p in PROMPTS for _ in range(3)]
    plain = _np(sample(model, repeated, key, group_size=1, max_new_tokens=10))
    np.testing.assert_array_equal(shared.tokens, plain.tokens)
    np.testing.assert_allclose(shared.policy_logprobs, plain.policy_logprobs, rtol=2e-5, atol=1e-5)
    np.testing.assert_array_equal(shared.lengths, plain.lengths)


def test_policy_logprobs_equal_full_forward(model):
    cfg = SamplingConfig(temperature=0.7, top_k=20, top_p=0.9)
    out = _np(
        sample(model, PROMPTS, jax.random.key(4), group_size=2, max_new_tokens=12, config=cfg)
    )
    g = 2
    ids = np.concatenate([np.repeat(out.prompt_ids, g, 0), out.tokens], 1)
    mask = np.concatenate([np.repeat(out.prompt_mask, g, 0), out.mask], 1)
    logits = _fwd(model, jnp.asarray(ids), jnp.asarray(mask))
    logp = np.asarray(jax.nn.log_softmax(logits))
    tp = out.prompt_ids.shape[1]
    expected = np.take_along_axis(logp[:, tp - 1 : -1], ids[:, tp:, None], -1)[..., 0]
    # The sharpened test model has logits of order 10: float32 rounding is ~1e-5 relative.
    np.testing.assert_allclose(out.policy_logprobs * out.mask, expected * out.mask, atol=5e-5)
    # Sampling log-probs: the filtered, renormalised distribution, from the same full pass.
    b, n = out.tokens.shape
    step_logits = logits[:, tp - 1 : -1].reshape(b * n, -1)
    filtered = jax.nn.log_softmax(filter_logits(step_logits, cfg)).reshape(b, n, -1)
    expected = np.take_along_axis(np.asarray(filtered), out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(
        out.sample_logprobs * out.mask, np.where(out.mask, expected, 0), atol=5e-5
    )
    assert (np.abs(out.sample_logprobs - out.policy_logprobs) * out.mask).max() > 1e-2


def _greedy_reference(model, prompt, n):
    # Right-padded to a fixed width: causal attention makes the padding after t invisible at t.
    ids = np.zeros((1, len(prompt) + n), np.int32)
    ids[0, : len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + n):
        ids[0, t] = int(jnp.argmax(_fwd(model, jnp.asarray(ids))[0, t - 1]))
    return list(ids[0, len(prompt) :])


def test_greedy_top_k1_and_low_temperature_agree(model):
    key = jax.random.key(5)
    greedy = _np(
        sample(model, PROMPTS, key, max_new_tokens=8, config=SamplingConfig(temperature=0.0))
    )
    top1 = _np(
        sample(
            model, PROMPTS, key, max_new_tokens=8, config=SamplingConfig(temperature=1.0, top_k=1)
        )
    )
    cold = _np(
        sample(model, PROMPTS, key, max_new_tokens=8, config=SamplingConfig(temperature=1e-6))
    )
    np.testing.assert_array_equal(greedy.tokens, top1.tokens)
    np.testing.assert_array_equal(greedy.tokens, cold.tokens)
    assert (greedy.sample_logprobs == 0).all() and (top1.sample_logprobs == 0).all()
    # And greedy equals argmax decoding with full forward passes, no cache.
    assert list(greedy.tokens[1, :8]) == _greedy_reference(model, PROMPTS[1], 8)
    assert len(set(greedy.tokens[1, :8])) > 1  # a path that could have gone wrong


def _numpy_nucleus(logits, top_p):
    order = np.argsort(-logits, kind="stable")
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    keep, mass = [], 0.0
    for i in order:
        keep.append(i)
        mass += probs[i]
        if mass >= top_p:
            break
    return set(keep)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_top_p_keeps_exactly_the_smallest_nucleus(top_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 40)).astype(np.float32) * 3
    filtered = np.asarray(filter_logits(jnp.asarray(logits), SamplingConfig(top_p=top_p)))
    for row in range(6):
        kept = set(np.flatnonzero(np.isfinite(filtered[row])))
        assert kept == _numpy_nucleus(logits[row], top_p), row


def test_top_k_keeps_k_largest():
    logits = jnp.asarray([[0.1, 3.0, -1.0, 2.0, 0.5]])
    filtered = np.asarray(filter_logits(logits, SamplingConfig(top_k=2, temperature=0.5)))
    assert set(np.flatnonzero(np.isfinite(filtered[0]))) == {1, 3}
    np.testing.assert_allclose(filtered[0, [1, 3]], [6.0, 4.0])


def test_sampling_frequencies_follow_the_distribution():
    # One decode step from a fixed distribution: categorical sampling of the filtered logits.
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    cfg = SamplingConfig(top_p=0.8)  # nucleus {0, 1}: renormalised to 0.625 / 0.375
    keys = jax.random.split(jax.random.key(0), 4000)
    choose = lambda k: sampling.choose_tokens(logits, k[None], jnp.zeros(1, int), cfg)[0][0]
    tokens = jax.vmap(choose)(keys)
    freq = np.bincount(np.asarray(tokens), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)


def test_rows_end_at_stop_tokens_and_rest_is_masked(model):
    key = jax.random.key(6)
    free = _np(sample(model, PROMPTS, key, group_size=2, max_new_tokens=16))
    stop = int(free.tokens[0, 3])  # a token the first row emits at step 3
    pad = 0
    out = _np(
        sample(
            model,
            PROMPTS,
            key,
            group_size=2,
            max_new_tokens=16,
            pad_id=pad,
            config=SamplingConfig(stop_token_ids=(stop,)),
        )
    )
    for row in range(out.tokens.shape[0]):
        seq = list(free.tokens[row])
        end = seq.index(stop) + 1 if stop in seq else 16
        assert out.lengths[row] == end
        np.testing.assert_array_equal(out.tokens[row, :end], free.tokens[row, :end])
        assert (out.tokens[row, end:] == pad).all()
        assert out.mask[row, :end].all() and not out.mask[row, end:].any()
        assert (out.policy_logprobs[row, end:] == 0).all()
        assert out.truncated[row] == (stop not in seq)
    assert out.lengths[0] == 4 and not out.truncated[0]
    assert out.truncated.any()  # some rows never emit the stop token: both ends are checked


def test_budget_is_traced_and_buffer_bucketed(model):
    before = sampling.compiled_count()
    for n in (5, 9, 13):
        out = _np(sample(model, PROMPTS, jax.random.key(7), max_new_tokens=n, buffer_len=16))
        assert (out.lengths == n).all() and out.truncated.all()
        assert not out.mask[:, n:].any()
    assert sampling.compiled_count() == before + 1
    # Prompt widths are bucketed: lengths 3..5 and 9 share the width-16 executable.
    sample(model, [[1] * 9], jax.random.key(7), max_new_tokens=5, buffer_len=16)
    assert sampling.pad_prompts([[1] * 9], 0)[0].shape == (1, 16)


def test_bad_arguments_fail_early(model):
    with pytest.raises(ValueError, match="empty"):
        sample(model, [[1], []], jax.random.key(0), max_new_tokens=4)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="buffer_len"):
        sample(model, [[1]], jax.random.key(0), max_new_tokens=40, buffer_len=16)
