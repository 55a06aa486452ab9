"""Task `jsonl`: examples from <manual_dir>/<split>.jsonl, no tfds builder; the README's
example, the errors that name file and line, and a recipe's smoke run on such files."""

import json
import re
from pathlib import Path

import ml_collections
import pytest

from rl_reason.infra import data as data_lib
from rl_reason.tasks import get_task, register_task
from rl_reason.tasks.bad_rows import MalformedRowsError
from rl_reason.tasks.registry import _TASKS, DatasetTask

README = Path(__file__).resolve().parents[1] / "README.md"


def _write(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_the_readme_example_runs():
    text = README.read_text()
    section = text[text.index("A task from a JSON Lines file") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md (jsonl task)", "exec"), {})


def test_rows_keep_their_verifier_and_bad_rows_are_named_by_file(tmp_path):
    good = [{"question": f"q{i}", "answer": str(i), "verifier": "gsm8k"} for i in range(3)]
    _write(tmp_path / "train.jsonl", [*good, "", {"question": "", "answer": "1"}])
    task = get_task("jsonl", verifier="countdown")
    assert (task.verifier_name, task.builder) == ("countdown", "jsonl")
    rows = task.data_source("train", manual_dir=tmp_path)
    assert len(rows) == 4  # the blank line is not a row
    assert data_lib.eval_examples(rows, None, task=task, max_bad_fraction=0.3) == good
    with pytest.raises(MalformedRowsError, match=r"train\.jsonl: 1 of 4 rows .*empty field"):
        data_lib.eval_examples(rows, None, task=task)


def test_errors_name_what_to_fix(tmp_path):
    _write(tmp_path / "train.jsonl", [{"question": "q", "answer": "1"}, "{not json"])
    task = get_task("jsonl")
    with pytest.raises(ValueError, match=r"train\.jsonl:2: not a JSON object"):
        task.data_source("train", manual_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no split 'test' .*found: train\.jsonl"):
        task.data_source("test", manual_dir=tmp_path)
    with pytest.raises(ValueError, match="set config.data.manual_dir"):
        task.data_source("train", manual_dir=None)
    with pytest.raises(TypeError, match="takes no parameters"):
        get_task("jsonl", max_bad_fraction=0.5)
    with pytest.raises(ValueError, match="has no tfds builder"):
        task.get_builder(data_dir=tmp_path)


def test_a_registered_task_class_is_found_by_name():
    class Inline(DatasetTask):
        def data_source(self, split, *, data_dir=None, manual_dir=None):
            return [{"question": "2+2?", "answer": "4"}]

    register_task("inline_test", Inline, verifier="gsm8k")
    try:
        task = get_task("inline_test")
        assert isinstance(task, Inline) and task.verifier_name == "gsm8k"
        assert task.data_source("train")[0]["answer"] == "4"
        with pytest.raises(ValueError, match="registered already"):
            register_task("inline_test", DatasetTask, verifier="math")
    finally:
        _TASKS.pop("inline_test")


@pytest.mark.slow
def test_a_recipe_smoke_run_on_jsonl_files(tmp_path):
    from experiments.configs import gsm8k_qwen2_5_0_5b
    from rl_reason.pipelines import recipe

    files = tmp_path / "data"
    problems = [(a, b) for a in range(2, 9) for b in range(2, 7)]
    rows = [
        {"question": f"What is {a} times {b}?", "answer": f"#### {a * b}", "verifier": "gsm8k"}
        for a, b in problems
    ]
    _write(files / "train.jsonl", rows[:24])
    _write(files / "test.jsonl", rows[24:])
    config = gsm8k_qwen2_5_0_5b.get_config("smoke")
    with config.unlocked():
        config.workdir = str(tmp_path / "run")
        config.task.name = "jsonl"
        config.task.params = ml_collections.ConfigDict()
        config.data.manual_dir = str(files)
        config.data.eval_split = "test"
    summary = recipe.run(config)
    assert summary["task"] == "jsonl" and summary["eval_size"] == 11
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert steps == list(range(1, config.grpo.steps + 1))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["after"] is not None
