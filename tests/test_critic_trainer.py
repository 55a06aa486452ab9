"""PPO with a critic through the whole loop: one sample per prompt, the KL folded into the
reward, the policy waiting one step for its critic, and a resumed run equal to the straight one
bit for bit (the critic's params and optimizer state are in the checkpoint)."""

import jax
import numpy as np
import pytest
from flax import nnx

from models import Transformer, get_config, lora
from rl_reason.infra import data
from rl_reason.infra.checkpoint import Checkpointer
from rl_reason.trainer import GRPOConfig, GRPOTrainer
from tests.test_off_policy import TASK, TIMING, setup  # noqa: F401  (a module fixture)

pytestmark = pytest.mark.slow


def _model():
    model = Transformer(get_config("tiny").replace(vocab_size=128), rngs=nnx.Rngs(0))
    return nnx.split(model)


def _trainer(setup, steps, checkpointer=None, graphdef=None, params=None, frozen=None, **critic):  # noqa: F811
    tok, pool = setup
    if graphdef is None:
        graphdef, params = _model()
    cfg = GRPOConfig(
        steps=steps,
        prompts_per_step=4,
        group_size=1,
        max_prompt_len=64,
        max_new_tokens=16,
        checkpoint_every=1,
        verifier_workers=1,
        loss=dict(advantage_estimator="gae", reward_kl_coef=0.02),
        optim=dict(learning_rate=3e-3, minibatches=2),
        critic=dict(learning_rate=1e-3, gamma=0.99, lam=0.95, policy_delay_steps=1, **critic),
        reward=dict(overlong_buffer=12),  # rewards that differ from the start
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
        frozen=frozen,
    )


def _clean(history):
    return [{k: v for k, v in m.items() if not k.startswith(TIMING)} for m in history]


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_ppo_with_a_critic_trains_and_resumes_bit_for_bit(setup, tmp_path):  # noqa: F811
    straight = _trainer(setup, 4)
    assert straight.ref_params is not None  # the KL in the reward needs the reference
    policy0 = _leaves(straight.params)
    critic0 = _leaves(straight.critic_params)
    history = []
    for _ in range(4):
        history.append(straight.step())
        if len(history) == 1:
            # Step 1: only the critic trains; the policy's update reports and waits.
            for a, b in zip(_leaves(straight.params), policy0, strict=True):
                np.testing.assert_array_equal(a, b)
            assert history[0]["grad_norm"] > 0 and straight.updates == 0
    assert any(np.any(a != b) for a, b in zip(_leaves(straight.params), policy0, strict=True))
    assert any(
        np.any(a != b) for a, b in zip(_leaves(straight.critic_params), critic0, strict=True)
    )
    for m in history:
        assert m["value_finite"] == 1.0 and np.isfinite(m["value_loss"])
        assert -1.5 <= m["value_explained_variance"] <= 1.0
    # Step 1's rollouts are valued by the zero head: V = 0 explains nothing of the returns.
    assert abs(history[0]["value_explained_variance"]) < 1e-6

    first = _trainer(setup, 2, Checkpointer(tmp_path, save_every=1))
    first.train()
    first.checkpointer.close()
    resumed = _trainer(setup, 4, Checkpointer(tmp_path, save_every=1))
    assert resumed.resume() is not None and resumed.step_count == 2
    got = _clean(resumed.train())
    resumed.checkpointer.close()
    assert got == _clean(history)[2:]
    for mine, theirs in (
        (resumed.params, straight.params),
        (resumed.critic_params, straight.critic_params),
        (resumed.critic_opt_state, straight.critic_opt_state),
    ):
        for a, b in zip(_leaves(mine), _leaves(theirs), strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_lora_policy_needs_a_critic_checkpoint(setup):  # noqa: F811
    model = Transformer(get_config("tiny").replace(vocab_size=128), rngs=nnx.Rngs(0))
    lora.add_lora(model, lora.LoRAConfig(rank=4, alpha=8.0), nnx.Rngs(1))
    graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, nnx.Param)
    with pytest.raises(ValueError, match="critic.init='policy'"):
        _trainer(setup, 2, graphdef=graphdef, params=adapters, frozen=base)
