"""Bad input stops a run early with a message that says what is wrong and what to do, and
destroys nothing. (Malformed dataset rows and manual_dir layouts: tests/test_datasets.py and
tests/test_data_pipeline.py; damaged checkpoints: tests/test_checkpoint.py.)"""

import os
import subprocess
import sys

import pytest
from flax import nnx

from experiments.configs import r1_zero_tiny
from models import Transformer, get_config
from rl_reason import tasks
from rl_reason.infra.checkpoint import CheckpointMismatchError
from rl_reason.infra.tokenizer import train_sentencepiece
from rl_reason.pipelines import grpo_stage as grpo_run
from rl_reason.pipelines import r1_zero
from rl_reason.tasks import arithmetic
from rl_reason.tasks.templates import SPECIAL_TOKENS
from rl_reason.trainer import GRPOConfig, GRPOTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = arithmetic.ArithmeticTask(arithmetic.ArithmeticConfig(max_value=9, max_ops=3))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    corpus = TASK.pretraining_corpus(0, 600, frac_worked=0.5)
    return train_sentencepiece(corpus, path, vocab_size=128, user_defined_symbols=SPECIAL_TOKENS)


def _trainer(tokenizer, vocab_size=128, task=TASK, batches=None):
    model = Transformer(get_config("tiny").replace(vocab_size=vocab_size), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    return GRPOTrainer(
        GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_prompt_len=64),
        graphdef=graphdef,
        params=params,
        tokenizer=tokenizer,
        task=task,
        train_batches=batches if batches is not None else iter(()),
        pool=None,
    )


def test_tokenizer_larger_than_the_embedding(tokenizer):
    with pytest.raises(ValueError, match=r"128.*(64|embedding)") as err:
        _trainer(tokenizer, vocab_size=64)
    assert "embedding" in str(err.value) or "rows" in str(err.value)
    _trainer(tokenizer, vocab_size=160)  # padded embedding rows are fine


def test_unknown_task_and_verifier_names_list_the_valid_ones(tokenizer):
    with pytest.raises(ValueError, match="countdown"):
        tasks.get_task("cuontdown")

    class Task:
        verifier_name = "arithmatic"

        def prompt(self, example):
            return example["question"]

    with pytest.raises(ValueError, match=r"unknown verifier 'arithmatic'.*arithmetic"):
        _trainer(tokenizer, task=Task())
    # A dataset row naming a verifier that does not exist is caught before sampling.
    trainer = _trainer(tokenizer, batches=iter([[{"question": "q", "verifier": "nope"}] * 2]))
    with pytest.raises(ValueError, match="unknown verifier 'nope'"):
        trainer.step()


def test_config_section_typo_and_wrong_type():
    with pytest.raises(ValueError, match=r"no field\(s\) \['stepz'\].*'steps'"):
        grpo_run.config_from(GRPOConfig, {"stepz": 3})
    with pytest.raises(TypeError, match=r"GRPOConfig.optim.learning_rate must be float.*'1e-3'"):
        grpo_run.config_from(GRPOConfig, {"optim": {"learning_rate": "1e-3"}})
    with pytest.raises(TypeError, match="GRPOConfig.sampling.dynamic_sampling must be bool"):
        grpo_run.config_from(GRPOConfig, {"sampling": {"dynamic_sampling": 1}})
    lr = grpo_run.config_from(GRPOConfig, {"optim": {"learning_rate": 1}}).optim.learning_rate
    assert lr == 1
    with pytest.raises(ValueError, match=r"group_size=1 must be >= 2 \(advantages are relative"):
        grpo_run.config_from(GRPOConfig, {"group_size": 1})


def test_an_old_flat_option_names_its_new_place():
    with pytest.raises(ValueError, match=r"kl_coef is now loss.kl_coef"):
        grpo_run.config_from(GRPOConfig, {"kl_coef": 0.1})
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.train",
            "--config=experiments/configs/r1_zero_tiny.py:smoke",
            "--config.grpo.learning_rate=0.1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "--config.grpo.learning_rate is now --config.grpo.optim.learning_rate" in proc.stderr


def test_every_bad_field_is_named_at_once_with_its_bound():
    with pytest.raises(ValueError) as err:
        GRPOConfig(max_new_tokens=0, optim=dict(learning_rate=-1.0), loss=dict(kl_coef=-0.1))
    message = str(err.value)
    assert "max_new_tokens=0 must be >= 1 (the response budget)" in message
    assert "optim.learning_rate=-1.0 must be in (0, 1]" in message
    assert "loss.kl_coef=-0.1 must be >= 0" in message
    assert "group_size" not in message  # each field gets its own reason


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.grpo.stepz=3", 'Did you mean "steps"'),
        ("--config.grpo.steps=three", "three"),
    ],
)
def test_command_line_typo_and_wrong_type(tmp_path, flag, message):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.train",
            "--config=experiments/configs/r1_zero_tiny.py:smoke",
            f"--config.workdir={tmp_path}",
            flag,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "checkpoints").exists()  # stopped before anything ran


@pytest.mark.slow
def test_checkpoint_of_another_model_shape_is_refused_and_kept(tmp_path):
    config = r1_zero_tiny.get_config("smoke")
    with config.unlocked():
        config.workdir = str(tmp_path)
        config.grpo.steps = 1
        config.grpo.checkpoint_every = 1
    r1_zero.run(config)
    saved = sorted(os.listdir(tmp_path / "checkpoints"))
    with config.unlocked():
        config.model.overrides.mlp_dim = 96  # another model in the same workdir
        config.grpo.steps = 2
    with pytest.raises(CheckpointMismatchError, match=r"mlp/down.*\(128, 64\).*\(96, 64\)") as err:
        r1_zero.run(config)
    assert "fresh workdir" in str(err.value)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == saved  # nothing moved or deleted
