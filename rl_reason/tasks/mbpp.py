"""MBPP (Austin et al. 2021): short Python programming problems with three assert tests each,
built from the files the user downloaded.

Layouts read (the first one present wins):

- the original ``mbpp.jsonl`` (github.com/google-research/google-research, ``mbpp/``): all 974
  problems in one file, split by ``task_id`` as the paper does (test 11-510, validation 511-600,
  train 601-974, prompt 1-10);
- Hugging Face parquet of the ``full`` configuration (``full/train-*.parquet``,
  ``full/test-*.parquet``, ``full/validation-*.parquet``, ``full/prompt-*.parquet``).

An example is::

    {"question": <description, the first test, the instruction of `code_prompts`>,
     "answer": <the reference program>, "tests": <test_setup_code + the asserts of test_list>,
     "task_id": "11", "verifier": "code"}

The first test is shown in the question (it fixes the function's name and signature, as in the
paper's prompt); all three are checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from rl_reason.tasks import code_prompts, manual_files
from rl_reason.tasks.bad_rows import required_str
from rl_reason.tasks.builder_base import Example, ManualDirBuilder

VERIFIER = "code"
NAME = "mbpp"
# task_id ranges of the original file's splits (inclusive), as in the paper and its release.
TASK_ID_SPLITS = {
    "prompt": (1, 10),
    "test": (11, 510),
    "validation": (511, 600),
    "train": (601, 974),
}
_ALL_SPLITS = tuple(TASK_ID_SPLITS)

LAYOUTS = (
    manual_files.Layout(
        "mbpp.jsonl (the original release: task_id, text, code, test_list, test_setup_code)",
        {split: ("mbpp.jsonl",) for split in _ALL_SPLITS},
        "jsonl",
    ),
    manual_files.Layout(
        "full/<split>-*.parquet (the Hugging Face 'full' configuration)",
        {split: (f"full/{split}-*.parquet", f"{split}-*.parquet") for split in _ALL_SPLITS},
        "parquet",
    ),
)
DOWNLOAD = (
    "https://github.com/google-research/google-research/tree/master/mbpp (mbpp.jsonl) or "
    "https://huggingface.co/datasets/google-research-datasets/mbpp (full/)"
)


def parse_row(row: Any) -> tuple[Example | None, str | None]:
    """One MBPP row -> ``(example, None)`` or ``(None, reason)``."""
    text, reason = required_str(row, "text")
    if reason:
        return None, reason
    code, reason = required_str(row, "code")
    if reason:
        return None, reason
    tests = row.get("test_list")
    if hasattr(tests, "tolist"):  # parquet lists may arrive as arrays
        tests = tests.tolist()
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        return None, "test_list is not a non-empty list of strings"
    setup = row.get("test_setup_code") or ""
    if not isinstance(setup, str) or not isinstance(row.get("task_id"), int):
        return None, "task_id or test_setup_code of the wrong type"
    return {
        "question": code_prompts.described_question(text, tests[0]),
        "answer": code.replace("\r\n", "\n"),
        "tests": "\n".join(filter(None, [setup.replace("\r\n", "\n"), *tests])),
        "task_id": str(row["task_id"]),
        "verifier": VERIFIER,
    }, None


class Mbpp(ManualDirBuilder, skip_registration=True):
    """MBPP from a manual_dir (see the module docstring)."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = "MBPP: 974 short Python problems, each with three assert tests."
    HOMEPAGE = "https://github.com/google-research/google-research/tree/master/mbpp"
    LAYOUTS = LAYOUTS
    DOWNLOAD = DOWNLOAD

    def _features(self) -> tfds.features.FeaturesDict:
        fields = ("question", "answer", "tests", "task_id", "verifier")
        return tfds.features.FeaturesDict({f: tfds.features.Text() for f in fields})

    def parse_row(self, row: Any, where: str, source: str) -> tuple[Example | None, str | None]:
        return parse_row(row)

    def _read_split(
        self, split: str, paths: list[Path], layout: manual_files.Layout, root: Path
    ) -> list[tuple[str, Example]]:
        examples = super()._read_split(split, paths, layout, root)
        if layout.format != "jsonl":
            return examples
        low, high = TASK_ID_SPLITS[split]  # the one file holds every split
        kept = [(w, ex) for w, ex in examples if low <= int(ex["task_id"]) <= high]
        if not kept:
            self._empty_splits.add(split)
        return kept

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        # A file without any problem of a split (a subset of mbpp.jsonl) has no such split.
        self._empty_splits: set[str] = set()
        generators = super()._split_generators(dl_manager)
        return {s: g for s, g in generators.items() if s not in self._empty_splits}
