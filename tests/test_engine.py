"""The continuous-batching engine against the static sampler: for the same key the same tokens
and log-probs, whatever the slot count, on very uneven lengths, with truncation and stop tokens,
and at budgets of thousands of tokens; its counters against what they must read."""

import jax
import numpy as np
import pytest
from flax import nnx

from models import Transformer, get_config
from rl_reason.rollout import engine, sampling
from rl_reason.rollout.sampling import SamplingConfig

CFG = get_config("tiny").replace(vocab_size=64, max_seq_len=4096)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13], [14, 15, 16, 17]]
G = 4
# Stop tokens that a sharpened random model emits at uneven times: lengths from 1 to the budget.
STOPS = (3, 9, 17, 30)


@pytest.fixture(scope="module")
def model():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    # Sharper than the default init: peaked next-token distributions, so that float32 rounding
    # of differently batched matmuls never moves a draw across a CDF boundary here.
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 8, params))
    return nnx.split(model)


def _np(out):
    return jax.tree.map(np.asarray, out)


def _assert_same(static, eng):
    np.testing.assert_array_equal(eng.tokens, static.tokens)
    np.testing.assert_array_equal(eng.mask, static.mask)
    np.testing.assert_array_equal(eng.lengths, static.lengths)
    np.testing.assert_array_equal(eng.truncated, static.truncated)
    np.testing.assert_allclose(eng.sample_logprobs, static.sample_logprobs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eng.policy_logprobs, static.policy_logprobs, rtol=1e-5, atol=1e-5)


