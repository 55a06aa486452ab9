"""The evaluation and export entry points (rl_reason/pipelines/evaluate.py, experiments/evaluate.py,
experiments/export.py) on a finished smoke run of the MATH recipe (full fine-tuning, float32).

Evaluating the run's final checkpoint reproduces the run's own final evaluation number for
number, and so does evaluating its exported Hugging Face directory through the command line;
the run's policy moved (greedy completions got shorter), so an evaluation of the wrong weights
would not match. Checkpoints are opened read-only: a save in progress is left alone.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import math_qwen2_5_math_1_5b
from models.safetensors_io import open_checkpoint
from rl_reason.infra.checkpoint import Checkpointer
from rl_reason.pipelines import evaluate as evaluate_run
from rl_reason.pipelines import model_path, recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "experiments/configs/math_qwen2_5_math_1_5b.py:smoke"


def test_read_only_checkpointer_restores_and_leaves_a_save_in_progress_alone(tmp_path):
    writer = Checkpointer(tmp_path, save_every=1)
    writer.save(1, {"w": jnp.arange(3.0)}, meta={"note": "x"}, force=True)
    writer.close()
    in_progress = tmp_path / "2.orbax-checkpoint-tmp-1"  # another job writing step 2
    in_progress.mkdir()
    reader = Checkpointer(tmp_path, save_every=1, read_only=True)
    step, state, meta = reader.restore({"w": jnp.zeros(3)}, 1)
    assert step == 1 and meta == {"note": "x"}
    np.testing.assert_array_equal(np.asarray(state["w"]), [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="read_only"):
        reader.save(2, {"w": jnp.ones(3)}, force=True)
    reader.close()
    assert in_progress.is_dir()
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        Checkpointer(tmp_path / "absent", save_every=1, read_only=True)
    assert not (tmp_path / "absent").exists()


@pytest.fixture(scope="module")
def math_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("math")
    config = math_qwen2_5_math_1_5b.get_config("smoke")
    with config.unlocked():
        config.workdir = str(workdir)
    return config, workdir, recipe.run(config)


@pytest.mark.slow
def test_the_final_checkpoint_reproduces_the_runs_final_evaluation(math_run):
    config, workdir, summary = math_run
    before, after = summary["before"], summary["after"]
    assert after["mean_response_tokens"] < before["mean_response_tokens"]
    result = evaluate_run.evaluate(config, "latest")
    assert result["metrics"] == after
    assert result["step"] == result["trained_steps"] == 2
    assert result["num_examples"] == summary["eval_size"] == 4 and result["split"] == "test"
    written = json.loads((workdir / "eval" / "step_2_test.json").read_text())
    assert written["metrics"] == after and result["written_to"].endswith("step_2_test.json")
    table = evaluate_run.markdown(result)
    assert "| accuracy | 0.0000 |" in table and f"{workdir}/checkpoints/2" in table
    # The same step named by its directory; other k and fewer problems.
    step_dir = str(workdir / "checkpoints" / "2")
    other = evaluate_run.evaluate(
        config, step_dir, samples=3, num_examples=2, out=workdir / "o.json"
    )
    assert other["step"] == 2 and other["num_examples"] == 2 and other["samples"] == 3
    assert {"mean@3", "pass@1", "pass@3", "maj@1", "maj@3", "accuracy"} <= set(other["metrics"])
    assert json.loads((workdir / "o.json").read_text())["metrics"] == other["metrics"]


@pytest.mark.slow
def test_the_exported_directory_reproduces_it_from_the_command_line(math_run):
    _, workdir, summary = math_run
    out = workdir / "export_eval.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.evaluate",
            f"--config={CONFIG}",
            f"--config.workdir={workdir}",
            f"--checkpoint={workdir / recipe.EXPORT_DIR}",
            f"--out={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| mean_response_tokens |" in proc.stdout
    result = json.loads(out.read_text())
    assert result["step"] is None and result["metrics"] == summary["after"]


@pytest.mark.slow
def test_export_of_a_checkpoint_is_the_runs_final_policy(math_run):
    config, workdir, _ = math_run
    out = evaluate_run.export(config, "2")
    assert out == workdir / "export_step_2"
    ours, final = open_checkpoint(out), open_checkpoint(workdir / recipe.EXPORT_DIR)
    assert sorted(ours) == sorted(final)
    for name in ours:
        np.testing.assert_array_equal(np.asarray(ours[name]), np.asarray(final[name]), name)
    source = workdir / model_path.TINY_DIR / "tokenizer.json"
    assert (out / "tokenizer.json").read_bytes() == source.read_bytes()


@pytest.mark.slow
def test_bad_checkpoints_and_arguments_are_named(math_run, tmp_path):
    config, workdir, _ = math_run
    with pytest.raises(FileNotFoundError, match=r"saved steps: \[1, 2\]"):
        evaluate_run.resolve(config, "7")
    with pytest.raises(ValueError, match="eval_accuracy"):
        evaluate_run.resolve(config, "best")  # the smoke run never evaluates mid-run
    with pytest.raises(FileNotFoundError, match="neither a step number"):
        evaluate_run.resolve(config, str(tmp_path / "nowhere"))
    assert evaluate_run.resolve(config, str(workdir)).step == 2  # a workdir: its latest
    with pytest.raises(ValueError, match="samples must be >= 1"):
        evaluate_run.evaluate(config, "latest", samples=0)
    with pytest.raises(ValueError, match="already a Hugging Face directory"):
        evaluate_run.export(config, str(workdir / recipe.EXPORT_DIR))


def test_configs_of_other_pipelines_are_told_in_one_line(tmp_path):
    from experiments.configs import r1_zero_tiny

    config = r1_zero_tiny.get_config("smoke")
    for fn in (evaluate_run.evaluate, evaluate_run.export):
        with pytest.raises(ValueError, match="supports recipe configs .* 'r1_zero'"):
            fn(config, "latest")


def test_a_changed_sampling_option_is_seen_in_a_nested_saved_config():
    saved = {"sampling": {"temperature": 0.7}, "max_new_tokens": 16}
    assert evaluate_run._field(saved, "sampling.temperature") == 0.7
    assert evaluate_run._field(saved, "sampling.top_p") is evaluate_run._MISSING
