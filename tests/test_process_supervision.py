"""Process supervision per step: step rewards from the verifier, on the tokens that wrote each
step, as DeepSeekMath's per-token advantages (`losses.process_advantages`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rl_reason import losses
from rl_reason.core.config import GRPOConfig
from rl_reason.infra import tokenizer as tok_lib
from rl_reason.pipelines.research.pipeline import RewardConfig
from rl_reason.rollout import step_rewards
from rl_reason.tasks.templates import SPECIAL_TOKENS
from rl_reason.verifiers import arithmetic_steps
from rl_reason.verifiers.arithmetic_process import verify_arithmetic_process

PROBLEM = {"answer": "20", "steps": [(17, "+", 8, 25), (25, "-", 5, 20)], "process_weight": 0.0}


def _reference(rewards, mask, g, eps=1e-6):
    """The formula, loop by loop: r̃ over the group's steps, then A_t = Σ_{index(j) ≥ t} r̃_j."""
    n, t = rewards.shape
    out = np.zeros((n, t))
    for p in range(n // g):
        rows = range(p * g, (p + 1) * g)
        vals = [rewards[i, k] for i in rows for k in range(t) if mask[i, k]]
        if not vals or max(vals) == min(vals):
            continue
        mean, std = np.mean(vals), np.std(vals)
        for i in rows:
            for k in range(t):
                if mask[i, k]:
                    out[i, : k + 1] += (rewards[i, k] - mean) / (std + eps)
    return out


def test_process_advantages_match_the_formula():
    rng = np.random.default_rng(0)
    g, n, t = 4, 12, 9
    mask = (rng.random((n, t)) < 0.3).astype(np.float32)
    mask[4:8] = 0  # a group without steps
    mask[8:12] = 0
    mask[9, 3] = 1  # a group with a single step
    rewards = np.where(mask > 0, rng.integers(0, 2, (n, t)), 0).astype(np.float32)
    rewards[0, mask[0] > 0] = 1.0
    got = np.asarray(losses.process_advantages(rewards, mask, g))
    want = _reference(rewards, mask, g)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.abs(got[:4]).sum() > 0 and not got[4:].any()


def test_process_advantages_by_hand():
    # Group of 2: row 0 steps at t=1 (right) and t=3 (wrong); row 1 one step at t=2 (right).
    # Rewards {1, 0, 1}: mean 2/3, std sqrt(2)/3; r̃ = +0.7071, -1.4142, +0.7071.
    rewards = np.array([[0, 1, 0, 0, 0], [0, 0, 1, 0, 0]], np.float32)
    mask = np.array([[0, 1, 0, 1, 0], [0, 0, 1, 0, 0]], np.float32)
    got = np.asarray(losses.process_advantages(rewards, mask, 2, eps=0.0))
    a, b = 1 / np.sqrt(2), -np.sqrt(2)
    want = [[a + b, a + b, b, b, 0], [a, a, a, 0, 0]]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_process_advantages_refuse_bad_shapes():
    with pytest.raises(ValueError, match="groups of 3"):
        losses.process_advantages(np.zeros((4, 2)), np.zeros((4, 2)), 3)
    with pytest.raises(ValueError, match="alike"):
        losses.process_advantages(np.zeros((4, 2)), np.zeros((4, 3)), 2)


def test_verifier_steps_end_where_each_step_line_ends():
    text = "<think>\nStep 1: 8 + 17 = 25\nsome prose\nStep 2: 25 - 5 = 20.\n</think>\n"
    text += "<answer>20</answer>"
    lines = arithmetic_steps.step_lines(text)
    assert [text[:end].rsplit("\n", 1)[-1] for end, _ in lines] == [
        "Step 1: 8 + 17 = 25",
        "Step 2: 25 - 5 = 20.",
    ]
    result = verify_arithmetic_process(text, PROBLEM)
    # Step 1 is commuted (the strict checker wants 17 + 8): wrong; step 2 is right.
    assert [r for _, r in result.steps] == [0.0, 1.0]
    assert result.reward == 1.0 and result.correct  # process_weight 0: the outcome alone
    assert [end for end, _ in result.steps] == [end for end, _ in lines]
    # A prompt + completion: offsets are in the text given.
    prompt = "<think>\n" + text
    assert arithmetic_steps.step_lines(prompt)[0][0] == lines[0][0] + len("<think>\n")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [
        f"<think>\nStep 1: {i} + {i * 3} = {i * 4}\nStep 2: {i} - 5 = {i - 5}\nno steps at all"
        f"\n</think>\n<answer>{i}</answer>"
        for i in range(300)
    ]
    path = tmp_path_factory.mktemp("tok") / "t.model"
    return tok_lib.train_sentencepiece(
        texts, path, vocab_size=96, user_defined_symbols=SPECIAL_TOKENS
    )


def test_step_rewards_sit_on_each_steps_last_token(tokenizer):
    texts = [
        "\nStep 1: 17 + 8 = 25\nStep 2: 25 - 5 = 20\n</think>\n<answer>20</answer>",
        "\nStep 1: 17 + 8 = 26\n</think>\n<answer>26</answer>",
        "no steps at all",
    ]
    ids = [tokenizer.encode(t) for t in texts]
    width = max(map(len, ids)) + 3
    tokens = np.full((3, width), tokenizer.pad_id, np.int32)
    for i, row in enumerate(ids):
        tokens[i, : len(row)] = row
    lengths = np.array([len(r) for r in ids])
    decoded = [tokenizer.decode(r) for r in ids]
    steps = [verify_arithmetic_process(t, PROBLEM).steps for t in decoded]
    assert [len(s) for s in steps] == [2, 1, 0]
    rewards, mask = step_rewards.step_reward_arrays(tokenizer, tokens, lengths, steps)
    for i, row_steps in enumerate(steps):
        at = np.flatnonzero(mask[i])
        assert len(at) == len(row_steps)
        for t, (end, r) in zip(at, row_steps, strict=True):
            # The step's last token: its prefix reaches the step's end, the one before does not.
            assert len(tokenizer.decode(ids[i][: t + 1])) >= end
            assert len(tokenizer.decode(ids[i][:t])) < end
            assert rewards[i, t] == r
    assert rewards[0, mask[0] > 0].tolist() == [1.0, 1.0] and rewards[1].sum() == 0


def test_reward_modes_set_the_loss_weight():
    base = GRPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=8)
    assert RewardConfig("process_steps").grpo_config(base).loss.process_weight == 1.0
    both = RewardConfig("both_steps", process_weight=0.25).grpo_config(base)
    assert both.loss.process_weight == 0.25
    assert RewardConfig("process").grpo_config(base) is base
    label = RewardConfig("both_steps").label(PROBLEM)
    assert label["verifier"] == "arithmetic_process" and label["process_weight"] == 0.0


