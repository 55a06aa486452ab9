"""The divergence guard: a run whose policy blows up stops, the newest checkpoint left is a
healthy one, and a rerun with a sane learning rate resumes from it instead of the destroyed
weights (trainer/health.py)."""

import json

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
from rl_reason.trainer.health import DivergedError, Health, untrusted_from

TASK = arithmetic.ArithmeticTask(arithmetic.ArithmeticConfig(max_value=9, max_ops=3))


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


def _trainer(setup, ckpt_dir, *, lr, steps):
    tok, pool = setup
    model = Transformer(get_config("tiny").replace(vocab_size=128), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    cfg = GRPOConfig(
        steps=steps,
        prompts_per_step=4,
        group_size=4,
        max_prompt_len=64,
        max_new_tokens=16,
        checkpoint_every=1,
        checkpoint_keep=10,
        max_nonfinite_steps=2,
        optim=dict(learning_rate=lr, max_grad_norm=None),
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
        checkpointer=Checkpointer(ckpt_dir, save_every=1, max_to_keep=10),
        stop_token_ids=tuple(range(5, 128, 9)),
    )


def test_the_guard_reads_entropy_rises_and_nonfinite_updates():
    h = Health(max_unhealthy=2, max_entropy_change=2.0)
    assert h.observe(1, [1.0], 1.0) == [] and h.healthy
    assert h.observe(2, [1.0], 2.5) == []  # a rise of 1.5 nats is within the bound
    assert "entropy went 2.500 -> 4.800" in h.observe(3, [1.0], 4.8)[0]
    assert h.streak_start == 3 and not h.should_stop
    assert "non-finite" in h.observe(4, [0.0, 1.0], float("nan"))[0]
    assert h.should_stop and h.nonfinite_total == 1
    # The weights saved at step 2 were made by the update that blew up (seen at step 3).
    assert h.last_trusted_step() == 1
    meta = {"trainer": h.to_meta()}
    assert untrusted_from(meta) == 2
    assert h.observe(5, [1.0], 2.6) == [] and untrusted_from({"trainer": h.to_meta()}) is None
    # A collapse onto one token (entropy 0) is a blow-up too, for as long as it lasts.
    assert h.observe(6, [1.0], 0.0) and h.observe(7, [1.0], 0.1) and h.should_stop


def _steps(path, pattern="*"):
    return sorted(int(p.name.split(".")[0]) for p in path.glob(pattern) if p.name[0].isdigit())


def test_a_diverged_run_keeps_a_healthy_checkpoint_and_a_sane_rerun_resumes_it(setup, tmp_path):
    _trainer(setup, tmp_path, lr=1e-3, steps=3).train()  # three healthy steps, saved
    # The same workdir with an absurd learning rate: step 4's update destroys the policy, the
    # guard sees it in step 5's samples and stops after step 6.
    absurd = _trainer(setup, tmp_path, lr=1.0, steps=12)
    absurd.resume()
    with pytest.raises(DivergedError) as err:
        absurd.train()
    message = str(err.value)
    assert "2 unhealthy steps in a row" in message and "entropy went" in message
    assert _steps(tmp_path, "*.diverged") == [4, 5]
    assert [s for s in _steps(tmp_path) if (tmp_path / str(s)).is_dir()] == [1, 2, 3]
    assert "resume from the healthy checkpoint of step 3" in message
    for step in (1, 2, 3):
        meta = json.loads((tmp_path / str(step) / "meta" / "metadata").read_text())
        assert meta["trainer"]["healthy"]

    rerun = _trainer(setup, tmp_path, lr=1e-3, steps=5)
    rerun.resume()
    assert rerun.step_count == 3  # not the destroyed weights of step 4 or 5
    history = rerun.train()
    assert len(history) == 2 and all(np.isfinite(m["loss"]) for m in history)
    assert rerun.health.healthy


def test_resume_skips_a_checkpoint_written_inside_a_failing_streak(setup, tmp_path):
    # A run killed during a streak, before its guard stopped it: the guard allows 5 unhealthy
    # steps, so checkpoints 4.. (after the destroying update) are all written.
    trainer = _trainer(setup, tmp_path, lr=1.0, steps=4)
    trainer.health.max_unhealthy = 5
    trainer.train()
    trainer.checkpointer.close()
    newest = json.loads((tmp_path / "4" / "meta" / "metadata").read_text())["trainer"]
    assert not newest["healthy"] and newest["streak_start"] == 2
    rerun = _trainer(setup, tmp_path, lr=1e-3, steps=4)
    assert rerun.resume() is None  # every checkpoint came from the destroyed weights
    assert _steps(tmp_path, "*.diverged") == [1, 2, 3, 4]
