"""One-step-off-policy pipelining (GRPOConfig.off_policy_steps=1).

Step 1 trains on the same round as the on-policy loop; from step 2 on, each step trains on a
round sampled with the weights before the previous update, so the importance ratio against the
sampler's log-probs is no longer 1. A checkpoint holds the round in flight, so a resumed
pipelined run continues bit for bit.
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

pytestmark = pytest.mark.slow

TASK = arithmetic.ArithmeticTask(arithmetic.ArithmeticConfig(max_value=9, max_ops=3))
TIMING = ("time_", "generated_tokens_per_s")


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


def _trainer(setup, *, off_policy, steps, checkpointer=None, dtype="float32", recompute=False):
    tok, pool = setup
    model_cfg = get_config("tiny").replace(vocab_size=128, dtype=dtype)
    model = Transformer(model_cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    cfg = GRPOConfig(
        steps=steps,
        prompts_per_step=4,
        group_size=4,
        max_prompt_len=64,
        max_new_tokens=16,
        off_policy_steps=off_policy,
        checkpoint_every=1,
        verifier_workers=1,
        loss=dict(
            kl_coef=0.05,
            recompute_old_logprobs=recompute,
        ),
        optim=dict(learning_rate=3e-3),
        reward=dict(overlong_buffer=12),
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
        stop_token_ids=tuple(range(5, 128, 9)),
    )


def _clean(history):
    return [{k: v for k, v in m.items() if not k.startswith(TIMING)} for m in history]


def test_first_step_is_on_policy_then_the_ratio_sees_the_lag(setup):
    on = _clean(_trainer(setup, off_policy=0, steps=3).train())
    off = _clean(_trainer(setup, off_policy=1, steps=3).train())
    assert off[0] == on[0]  # the same round and weights
    # On-policy with one update per step, sampler and trainer weights agree: KL to the old
    # policy is float noise. One step off, the sampler's weights lag by an update.
    assert all(m["kl_old"] < 1e-6 for m in on)
    assert all(m["kl_old"] > 1e-5 for m in off[1:])
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in off)


def test_pipelined_run_resumes_bit_for_bit(setup, tmp_path):
    straight = _trainer(setup, off_policy=1, steps=4)
    want = _clean(straight.train())
    first = _trainer(
        setup, off_policy=1, steps=2, checkpointer=Checkpointer(tmp_path, save_every=1)
    )
    first.train()
    first.checkpointer.close()
    resumed = _trainer(
        setup, off_policy=1, steps=4, checkpointer=Checkpointer(tmp_path, save_every=1)
    )
    meta = resumed.resume()
    assert meta is not None and resumed.step_count == 2
    got = _clean(resumed.train())
    resumed.checkpointer.close()
    assert got == want[2:]
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_off_policy_refuses_dynamic_sampling():
    with pytest.raises(ValueError, match="dynamic_sampling"):
        GRPOConfig(
            off_policy_steps=1,
            sampling=dict(dynamic_sampling=True),
        )
    with pytest.raises(ValueError, match="off_policy_steps"):
        GRPOConfig(off_policy_steps=2)


def test_sampler_trainer_logprob_gap_is_logged_and_grows_in_bf16(setup):
    gaps = {}
    for dtype in ("float32", "bfloat16"):
        history = _trainer(setup, off_policy=0, steps=1, dtype=dtype, recompute=True).train()
        gaps[dtype] = history[0]["logprob_gap_sampler_trainer"]
    assert 0 <= gaps["float32"] < 1e-4
    assert gaps["bfloat16"] > 10 * max(gaps["float32"], 1e-6)
