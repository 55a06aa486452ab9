"""The new algorithms through the whole GRPO loop: REINFORCE++-baseline with its KL folded into
the return (the reference policy exists without loss.kl_coef), CISPO, and a TIS correction of a
bfloat16 sampler–trainer gap, whose touched fractions are logged."""

import math

import numpy as np
import pytest
from flax import nnx

from models import Transformer, get_config
from rl_reason.infra import data
from rl_reason.trainer import GRPOConfig, GRPOTrainer
from tests.test_off_policy import TASK, setup  # noqa: F401  (a module fixture)

pytestmark = pytest.mark.slow


def test_reinforce_pp_cispo_tis_run_in_the_loop(setup):  # noqa: F811
    tok, pool = setup
    model_cfg = get_config("tiny").replace(vocab_size=128, dtype="bfloat16")
    model = Transformer(model_cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    cfg = GRPOConfig(
        steps=2,
        prompts_per_step=4,
        group_size=4,
        max_prompt_len=64,
        max_new_tokens=16,
        verifier_workers=1,
        loss=dict(
            advantage_estimator="reinforce_pp_baseline",
            reward_kl_coef=0.05,
            objective="cispo",
            correction="tis_token",
            correction_cap=1.001,
            recompute_old_logprobs=True,
        ),
        optim=dict(learning_rate=3e-3),
        reward=dict(overlong_buffer=12),  # rewards that differ within groups from the start
    )
    trainer = GRPOTrainer(
        cfg,
        graphdef=graphdef,
        params=params,
        tokenizer=tok,
        task=TASK,
        train_batches=data.train_iterator(TASK.eval_set(3, 40), global_batch_size=4, seed=0),
        pool=pool,
    )
    assert trainer.ref_params is not None  # the folded KL needs the reference
    history = trainer.train()
    for m in history:
        assert math.isfinite(m["loss"])
        assert m["logprob_gap_sampler_trainer"] > 0  # bfloat16: the two scorings differ
        assert 0 < m["mismatch_token_frac"] <= m["mismatch_seq_frac"] <= 1
    # Before the first update the KL to the reference is 0, so step 1's gradient comes only
    # from the groups whose rewards differ (the baseline removes the rest): zero exactly when
    # none do. Step 2 learns.
    first = history[0]
    assert (first["grad_norm"] == 0) == (first["zero_std_groups"] == 1)
    assert history[1]["zero_std_groups"] < 1 and history[1]["grad_norm"] > 0
    assert np.isfinite([m["kl_ref"] for m in history]).all()
