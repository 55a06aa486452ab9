"""Multi-turn rollouts in the engine: a turn-end token makes the sample wait, the host's
observation is emitted through the slot's cache, decoding goes on.

Checked against an independent reference that recomputes the whole context (prompt,
completion, observations) at every token, with no cache at all: the same tokens, and the
same log-probs up to float32 rounding, whatever the slot count. Without turns the engine
is the single-turn sampler, bit for bit.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import Transformer, get_config
from rl_reason.rollout import engine, sampling, token_choice
from rl_reason.rollout.sampling import SamplingConfig
from tests.multidevice import multi_turn_meshes, partial_meshes

CFG = get_config("tiny").replace(vocab_size=64, max_seq_len=4096)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13], [14, 15, 16, 17]]
G = 4
BUDGET = 60
CONFIG = SamplingConfig(temperature=1.0, stop_token_ids=(3,))
KEY = jax.random.key(11)
KW = dict(group_size=G, max_new_tokens=BUDGET, config=CONFIG, buffer_len=64)
TURN = 36  # a token the sharpened model draws in about half the rows


@pytest.fixture(scope="module")
def model():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    # Peaked next-token distributions (as tests/test_engine.py): float32 rounding of the
    # differently batched matmuls never moves a draw.
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 8, params))
    return nnx.split(model)


def observation(row: int, call: int) -> tuple[list[int], bool]:
    """The test environment: call k of row r gets 3 + (r % 3) tokens; rows 0 mod 5 are ended
    at their third call, the others go on."""
    ids = [40 + call, 41 + row % 7] + [42] * (1 + row % 3)
    return ids, row % 5 == 0 and call >= 3


class Host:
    def __init__(self, stop_ids=(TURN,), reply=observation):
        self.stop_ids, self.reply = stop_ids, reply
        self.calls: collections.Counter = collections.Counter()

    def answer(self, rows, tokens, lengths):
        out = []
        for r, row_tokens, n in zip(rows, tokens, lengths, strict=True):
            r = int(r)
            assert row_tokens[n - 1] in self.stop_ids  # the turn ends at its marker
            self.calls[r] += 1
            out.append(self.reply(r, self.calls[r]))
        return out


def reference(model, turn_id: int, reply=observation):
    """Every row decoded on its own terms, the whole context (prompt, tokens, observations)
    run through the model at every token: no cache. Rows advance together only to share one
    jitted call; each reads its logits at its own last token (causal: the padding after it is
    never attended)."""
    m = nnx.merge(*model)
    b = len(PROMPTS) * G
    width = max(map(len, PROMPTS)) + BUDGET
    logits_at = jax.jit(lambda ids, at: m(ids)[jnp.arange(ids.shape[0]), at])
    keys = token_choice.sample_keys(KEY, jnp.arange(b, dtype=jnp.int32))
    prompts = [PROMPTS[r // G] for r in range(b)]
    tokens, slp, plp = [[] for _ in range(b)], [[] for _ in range(b)], [[] for _ in range(b)]
    pending, calls, stopped = [[] for _ in range(b)], [0] * b, [False] * b
    done = [False] * b
    while not all(done):
        ids = np.zeros((b, width), np.int32)
        for r in range(b):
            ctx = prompts[r] + tokens[r]
            ids[r, : len(ctx)] = ctx
        at = np.asarray([len(prompts[r]) + len(tokens[r]) - 1 for r in range(b)], np.int32)
        logits = logits_at(jnp.asarray(ids), jnp.asarray(at))
        position = jnp.asarray([len(t) for t in tokens], jnp.int32)
        drawn = [np.asarray(x) for x in token_choice.choose_tokens(logits, keys, position, CONFIG)]
        for r in range(b):
            if done[r]:
                continue
            if pending[r]:
                tokens[r].append(pending[r].pop(0))
                slp[r].append(0.0)
                plp[r].append(0.0)
            else:
                tokens[r].append(int(drawn[0][r]))
                slp[r].append(float(drawn[1][r]))
                plp[r].append(float(drawn[2][r]))
                if tokens[r][-1] in CONFIG.stop_token_ids:
                    stopped[r] = done[r] = True
                elif tokens[r][-1] == turn_id and len(tokens[r]) < BUDGET:
                    calls[r] += 1
                    obs, end = reply(r, calls[r])
                    stopped[r] = done[r] = end
                    pending[r] = [] if end else list(obs)
            done[r] = done[r] or len(tokens[r]) >= BUDGET
    return list(zip(tokens, slp, plp, stopped, calls, strict=True))


@pytest.fixture(scope="module")
def ref(model):
    return reference(model, TURN)


@pytest.mark.parametrize("slots", [0, 4])
def test_cache_continuation_equals_recomputing_the_context(model, ref, slots):
    host = Host()
    eng = engine.EngineConfig(slots=slots, min_slots=2)
    out = engine.sample(model, PROMPTS, KEY, engine=eng, turns=host, stream_steps=8, **KW)
    s = jax.tree.map(np.asarray, out.sample)
    calls = [c for *_, c in ref]
    # The case means something: rows call 0, 1, 2 and 3 times, some are ended by the host,
    # some run out of budget.
    assert {0, 1, 2, 3} <= set(calls), calls
    assert dict(host.calls) == {r: c for r, c in enumerate(calls) if c}
    for r, (tokens, slp, plp, stopped, _) in enumerate(ref):
        n = len(tokens)
        assert int(s.lengths[r]) == n, r
        np.testing.assert_array_equal(s.tokens[r, :n], tokens)
        np.testing.assert_allclose(s.sample_logprobs[r, :n], slp, atol=2e-4, rtol=2e-4)
        np.testing.assert_allclose(s.policy_logprobs[r, :n], plp, atol=2e-4, rtol=2e-4)
        assert bool(s.truncated[r]) == (not stopped), r
    assert int(out.live_slot_steps) == int(s.lengths.sum()) - s.lengths.size


def test_without_answers_it_is_the_single_turn_sampler(model):
    static = jax.tree.map(np.asarray, sampling.sample(model, PROMPTS, KEY, **KW))
    never = CFG.vocab_size + 1  # past the vocabulary: never drawn
    # Turn markers the policy never draws, or that are also stop tokens (the stop wins), in
    # one rollout: the environment is never asked, and every array is the single-turn one,
    # bit for bit.
    host = Host(stop_ids=(never, *CONFIG.stop_token_ids))
    eng = engine.EngineConfig(slots=0, min_slots=2)
    out = engine.sample(model, PROMPTS, KEY, engine=eng, turns=host, stream_steps=8, **KW)
    plain = engine.sample(model, PROMPTS, KEY, engine=eng, **KW)
    assert not host.calls
    # The stop token is drawn: a stop that also ends a turn is really exercised.
    assert not static.truncated.all(), static.lengths
    for name in ("tokens", "mask", "lengths", "truncated", "sample_logprobs"):
        np.testing.assert_array_equal(getattr(out.sample, name), getattr(plain.sample, name))
    np.testing.assert_array_equal(out.sample.tokens, static.tokens)


def test_an_observation_past_the_budget_is_cut_and_the_sample_ends_truncated(model):
    long = lambda row, call: ([44] * 200, False)
    host = Host(reply=long)
    # The engine of test_cache_continuation_equals_recomputing_the_context[0]: its programs
    # again, only the observations' width is new.
    eng = engine.EngineConfig(slots=0, min_slots=2)
    out = engine.sample(model, PROMPTS, KEY, engine=eng, turns=host, stream_steps=8, **KW)
    s = jax.tree.map(np.asarray, out.sample)
    called = sorted(host.calls)
    assert called and all(host.calls[r] == 1 for r in called)
    for r in called:
        turn_end = int(np.flatnonzero(s.tokens[r] == TURN)[0])
        assert s.lengths[r] == BUDGET and s.truncated[r]
        assert (s.tokens[r, turn_end + 1 : BUDGET] == 44).all()
        assert (s.sample_logprobs[r, turn_end + 1 : BUDGET] == 0).all()


def multidevice_needs(params: dict) -> list[str]:
    return ["multi_turn/2x2x2"]


@pytest.mark.slow
def test_multi_turn_on_a_2x2x2_mesh_is_the_one_device_rollout(multidevice):
    # One device, a slot per sample: that refilled slots give the same rollout on one device
    # is test_cache_continuation_equals_recomputing_the_context[4] (against the same reference
    # as [0]); here both slot counts of the 2x2x2 mesh must give this one.
    one = multi_turn_meshes.run(partial_meshes.make_mesh("1x1x1"), slot_counts=(0,))
    got = dict(np.load(multidevice.result("multi_turn/2x2x2") / "2x2x2.npz"))
    # The case means something: rows wait and resume on every batch shard.
    assert (one["calls/0"] > 0).sum() >= 8 and one["calls/0"].max() >= 3
    for slots in multi_turn_meshes.SLOTS:
        for name in ("tokens", "lengths", "calls"):
            np.testing.assert_array_equal(got[f"{name}/{slots}"], one[f"{name}/0"])
        np.testing.assert_allclose(got[f"logprobs/{slots}"], one["logprobs/0"], atol=1e-5)


def test_engine_refuses_turns_it_cannot_run(model):
    with pytest.raises(ValueError, match="stop_ids"):
        engine.sample(model, PROMPTS, KEY, turns=Host(stop_ids=()), **KW)