# (Temperature 1 without filters, refilled: tests/test_sharding.py, on one device too.)
CONFIGS = {
    "truncated": SamplingConfig(temperature=0.7, top_k=20, top_p=0.9, stop_token_ids=STOPS),
    "greedy": SamplingConfig(temperature=0.0, stop_token_ids=STOPS),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_engine_gives_the_static_samplers_tokens(model, name):
    cfg, key = CONFIGS[name], jax.random.key(11)
    kw = dict(group_size=G, max_new_tokens=120, config=cfg, buffer_len=128)
    static = _np(sampling.sample(model, PROMPTS, key, **kw))
    lengths = static.lengths
    assert lengths.max() >= 3 * max(np.median(lengths), 1), lengths  # uneven, or it means little
    # One slot per sample (the tail packed down to 2), and 4 slots refilled 3 times over.
    for slots in (0, 4):
        eng = engine.EngineConfig(slots=slots, min_slots=2)
        out = engine.sample(model, PROMPTS, key, engine=eng, **kw)
        _assert_same(static, _np(out.sample))
        # Every live slot-step emits one token (the first tokens come from the prefill): the
        # counters add up to the tokens written.
        assert int(out.live_slot_steps) == int(lengths.sum()) - lengths.size
        assert int(out.slot_steps) >= int(out.live_slot_steps)
        if slots:
            # Refilled slots: more decode steps than the longest sample, fewer than one a token.
            assert lengths.max() - 1 <= int(out.decode_steps) < lengths.sum() - lengths.size


def test_streamed_samples_come_once_as_they_finish_and_change_nothing(model):
    # Finished samples handed to the host every 8 decode steps while the others decode: the
    # same tokens and log-probs as the one-call engine, each sample once with its final
    # tokens, and the short ones long before the call ends.
    cfg, key = CONFIGS["truncated"], jax.random.key(11)
    kw = dict(group_size=G, max_new_tokens=120, config=cfg, buffer_len=128)
    eng = engine.EngineConfig(slots=4, min_slots=2)
    whole = _np(engine.sample(model, PROMPTS, key, engine=eng, **kw))
    got = []
    kw.update(engine=eng, on_finished=got.append, stream_steps=8)
    out = _np(engine.sample(model, PROMPTS, key, **kw))
    _assert_same(whole.sample, out.sample)
    assert int(out.decode_steps) == int(whole.decode_steps)
    rows = np.concatenate([f.rows for f in got])
    assert sorted(rows.tolist()) == list(range(len(PROMPTS) * G))  # each sample exactly once
    for f in got:
        np.testing.assert_array_equal(f.tokens, out.sample.tokens[f.rows])
        np.testing.assert_array_equal(f.lengths, out.sample.lengths[f.rows])
        np.testing.assert_array_equal(f.truncated, out.sample.truncated[f.rows])
        assert f.decode_steps <= int(out.decode_steps)
    assert len(got) >= 4 and got[0].decode_steps <= int(out.decode_steps) // 4
    steps = [f.decode_steps for f in got]
    assert steps == sorted(set(steps))  # one hand-over per look that found new ones


def test_thousands_of_tokens_with_a_long_tail():
    # A less sharp model with a stop-token bias: lengths from ~100 to the budget of 2,400.
    net = Transformer(CFG, rngs=nnx.Rngs(0))
    nnx.update(net, jax.tree.map(lambda x: x * 2, nnx.state(net, nnx.Param)))
    # One decode segment (a single cache width): fewer loops to compile.
    cfg = SamplingConfig(stop_token_ids=(3,), logit_bias=((3, -2.0),), max_decode_segments=1)
    key = jax.random.key(5)
    kw = dict(group_size=G, max_new_tokens=2400, config=cfg, buffer_len=2400)
    static = _np(sampling.sample(nnx.split(net), PROMPTS, key, **kw))
    out = engine.sample(nnx.split(net), PROMPTS, key, engine=engine.EngineConfig(slots=4), **kw)
    _assert_same(static, _np(out.sample))
    lengths = np.sort(static.lengths)
    assert lengths[-1] == 2400 and static.truncated.sum() == 1, lengths
    assert lengths[-2] > 2000 and lengths[-2] > 4 * np.median(lengths), lengths
    assert int(out.live_slot_steps) == int(lengths.sum()) - lengths.size


def test_uniform_lengths_fill_every_slot(model):
    kw = dict(group_size=G, max_new_tokens=24, config=SamplingConfig())
    key = jax.random.key(2)
    static = _np(sampling.sample(model, PROMPTS, key, **kw))
    for slots, steps in [(0, 23), (8, 46)]:
        # Nothing to pack when every sample ends at the same step: one slot level.
        eng = engine.EngineConfig(slots=slots, min_slots=slots or 16)
        out = engine.sample(model, PROMPTS, key, engine=eng, **kw)
        _assert_same(static, _np(out.sample))
        # 16 samples of 24 tokens, the first of each from the prefill: 23 steps on 16 slots,
        # or 2 x 23 on 8, every slot always live.
        assert int(out.decode_steps) == steps
        assert out.slot_occupancy == 1.0


def test_tail_packing_levels():
    assert engine.slot_levels(64, 4, 1) == (64, 32, 16, 8, 4)
    assert engine.slot_levels(64, 4, 8) == (64, 32, 16, 8)  # never below one slot per shard
    assert engine.slot_levels(24, 1, 1) == (24, 12, 6, 3)  # halving stops at an odd count
    assert engine.slot_levels(8, 8, 1) == (8,)
    assert engine.default_min_slots(64, 1) == 4 and engine.default_min_slots(64, 8) == 8


def test_bad_engine_options_fail_early(model):
    with pytest.raises(ValueError, match="slots must be >= 0"):
        engine.EngineConfig(slots=-1)
    with pytest.raises(ValueError, match="min_slots"):
        engine.EngineConfig(min_slots=-2)
    with pytest.raises(ValueError, match="stream_steps must be >= 1"):
        kw = dict(max_new_tokens=4, on_finished=print, stream_steps=0)
        engine.sample(model, PROMPTS, jax.random.key(0), **kw)
    with pytest.raises(ValueError, match="group_size"):
        engine.sample(model, PROMPTS, jax.random.key(0), group_size=0, max_new_tokens=4)


def test_logit_bias_shifts_only_the_sampling_distribution(model):
    # A large bias on one token makes it the greedy choice at every step; the policy log-prob
    # of the chosen token is still the unbiased model's.
    cfg = SamplingConfig(temperature=0.0, logit_bias=((42, 1e4),))
    out = _np(sampling.sample(model, PROMPTS, jax.random.key(0), max_new_tokens=5, config=cfg))
    assert (out.tokens[:, :5] == 42).all()
    # The 5th biased token's policy log-prob = the model's log-prob of 42 after four 42s: one
    # forward pass over the prompts right-padded to one width (causal: the padding after a
    # row's last token is never attended), each row read at its own last token.
    graphdef, params = model
    net = nnx.merge(graphdef, params)
    ids = np.zeros((len(PROMPTS), max(map(len, PROMPTS)) + 4), np.int32)
    for i, p in enumerate(PROMPTS):
        ids[i, : len(p) + 4] = p + [42] * 4
    last = np.asarray([len(p) + 3 for p in PROMPTS])
    logits = net(ids)[np.arange(len(PROMPTS)), last]
    want = np.asarray(jax.nn.log_softmax(logits))[:, 42]
    np.testing.assert_allclose(out.policy_logprobs[:, 4], want, rtol=1e-5, atol=1e-5)
    assert (
        out.sample_logprobs[:, :5] == 0
    ).all()  # greedy: the sampling distribution is a point mass
