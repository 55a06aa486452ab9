"""Multi-turn rollouts in training (multi_turn.env): the host's record of the turns, the loss
mask the objective sees, the metrics, faults that end as stated, and a resume that continues
bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import Transformer, get_config
from rl_reason import losses, verifiers
from rl_reason.core import update
from rl_reason.core.config import ENVIRONMENT_NAMES, LossOptions
from rl_reason.infra import data
from rl_reason.infra.checkpoint import Checkpointer
from rl_reason.infra.tokenizer import train_sentencepiece
from rl_reason.rollout import envs, multi_turn
from rl_reason.rollout.envs.python_tool import CLOSE, OPEN, PythonTool
from rl_reason.tasks import arithmetic
from rl_reason.tasks.templates import SPECIAL_TOKENS
from rl_reason.trainer import GRPOConfig, GRPOTrainer

TASK = arithmetic.ArithmeticTask(arithmetic.ArithmeticConfig(max_value=9, max_ops=3))
TIMING = ("time_", "generated_tokens_per_s")
TOOL_TOKENS = (OPEN, CLOSE, "<output>", "</output>")


# Model turns for the record's test; they are in the tokenizer's corpus, so every character has
# a piece.
TURNS = {
    0: ["See. <code>x = 6 * 7; print(x)</code>", "<code>print(y)</code>", "<code>1/0</code>"],
    1: ["<code>while True: pass</code>", "<code>print('a' * 500)</code>", "oops</code>"],
    2: [f"<code>print({i})</code>" for i in range(6)],  # past the turn cap
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    corpus = TASK.pretraining_corpus(0, 600, frac_worked=0.5)
    corpus += [f"{OPEN}print({i} * 7){CLOSE}\n<output>\n{i * 7}\n</output>\n" for i in range(50)]
    corpus += [t for ts in TURNS.values() for t in ts] * 20
    corpus += ["NameError: name 'y' is not defined ZeroDivisionError: division by zero"] * 20
    tok = train_sentencepiece(
        corpus,
        tmp_path_factory.mktemp("tok") / "tok.model",
        vocab_size=160,
        user_defined_symbols=(*SPECIAL_TOKENS, *TOOL_TOKENS),
    )
    with verifiers.VerifierPool(1) as pool:
        yield tok, pool


def test_environment_names_are_the_registry():
    assert set(ENVIRONMENT_NAMES) == set(envs.ENVIRONMENTS)


def test_the_record_answers_turns_and_counts_every_fault(setup):
    tok, _ = setup
    tool = PythonTool(timeout_s=1.0, max_output_chars=64, max_turns=5)
    rec = multi_turn.TurnRecord(tool, tok, [{}] * 3, max_observation_tokens=256)
    assert rec.stop_ids == (tok.piece_to_id(CLOSE),)
    turns = TURNS
    lengths = {r: 0 for r in turns}
    replies = {r: [] for r in turns}
    for k in range(6):
        for r, ts in turns.items():
            if k >= len(ts) or r in rec.ended:
                continue
            # A turn as the engine hands it over: the row's tokens so far, ending in the marker.
            ids = tok.encode(ts[k])
            row = np.zeros(512, np.int32)
            start = int(rec.turn_start[r])
            row[start : start + len(ids)] = ids
            n = start + len(ids)
            (reply,) = rec.answer(np.asarray([r]), row[None], np.asarray([n]))
            replies[r].append(reply)
            lengths[r] = n + len(reply[0])
    assert rec.reasons[0] == ["ok", "error", "error"]
    assert rec.reasons[1] == ["timeout", "truncated", "malformed"]
    assert rec.reasons[2] == ["ok"] * 5 and rec.ended == {2: "turn_limit"}
    assert "42" in tok.decode(replies[0][0][0]) and "ZeroDivisionError" in tok.decode(
        replies[0][2][0]
    )
    assert replies[2][-1] == ([], True)  # the sixth call ends the trajectory, no observation
    n = np.asarray([lengths[r] for r in range(3)])
    stats = rec.stats(n, np.zeros(3, bool))
    assert stats["tool_calls_mean"] == pytest.approx(11 / 3)
    assert stats["tool_call_frac"] == 1.0
    assert stats["tool_timeout_frac"] == pytest.approx(1 / 11)
    assert stats["tool_ok_frac"] == pytest.approx(6 / 11)
    assert stats["ended_turn_limit_frac"] == pytest.approx(1 / 3)
    assert stats["ended_stopped_frac"] == pytest.approx(2 / 3)
    # The observation spans are exactly the reply tokens.
    observed = rec.observed(512)
    assert observed.sum() == sum(len(ids) for rs in replies.values() for ids, _ in rs)


@pytest.mark.parametrize("objective", sorted(losses.POLICY_OBJECTIVES))
@pytest.mark.parametrize("aggregation", sorted(losses.AGGREGATIONS))
def test_observation_tokens_carry_no_gradient(objective, aggregation):
    # d loss / d logp through the trainer's batch: the objective sees the loss mask, and every
    # observation token's gradient is exactly 0 while the policy's own tokens have one.
    rng = np.random.default_rng(0)
    b, n = 4, 12
    mask = np.arange(n)[None] < np.asarray([12, 9, 7, 12])[:, None]
    observed = np.zeros((b, n), bool)
    observed[0, 3:6] = observed[1, 2:4] = observed[3, 8:12] = True
    loss_mask = mask & ~observed
    logp = jnp.asarray(rng.normal(-1.0, 0.3, (b, n)), jnp.float32)
    old = logp + jnp.asarray(rng.normal(0, 0.05, (b, n)), jnp.float32)
    adv = jnp.asarray([1.0, -0.5, 0.7, -1.2])

    def loss(lp):
        value, _ = losses.policy_loss(
            lp, old, adv, loss_mask.astype(np.float32), aggregation=aggregation,
            objective=objective, max_len=n, ref_logp=old, kl_coef=0.01,
        )  # fmt: skip
        return value

    grad = np.asarray(jax.grad(loss)(logp))
    assert np.all(grad[observed] == 0.0) and np.all(grad[~mask] == 0.0)
    assert np.all(grad[loss_mask] != 0.0)


def test_the_batch_scores_the_policys_tokens_and_attends_to_all(setup):
    tok, _ = setup
    model = Transformer(get_config("tiny").replace(vocab_size=160), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    import optax

    from rl_reason.core.record import RolloutArrays
    from rl_reason.infra import sharding

    mesh = sharding.mesh_of(params)
    fns = update.StepFns(graphdef, params, optax.sgd(0.0), LossOptions(), mesh, max_len=8)
    p, g, n = 2, 2, 8
    mask = np.arange(n)[None] < np.asarray([8, 6, 8, 3])[:, None]
    loss_mask = mask.copy()
    loss_mask[0, 2:5] = loss_mask[2, 1:3] = False
    arrays = RolloutArrays(
        prompt_ids=jnp.ones((p, 4), jnp.int32),
        prompt_mask=jnp.ones((p, 4), bool),
        tokens=jnp.full((p * g, n), 7, jnp.int32),
        mask=jnp.asarray(mask),
        loss_mask=jnp.asarray(loss_mask),
        sample_logprobs=jnp.zeros((p * g, n)),
        policy_logprobs=jnp.zeros((p * g, n)),
        lengths=jnp.asarray(mask.sum(1), jnp.int32),
        truncated=jnp.zeros(p * g, bool),
    )
    batch = fns.make_batch([arrays], None, jnp.ones(p * g))
    np.testing.assert_array_equal(np.asarray(batch.mask), loss_mask)
    np.testing.assert_array_equal(np.asarray(batch.attend), mask)
    plain = arrays.replace(loss_mask=arrays.mask)  # a single-turn round's record
    assert fns.make_batch([plain], None, jnp.ones(p * g)).attend is None


def _trainer(setup, *, steps, checkpointer=None, env="python_tool", loss=None, **multi):
    tok, pool = setup
    loss = dict(kl_coef=0.05) if loss is None else loss
    gae = loss.get("advantage_estimator") == "gae"
    model = Transformer(get_config("tiny").replace(vocab_size=160), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    cfg = GRPOConfig(
        steps=steps,
        prompts_per_step=4,
        group_size=4,
        max_prompt_len=64,
        max_new_tokens=48,
        checkpoint_every=1,
        verifier_workers=1,
        multi_turn=dict(env=env, max_turns=2, max_observation_tokens=16, **multi),
        loss=loss,
        optim=dict(learning_rate=3e-3),
        critic=dict(learning_rate=1e-3, gamma=0.99, lam=0.95) if gae else {},
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
        stop_token_ids=(tok.eos_id,),
    )


def _clean(history):
    return [{k: v for k, v in m.items() if not k.startswith(TIMING)} for m in history]


def test_a_rollout_round_masks_its_observations(setup):
    tok, _ = setup
    t = _trainer(setup, steps=1)
    examples = TASK.eval_set(3, 4)
    r = t.rounds.run(t.policy, None, examples, jax.random.key(3))
    a = jax.tree.map(np.asarray, r.arrays)
    close = tok.piece_to_id(CLOSE)
    spans = [s for spans in r.turns.spans for s in spans]
    assert len(spans) >= 3, "the random policy should close a few code blocks"
    for row, row_spans in enumerate(r.turns.spans):
        for start, end in row_spans:
            assert a.tokens[row, start - 1] == close  # each observation follows a turn's end
            end = min(end, int(a.lengths[row]))
            assert not a.loss_mask[row, start:end].any() and a.mask[row, start:end].all()
            assert (a.sample_logprobs[row, start:end] == 0).all()
            assert "<output>" in tok.decode(a.tokens[row, start:end])
    observed = r.turns.observed(a.mask.shape[1])
    np.testing.assert_array_equal(a.loss_mask, a.mask & ~observed)
    assert r.turn_stats["tool_malformed_frac"] > 0  # random code blocks: no <code> before


@pytest.mark.slow
def test_multi_turn_training_resumes_bit_for_bit(setup, tmp_path):
    straight = _trainer(setup, steps=3)
    want = _clean(straight.train())
    assert all(m["mt_tool_calls_mean"] > 0 for m in want)
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in want)
    first = _trainer(setup, steps=1, checkpointer=Checkpointer(tmp_path, save_every=1))
    first.train()
    first.checkpointer.close()
    resumed = _trainer(setup, steps=3, checkpointer=Checkpointer(tmp_path, save_every=1))
    assert resumed.resume() is not None and resumed.step_count == 1
    got = _clean(resumed.train())
    resumed.checkpointer.close()
    assert got == want[1:]
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# Every registered estimator once, each with one of the objectives in turn.
PAIRS = [
    (est, sorted(losses.POLICY_OBJECTIVES)[i % len(losses.POLICY_OBJECTIVES)])
    for i, est in enumerate(sorted(losses.ADVANTAGE_ESTIMATORS))
]


@pytest.mark.slow
@pytest.mark.parametrize("estimator, objective", PAIRS)
def test_every_estimator_and_objective_trains_on_multi_turn_rollouts(setup, estimator, objective):
    # The KL term of the other trainers here, so the ppo_clip pairs' programs are theirs.
    loss = dict(advantage_estimator=estimator, objective=objective, kl_coef=0.05)
    (m,) = _trainer(setup, steps=1, loss=loss).train()
    assert m["mt_tool_calls_mean"] > 0
    assert np.isfinite(m["loss"]) and m["grad_norm"] > 0 and m["nonfinite_updates"] == 0


@pytest.mark.parametrize(
    "extra, match",
    [
        (dict(sampling=dict(engine="continuous", partial_rollout_steps=1)), "partial"),
        (dict(off_policy_steps=1), "off_policy_steps"),
        (dict(multi_turn=dict(env="chess")), "multi_turn.env"),
        (dict(multi_turn=dict(env="python_tool", max_turns=0)), "max_turns"),
    ],
)
def test_bad_multi_turn_configs_are_refused(extra, match):
    extra.setdefault("multi_turn", dict(env="python_tool"))
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**extra)


def test_a_marker_that_is_not_one_token_is_refused(setup):
    tok, _ = setup

    class Split(PythonTool):
        pass

    bad = Split(stop_marker="</nope-not-a-piece>")
    with pytest.raises(ValueError, match="not one token"):
        multi_turn.TurnRecord(bad, tok, [{}])