@pytest.mark.parametrize(
    "loss, match",
    [
        (dict(process_weight=1.5), "in \\[0, 1\\]"),
        (dict(process_weight=0.5, advantage_estimator="reinforce_pp"), "group-relative"),
    ],
)
def test_config_refuses(loss, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=8, loss=loss)
    with pytest.raises(ValueError, match="multi_turn"):
        GRPOConfig(
            prompts_per_step=2,
            group_size=2,
            max_new_tokens=8,
            loss=dict(process_weight=0.5),
            multi_turn=dict(env="python_tool"),
        )


def test_replace_keeps_checks():
    cfg = GRPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=8)
    with pytest.raises(ValueError, match="process_weight"):
        dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, process_weight=-1.0))


@pytest.mark.slow
def test_trainer_credits_step_rewards_to_their_tokens():
    """The shipped base writes steps; one round through the trainer's own path: the batch's
    advantages are (1 - w) * outcome + w * the formula on the verifier's steps, placed on the
    tokens that wrote them, and the update trains on them."""
    import jax
    import jax.numpy as jnp

    from experiments.configs import r1_zero_tiny
    from rl_reason import verifiers
    from rl_reason.infra import data, sharding
    from rl_reason.pipelines import base_model, r1_zero
    from rl_reason.trainer import GRPOTrainer

    config = r1_zero_tiny.get_config()
    mesh = sharding.make_mesh()
    tok, graphdef, params, _ = base_model.load_base(base_model.SHIPPED_BASE, mesh)
    built = r1_zero.build_data(config, with_corpus=False)
    label = RewardConfig("both_steps", process_weight=0.5).label
    pool_ex = [label(p) for p in built["rl_pool"][:64]]
    w = 0.5
    cfg = GRPOConfig(
        steps=1,
        prompts_per_step=4,
        group_size=8,
        max_prompt_len=80,
        max_new_tokens=96,
        verifier_workers=1,
        loss=dict(process_weight=w),
        optim=dict(learning_rate=1e-4),
    )
    with verifiers.VerifierPool(1) as pool:
        trainer = GRPOTrainer(
            cfg,
            graphdef=graphdef,
            params=params,
            tokenizer=tok,
            task=built["task"],
            train_batches=data.train_iterator(pool_ex, global_batch_size=4, seed=0),
            pool=pool,
            stop_token_ids=base_model.stop_token_ids(tok),
        )
        parts, _ = trainer.rounds.for_step(
            trainer.policy, trainer.ref_params, trainer.next_examples, jax.random.key(3)
        )
        (r,) = parts
        assert r.step_mask.sum() >= 8  # the base writes steps in some samples
        # The steps sit where the verifier's offsets end, in the decoded completions.
        for i, text in enumerate(r.texts):
            got = np.flatnonzero(r.step_mask[i])
            result = verify_arithmetic_process(text, r.examples[i // 8])
            assert len(got) == len(result.steps)
            assert r.step_rewards[i, got].tolist() == [s for _, s in result.steps]
        batch, _ = trainer._assemble(parts)
        outcome = np.asarray(losses.compute_advantages(jnp.asarray(r.rewards), 8))
        want = (1 - w) * outcome[:, None] + w * _reference(r.step_rewards, r.step_mask, 8)
        on = np.asarray(r.arrays.mask)
        np.testing.assert_allclose(np.asarray(batch.advantages) * on, want * on, atol=1e-5)
        metrics = trainer._train_on(batch)
        assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
        # A whole step through the loop logs the scored steps.
        logged = trainer.step()
        assert logged["process_steps_mean"] > 0
        assert 0 <= logged["process_step_reward_mean"] <= 1
