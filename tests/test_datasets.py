"""The tfds builders: exact examples from fixture files, seeded synthetic data, bad input.

Fixtures (tests/fixtures/) are small hand-written files in each dataset's distributed layouts;
the parquet ones come from tests/fixtures/make_parquet.py. Every build goes to tmp_path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from rl_reason import verifiers
from rl_reason.infra import data
from rl_reason.tasks import arithmetic, datasets, get_task, registry, templates
from rl_reason.tasks.bad_rows import MalformedRowsError
from rl_reason.tasks.builder_base import bad_row_report
from rl_reason.tasks.manual_files import ManualFilesMissing
from rl_reason.tasks.math_dataset import last_boxed, parse_level

FIXTURES = Path(__file__).parent / "fixtures"


def _split(builder, split: str) -> list[dict]:
    """All examples of a split, decoded, in a fixed order (tfds stores them hash-ordered)."""
    examples = data.eval_examples(builder.as_data_source(split))
    return sorted(examples, key=lambda e: e["question"])


def _by_question(examples: list[dict]) -> list[dict]:
    return sorted(examples, key=lambda e: e["question"])


# ----------------------------------------------------------------------------- gsm8k

GSM8K_OFFICIAL_TRAIN = [
    {
        "question": "A baker makes 24 muffins and packs them in boxes of 4. Each box sells for "
        "$3. How much money does the baker make by selling all the boxes?",
        "answer": "18",
        "solution": "There are 24 / 4 = <<24/4=6>>6 boxes.\nThe baker makes 6 * 3 = <<6*3=18>>18 "
        "dollars.\n#### 18",
        "verifier": "gsm8k",
    },
    {
        "question": "Tom reads 15 pages every day for 2 weeks. How many pages does he read?",
        "answer": "210",
        "solution": "Two weeks are 2 * 7 = <<2*7=14>>14 days.\nTom reads 15 * 14 = "
        "<<15*14=210>>210 pages.\n#### 210",
        "verifier": "gsm8k",
    },
    {
        "question": "A town has 1,200 houses. Each house has 2 bicycles. How many bicycles are "
        "there in the town?",
        "answer": "2400",  # "#### 2,400" without the thousands comma
        "solution": "There are 1200 * 2 = <<1200*2=2400>>2400 bicycles.\n#### 2,400",
        "verifier": "gsm8k",
    },
    {
        # Surrounding whitespace of the question is stripped.
        "question": "The temperature was 5 degrees in the morning and dropped by 8 degrees by "
        "night. What was the temperature at night?",
        "answer": "-3",
        "solution": "It was 5 - 8 = <<5-8=-3>>-3 degrees.\n#### -3",
        "verifier": "gsm8k",
    },
]


def test_gsm8k_official_jsonl(tmp_path):
    builder = datasets.prepare(
        "gsm8k", data_dir=tmp_path, manual_dir=FIXTURES / "gsm8k" / "official"
    )
    assert sorted(builder.info.splits) == ["test", "train"]
    assert _split(builder, "train") == _by_question(GSM8K_OFFICIAL_TRAIN)
    test = _split(builder, "test")
    assert [(e["question"], e["answer"]) for e in test] == [
        ("A car drives at 60 km per hour for 3.5 hours. How far does it drive?", "210"),
        ("Mia has 3 bags with 7 apples each. She eats 2 apples. How many apples are left?", "19"),
    ]
    # The blank line in train.jsonl is not a row.
    assert bad_row_report(builder)["train"] == {
        "rows": 4,
        "kept": 4,
        "skipped": {},
        "first_bad": [],
    }
    # Every gold answer is one the gsm8k verifier accepts as itself.
    for example in test:
        assert verifiers.get("gsm8k")(f"<answer>{example['answer']}</answer>", example).correct


def test_gsm8k_hugging_face_parquet_reads_main_only(tmp_path, monkeypatch):
    # The standard tfds way to pass the manual_dir, here relative to the working directory.
    monkeypatch.chdir(FIXTURES)
    builder = datasets.get_builder("gsm8k", data_dir=tmp_path)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="gsm8k/hf")
    )
    assert builder.info.metadata["source"]["manual_dir"] == str(FIXTURES / "gsm8k" / "hf")
    train = _split(builder, "train")
    assert [(e["question"], e["answer"]) for e in train] == [
        ("A tank holds 500 liters and is 40% full. How many liters are in it?", "200"),
        ("Sara buys 4 packs of pens with 6 pens in each. How many pens does she buy?", "24"),
    ]
    assert all("**" not in e["solution"] for e in train)  # the socratic row is not read
    assert [e["answer"] for e in _split(builder, "test")] == ["5"]


def test_gsm8k_malformed_rows_fail_above_threshold(tmp_path):
    manual_dir = FIXTURES / "gsm8k" / "malformed"
    with pytest.raises(MalformedRowsError) as info:
        datasets.prepare("gsm8k", data_dir=tmp_path, manual_dir=manual_dir)
    message = str(info.value)
    assert "6 of 9 rows" in message
    assert str(manual_dir) in message
    assert "train.jsonl:2: missing field 'answer'" in message
    assert "train.jsonl:3: field 'question' is not a string" in message
    assert "max_bad_fraction" in message
    # Nothing was written: a later build does not find a half-made dataset.
    builder = datasets.get_builder("gsm8k", data_dir=tmp_path, manual_dir=manual_dir)
    assert not builder.is_prepared()
    assert not list(Path(tmp_path).rglob("*.array_record*"))


def test_gsm8k_malformed_rows_skipped_and_counted(tmp_path):
    builder = datasets.prepare(
        "gsm8k",
        data_dir=tmp_path,
        manual_dir=FIXTURES / "gsm8k" / "malformed",
        max_bad_fraction=0.7,
    )
    assert [e["answer"] for e in _split(builder, "train")] == ["18", "2400", "210"]
    expected = {
        "rows": 9,
        "kept": 3,
        "skipped": {
            "field 'question' is not a string": 1,
            "gold answer after '####' is not a number": 1,
            "invalid JSON": 1,
            "missing field 'answer'": 1,
            "no '#### N' in answer": 1,
            "row is not an object": 1,
        },
        "first_bad": [
            "train.jsonl:2: missing field 'answer'",
            "train.jsonl:3: field 'question' is not a string",
            "train.jsonl:5: no '#### N' in answer",
            "train.jsonl:6: gold answer after '####' is not a number",
            "train.jsonl:7: invalid JSON",
        ],
    }
    assert bad_row_report(builder) == {"train": expected}
    # The counts are stored with the dataset: reading it back without the builder class.
    reloaded = tfds.builder_from_directory(builder.data_dir)
    assert json.loads(json.dumps(bad_row_report(reloaded))) == {"train": expected}


def test_prepared_dataset_is_reused_and_other_files_are_flagged(tmp_path, caplog):
    official = FIXTURES / "gsm8k" / "official"
    builder = datasets.prepare("gsm8k", data_dir=tmp_path, manual_dir=official)
    assert builder.info.metadata["source"]["manual_dir"] == str(official)
    assert builder.info.metadata["source"]["files"] == {
        "train": ["train.jsonl"],
        "test": ["test.jsonl"],
    }
    # Once built, no manual_dir is needed; other files are not read, and a warning says so.
    assert len(datasets.data_source("gsm8k", "train", data_dir=tmp_path)) == 4
    with caplog.at_level("WARNING"):
        again = datasets.prepare("gsm8k", data_dir=tmp_path, manual_dir=FIXTURES / "gsm8k" / "hf")
    assert len(again.as_data_source("train")) == 4
    assert f"was built from {official}" in caplog.text


@pytest.mark.parametrize("name", ["gsm8k", "math"])
def test_manual_dir_without_files_says_what_to_do(tmp_path, name):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not the data")
    with pytest.raises(ManualFilesMissing) as info:
        datasets.prepare(name, data_dir=tmp_path / "data", manual_dir=empty)
    message = str(info.value)
    assert str(empty) in message and "notes.txt" in message
    assert "test.jsonl" in message and "parquet" in message
    assert "https://" in message
    with pytest.raises(ManualFilesMissing, match="does not exist"):
        datasets.prepare(name, data_dir=tmp_path / "data", manual_dir=tmp_path / "missing")


# ----------------------------------------------------------------------------- math


def test_math500_jsonl(tmp_path):
    builder = datasets.prepare("math", data_dir=tmp_path, manual_dir=FIXTURES / "math" / "math500")
    assert list(builder.info.splits) == ["test"]
    got = {e["unique_id"]: e for e in _split(builder, "test")}
    assert {k: (e["answer"], e["subject"], e["level"]) for k, e in got.items()} == {
        "test/prealgebra/11.json": ("\\frac{5}{6}", "Prealgebra", 1),
        "test/algebra/22.json": ("\\{-2, 2\\}", "Algebra", 2),
        # No answer field: the gold is the solution's last box.
        "test/prealgebra/33.json": ("12", "Prealgebra", 1),
        "test/intermediate_algebra/44.json": ("x^2+2x+1", "Intermediate Algebra", 3),
    }
    first = got["test/prealgebra/11.json"]
    assert first["question"] == "What is $\\frac{1}{2} + \\frac{1}{3}$?"
    assert first["solution"].endswith("= \\boxed{\\frac{5}{6}}$.")
    assert first["verifier"] == "math"


def test_math_original_layout(tmp_path):
    builder = datasets.prepare("math", data_dir=tmp_path, manual_dir=FIXTURES / "math" / "original")
    train = {e["unique_id"]: e for e in _split(builder, "train")}
    assert {k: (e["answer"], e["subject"], e["level"]) for k, e in train.items()} == {
        "train/algebra/0.json": ("4", "Algebra", 1),
        # The last box counts, and \fbox is a box: not the earlier \boxed{20}.
        "train/counting_and_probability/5.json": ("10", "Counting & Probability", 2),
        # Nested braces; "Level ?" is an unknown level.
        "train/geometry/7.json": ("\\frac{\\sqrt{3}}{4}", "Geometry", 0),
    }
    assert train["train/algebra/0.json"]["question"] == "If $2x + 3 = 11$, what is $x$?"
    test = _split(builder, "test")
    assert [(e["unique_id"], e["answer"]) for e in test] == [("test/number_theory/3.json", "2")]


def test_math_parquet(tmp_path):
    builder = datasets.prepare(
        "math", data_dir=tmp_path, manual_dir=FIXTURES / "math" / "hf_parquet"
    )
    train = _split(builder, "train")
    assert [(e["question"], e["answer"], e["level"]) for e in train] == [
        ("Solve for $y$: $3y - 5 = 7$.", "4", 2),
        ("What is $\\sqrt{49}$?", "7", 1),
    ]
    assert [e["answer"] for e in _split(builder, "test")] == ["32"]


def test_math_malformed_rows_counted(tmp_path):
    manual_dir = FIXTURES / "math" / "malformed"
    with pytest.raises(MalformedRowsError, match="6 of 8 rows"):
        datasets.prepare("math", data_dir=tmp_path / "a", manual_dir=manual_dir)
    builder = datasets.prepare(
        "math", data_dir=tmp_path / "b", manual_dir=manual_dir, max_bad_fraction=0.8
    )
    assert [e["answer"] for e in _split(builder, "test")] == ["12", "\\frac{5}{6}"]
    assert bad_row_report(builder)["test"]["skipped"] == {
        "field 'answer' is not a string": 1,
        "field 'problem' is not a string": 1,
        "gold answer does not verify against itself": 1,  # answer "\frac{"
        "missing field 'solution'": 1,
        "no \\boxed{} answer in solution": 2,  # none, and one whose braces do not balance
    }


@pytest.mark.parametrize(
    "solution, expected",
    [
        ("so $x = \\boxed{4}$.", "4"),
        ("$\\boxed{1}$ or rather $\\boxed{2}$", "2"),
        ("$\\boxed{\\frac{\\sqrt{3}}{4}}$", "\\frac{\\sqrt{3}}{4}"),
        ("$\\boxed{\\{1, 2\\}}$", "\\{1, 2\\}"),
        ("$\\fbox{10}$", "10"),
        ("$\\boxed {7}$", "7"),
        ("$\\boxed{\\boxed{3}}$", "\\boxed{3}"),
        ("$\\boxed{5}$ then $\\boxed{\\frac{1}{2}$", "5"),
        ("The answer is 3.", None),
        ("$\\boxed{\\frac{1}{2}$", None),
    ],
)
def test_last_boxed(solution, expected):
    assert last_boxed(solution) == expected


def test_parse_level():
    assert [parse_level(v) for v in ("Level 5", "3", 2, "Level ?", None, True)] == [
        5,
        3,
        2,
        0,
        0,
        0,
    ]


# ----------------------------------------------------------------------------- synthetic


def _build_synthetic(tmp_path: Path, name: str, **params) -> dict[str, list[dict]]:
    task = get_task(name, **params)
    builder = task.get_builder(data_dir=tmp_path)
    builder.download_and_prepare()
    return {
        split: _by_question(data.eval_examples(builder.as_data_source(split), task=task))
        for split in ("train", "test")
    }


def test_arithmetic_chains_deterministic_disjoint_and_as_generated(tmp_path):
    params = dict(seed=3, num_train=40, num_test=20, max_ops=3, max_value=30)
    first = _build_synthetic(tmp_path / "a", "arithmetic", **params)
    again = _build_synthetic(tmp_path / "b", "arithmetic", **params)
    other = _build_synthetic(tmp_path / "c", "arithmetic", **{**params, "seed": 4})
    assert first == again
    assert first["train"] != other["train"] and first["test"] != other["test"]
    train_q = {e["question"] for e in first["train"]}
    test_q = {e["question"] for e in first["test"]}
    assert len(train_q) == 40 and len(test_q) == 20 and not train_q & test_q
    # The test split is the arithmetic module's own eval set for this seed and config.
    cfg = arithmetic.ArithmeticConfig(max_ops=3, max_value=30)
    assert first["test"] == _by_question(arithmetic.ArithmeticTask(cfg).eval_set(3, 20))
    for example in first["train"]:
        assert arithmetic.process_correct(arithmetic.target_completion(example), example)


def test_countdown_deterministic_disjoint_and_witnesses_verify(tmp_path):
    params = dict(seed=5, num_train=60, num_test=20)
    first = _build_synthetic(tmp_path / "a", "countdown", **params)
    again = _build_synthetic(tmp_path / "b", "countdown", **params)
    other = _build_synthetic(tmp_path / "c", "countdown", **{**params, "seed": 6})
    assert first == again
    assert first["train"] != other["train"]

    def key(e):
        return tuple(sorted(e["numbers"])), e["target"]

    train_keys = {key(e) for e in first["train"]}
    test_keys = {key(e) for e in first["test"]}
    assert len(train_keys) == 60 and len(test_keys) == 20 and not train_keys & test_keys
    verify = verifiers.get("countdown")
    for example in first["train"] + first["test"]:
        assert 3 <= len(example["numbers"]) <= 4
        assert all(1 <= n <= 99 for n in example["numbers"]) and 1 <= example["target"] <= 99
        assert str(example["numbers"]) in example["question"]
        assert f"equals {example['target']}." in example["question"]
        response = f"<think>\n</think>\n<answer>{example['answer']}</answer>"
        assert verify(response, example).correct, example


def test_synthetic_configs_are_named_by_their_parameters(tmp_path):
    a = datasets.get_builder("countdown", data_dir=tmp_path, seed=1, num_train=10, num_test=5)
    b = datasets.get_builder("countdown", data_dir=tmp_path, seed=2, num_train=10, num_test=5)
    assert a.data_dir != b.data_dir
    with pytest.raises(TypeError, match="valid: seed"):
        datasets.get_builder("countdown", data_dir=tmp_path, max_numbers=5)
    with pytest.raises(ValueError, match="min_count"):
        datasets.get_builder("countdown", data_dir=tmp_path, min_count=5)
    with pytest.raises(ValueError, match="takes no manual_dir"):
        datasets.get_builder("arithmetic_chains", data_dir=tmp_path, manual_dir=tmp_path)
    names = "arithmetic_chains, countdown, gsm8k, humaneval, math, mbpp"
    with pytest.raises(ValueError, match=f"valid names: {names}"):
        datasets.get_builder("gsm9k", data_dir=tmp_path)


# ----------------------------------------------------------------------------- registry


def test_get_task_names_and_errors():
    for name, verifier, builder in [
        ("arithmetic", "arithmetic", "arithmetic_chains"),
        ("countdown", "countdown", "countdown"),
        ("gsm8k", "gsm8k", "gsm8k"),
        ("math", "math", "math"),
        ("humaneval", "code", "humaneval"),
        ("mbpp", "code", "mbpp"),
        ("jsonl", "math", "jsonl"),
    ]:
        task = get_task(name)
        assert (task.name, task.verifier_name, task.builder) == (name, verifier, builder)
    assert get_task("gsm8k", verifier="math").verifier_name == "math"
    names = "arithmetic, countdown, gsm8k, humaneval, jsonl, math, mbpp"
    with pytest.raises(ValueError, match=f"valid names: {names}"):
        get_task("aime")
    with pytest.raises(ValueError, match="unknown verifier 'exact' for task 'gsm8k'") as info:
        get_task("gsm8k", verifier="exact")
    # Other modules may register more verifiers; the built-ins are always listed.
    assert all(n in str(info.value) for n in ["arithmetic", "code", "countdown", "gsm8k", "math"])
    with pytest.raises(TypeError, match="valid: max_bad_fraction$"):
        get_task("gsm8k", seed=1)
    with pytest.raises(ValueError, match="max_ops"):
        get_task("arithmetic", max_ops=0)


def test_task_prompt_and_validation():
    task = get_task("countdown")
    example = {
        "question": "Using the numbers [1, 2, 3], create an equation that equals 6.",
        "answer": "1 + 2 + 3",
        "numbers": [1, 2, 3],
        "target": 6,
        "verifier": "countdown",
    }
    assert task.prompt(example) == templates.make_prompt(example["question"])
    assert task.validate(example) is None
    assert task.validate({**example, "numbers": ["1", 2]}) == (
        "numbers is not a non-empty list of integers"
    )
    assert task.validate({**example, "verifier": "nope"}) == "unknown verifier name"
    assert get_task("gsm8k").validate({"question": "q", "answer": "#### ten"}) == (
        "unparseable gold answer"
    )
    assert get_task("math").validate({"question": "q", "answer": "\\frac{1}{2"}) == (
        "unbalanced braces in gold answer"
    )
    assert registry.validate_example({"question": "q"}) == "missing field 'answer'"
    assert registry.validate_example({"question": b"q", "answer": "1"}) == (
        "field 'question' is not a string"
    )
