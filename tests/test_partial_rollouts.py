"""Partial rollouts (sampling.partial_rollout_steps, rl_reason/rollout/partial.py).

With unchanged weights a carried sample's tokens are those one call draws for its key: resuming
it in a later call changes nothing (its kept cache, one device) or only float rounding (a
rebuilt cache, or a mesh), on one device and on a 2x2x2 mesh (tests/multidevice/). In
training, step 1 is the on-policy engine's step, later steps train on tokens up to k versions
old whose ratio sees the lag, and a checkpoint holds the batches in flight, so a resumed run
continues bit for bit.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from models import Transformer, get_config
from rl_reason import verifiers
from rl_reason.infra import data
from rl_reason.infra.checkpoint import Checkpointer
from rl_reason.infra.tokenizer import train_sentencepiece
from rl_reason.tasks import arithmetic
from rl_reason.tasks.templates import SPECIAL_TOKENS
from rl_reason.trainer import GRPOConfig, GRPOTrainer
from tests.multidevice import partial_meshes as pm

TASK = arithmetic.ArithmeticTask(arithmetic.ArithmeticConfig(max_value=9, max_ops=3))
TIMING = ("time_", "generated_tokens_per_s")


def multidevice_needs(params: dict) -> list[str]:
    return ["partial/2x2x2"]


CACHES = ("keep", "rebuild")


@pytest.fixture(scope="module")
def one_device():
    runs = {}

    def get(cache):
        if cache not in runs:
            runs[cache] = pm.run(pm.make_mesh("1x1x1"), cache)
        return runs[cache]

    return get


def _steps(got) -> int:
    return sum(k.startswith("tokens/") for k in got)


def _check_against_one_call(got, exact: bool):
    carried = 0
    for s in range(_steps(got)):
        np.testing.assert_array_equal(got[f"tokens/{s}"], got[f"ref_tokens/{s}"])
        np.testing.assert_array_equal(got[f"lengths/{s}"], got[f"ref_lengths/{s}"])
        # On one device a kept cache is the one call's own; a rebuilt one, or another
        # batching of the matmuls on a mesh, differs by float32 rounding.
        assert got[f"gap/{s}"] == 0.0 if exact else got[f"gap/{s}"] < 1e-5
        versions = got[f"versions/{s}"]
        # Every completion token has its version; none is older than steps_ahead.
        lengths = got[f"lengths/{s}"]
        cols = np.arange(versions.shape[1])[None]
        assert np.array_equal(versions >= 0, cols < lengths[:, None])
        assert versions[versions >= 0].min() >= s - pm.AHEAD
        carried += int(np.sum(np.any((versions >= 0) & (versions < s), axis=1)))
    assert carried > 5  # the check is not vacuous: samples crossed calls
    return carried


@pytest.mark.parametrize("cache", CACHES)
def test_carried_samples_draw_what_one_call_draws(one_device, cache):
    got = one_device(cache)
    _check_against_one_call(got, exact=cache == "keep")
    # Occupancy: the slots stay busy, the tail of a batch covered by the later batches.
    occ = [got[f"counts/{s}"][1] / got[f"counts/{s}"][0] for s in range(pm.STEPS)]
    assert min(occ) > 0.95, occ


@pytest.mark.slow
@pytest.mark.parametrize("cache", CACHES)
def test_carried_samples_on_a_2x2x2_mesh(multidevice, one_device, cache):
    got = dict(np.load(multidevice.result("partial/2x2x2") / f"2x2x2_{cache}.npz"))
    _check_against_one_call(got, exact=False)
    for s in range(_steps(got)):  # and the one-device tokens
        np.testing.assert_array_equal(got[f"tokens/{s}"], one_device(cache)[f"tokens/{s}"])


# -- training --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = train_sentencepiece(
        TASK.pretraining_corpus(0, 600, frac_worked=0.5),
        tmp_path_factory.mktemp("tok") / "tok.model",
        vocab_size=128,
        user_defined_symbols=SPECIAL_TOKENS,
    )
    with verifiers.VerifierPool(1) as pool:
        yield tok, pool


def _trainer(setup, *, partial_steps, steps, checkpointer=None, cache="keep"):
    tok, pool = setup
    model = Transformer(get_config("tiny").replace(vocab_size=128), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    cfg = GRPOConfig(
        steps=steps,
        prompts_per_step=4,
        group_size=4,
        max_prompt_len=64,
        max_new_tokens=48,
        checkpoint_every=1,
        verifier_workers=1,
        sampling=dict(
            engine="continuous",
            engine_slots=8,
            partial_rollout_steps=partial_steps,
            partial_rollout_cache=cache,
        ),
        loss=dict(kl_coef=0.05),
        optim=dict(learning_rate=3e-3),
        # The random model earns no correctness reward; the overlong penalty's gives the
        # groups reward variance, so the weights move.
        reward=dict(overlong_buffer=40),
    )
    return GRPOTrainer(
        cfg,
        graphdef=graphdef,
        params=params,
        tokenizer=tok,
        task=TASK,
        train_batches=data.train_iterator(TASK.eval_set(3, 40), global_batch_size=4, seed=0),
        pool=pool,
        checkpointer=checkpointer,
        # Rare stops in a 48-token budget: long, uneven completions of the random model.
        stop_token_ids=(5, 77),
    )


def _clean(history):
    return [{k: v for k, v in m.items() if not k.startswith(TIMING)} for m in history]


@pytest.mark.slow
def test_first_step_is_the_engines_then_the_ratio_sees_the_lag(setup):
    on = _clean(_trainer(setup, partial_steps=0, steps=2).train())
    part = _clean(_trainer(setup, partial_steps=1, steps=2).train())
    # Step 1: the same examples, keys and weights, so the same completions and rewards.
    for k in ("reward_mean", "accuracy", "response_length_mean", "truncated_frac"):
        assert part[0][k] == on[0][k], k
    assert part[0]["partial_stale_sample_frac"] == 0.0
    assert all(m["kl_old"] < 1e-6 for m in on)
    # Later steps train on samples begun under the previous weights: the ratio against the
    # sampler's log-probs is no longer 1, and staleness is at most one version.
    assert all(m["partial_stale_sample_frac"] > 0 for m in part[1:])
    assert all(0 < m["partial_staleness_mean"] <= 1 for m in part[1:])
    assert all(m["kl_old"] > 1e-6 for m in part[1:])
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in part)


@pytest.mark.slow
@pytest.mark.parametrize("cache", CACHES)
def test_partial_rollouts_resume_bit_for_bit(setup, tmp_path, cache):
    run = lambda steps, ckpt=None: _trainer(
        setup, partial_steps=2, steps=steps, checkpointer=ckpt, cache=cache
    )
    straight = run(4)
    want = _clean(straight.train())
    first = run(2, Checkpointer(tmp_path, save_every=1))
    first.train()
    first.checkpointer.close()
    resumed = run(4, Checkpointer(tmp_path, save_every=1))
    meta = resumed.resume()
    assert meta is not None and resumed.step_count == 2
    got = _clean(resumed.train())
    resumed.checkpointer.close()
    assert got == want[2:]
    assert any(m["partial_stale_sample_frac"] > 0 for m in got)
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "extra, match",
    [
        (dict(sampling=dict(partial_rollout_steps=1)), "engine='continuous'"),
        (
            dict(sampling=dict(engine="continuous", partial_rollout_steps=1), off_policy_steps=1),
            "off_policy_steps",
        ),
        (
            dict(
                sampling=dict(engine="continuous", partial_rollout_steps=1, dynamic_sampling=True)
            ),
            "dynamic_sampling",
        ),
        (
            dict(
                sampling=dict(engine="continuous", partial_rollout_steps=1),
                loss=dict(recompute_old_logprobs=True),
            ),
            "recompute_old_logprobs",
        ),
        (
            dict(sampling=dict(engine="continuous", partial_rollout_cache="reuse")),
            "partial_rollout_cache",
        ),
    ],
)
def test_partial_rollouts_refuse_what_they_cannot_do(extra, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**extra)
