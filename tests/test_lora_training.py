"""GRPO with LoRA: only the adapters move, the reference policy is the base model (adapters
zeroed over the same weights, no copy), and checkpoints hold the adapters alone."""

import jax
import numpy as np
import pytest
from flax import nnx

from models import Transformer, get_config, lora
from rl_reason import verifiers
from rl_reason.infra import data, sharding
from rl_reason.infra.checkpoint import Checkpointer
from rl_reason.infra.tokenizer import train_sentencepiece
from rl_reason.tasks import arithmetic
from rl_reason.tasks.templates import SPECIAL_TOKENS
from rl_reason.trainer import GRPOConfig, GRPOTrainer

pytestmark = pytest.mark.slow


def _np(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_lora_grpo_trains_adapters_only(tmp_path):
    task = arithmetic.ArithmeticTask(arithmetic.ArithmeticConfig(max_value=9, max_ops=3))
    tokenizer = train_sentencepiece(
        task.pretraining_corpus(0, 600, frac_worked=0.5),
        tmp_path / "tok.model",
        vocab_size=128,
        user_defined_symbols=SPECIAL_TOKENS,
    )
    model = Transformer(get_config("tiny").replace(vocab_size=128), rngs=nnx.Rngs(0))
    lora.add_lora(model, lora.LoRAConfig(rank=4, alpha=8.0), nnx.Rngs(1))
    graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, nnx.Param)
    # Non-zero adapters from the start: the policy differs from the base, so a reference that
    # were a copy of the initial policy (instead of the base) would show KL 0 at step 1.
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.numpy.ones_like(x), adapters)
    base_before, adapters_before = _np(base), _np(adapters)
    cfg = GRPOConfig(
        steps=2,
        prompts_per_step=4,
        group_size=4,
        max_prompt_len=64,
        max_new_tokens=16,
        checkpoint_every=1,
        verifier_workers=1,
        loss=dict(kl_coef=0.1),
        optim=dict(learning_rate=1e-2),
        reward=dict(overlong_buffer=12),
    )
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=1)
    with verifiers.VerifierPool(1) as pool:
        trainer = GRPOTrainer(
            cfg,
            graphdef=graphdef,
            params=adapters,
            frozen=base,
            tokenizer=tokenizer,
            task=task,
            train_batches=data.train_iterator(task.eval_set(3, 64), global_batch_size=4, seed=0),
            pool=pool,
            checkpointer=ckpt,
            stop_token_ids=tuple(range(5, 128, 9)),
        )
        history = trainer.train()
    assert history[0]["kl_ref"] > 1e-4  # the reference is the base, not the initial policy
    assert all(h["grad_norm"] > 0 for h in history)
    for a, b in zip(_np(trainer.frozen[0]), base_before, strict=True):
        np.testing.assert_array_equal(a, b)  # base weights bitwise unchanged
    moved = [
        not np.array_equal(a, b) for a, b in zip(_np(trainer.params), adapters_before, strict=True)
    ]
    assert all(moved)
    # The checkpoint holds the adapters (and their optimizer state), not the base weights.
    n_saved = sum(x.size for x in jax.tree.leaves(trainer.abstract_state()["params"]))
    n_adapters = sum(x.size for x in adapters_before)
    assert n_saved == n_adapters < sum(x.size for x in base_before) / 5
    assert "ref_params" not in trainer.abstract_state()
    step, state, _ = ckpt.restore(trainer.abstract_state())
    assert step == 2
    for a, b in zip(_np(state["params"]), _np(trainer.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert sharding.mesh_of(trainer.params).size == 1
