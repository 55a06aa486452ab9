"""GSM8K grade-school math word problems, built from the files the user downloaded.

Layouts read (the first one present wins):

- the official JSONL, ``train.jsonl`` / ``test.jsonl`` (the contents of
  ``grade_school_math/data/`` in github.com/openai/grade-school-math), or that repository's
  checkout with the files under ``grade_school_math/data/``;
- Hugging Face parquet, ``main/train-00000-of-00001.parquet`` / ``main/test-...`` (the ``main``
  configuration of ``openai/gsm8k``; ``socratic`` is not read) or the same files at the top.

Each row has ``question`` and ``answer``; the answer is a worked solution ending in
``#### N``. An example is::

    {"question": <the question>, "answer": "72" (the number after the last ####, commas
     removed), "solution": <the full answer text>, "verifier": "gsm8k"}

Rows without a string question/answer, without ``####`` or whose gold is not a number (as the
``gsm8k`` verifier parses it) are skipped and counted (see `builder_base`).
"""

from __future__ import annotations

from typing import Any

import tensorflow_datasets as tfds

from rl_reason.tasks import manual_files
from rl_reason.tasks.bad_rows import required_str
from rl_reason.tasks.builder_base import Example, ManualDirBuilder
from rl_reason.verifiers.gsm8k import parse_number

VERIFIER = "gsm8k"
NAME = "gsm8k"

LAYOUTS = (
    manual_files.Layout(
        "train.jsonl and/or test.jsonl (JSON lines with 'question' and 'answer')",
        {
            "train": ("train.jsonl", "grade_school_math/data/train.jsonl"),
            "test": ("test.jsonl", "grade_school_math/data/test.jsonl"),
        },
        "jsonl",
    ),
    manual_files.Layout(
        "main/train-00000-of-00001.parquet and/or main/test-00000-of-00001.parquet",
        {
            "train": ("main/train-*.parquet", "train-*.parquet"),
            "test": ("main/test-*.parquet", "test-*.parquet"),
        },
        "parquet",
    ),
)
DOWNLOAD = (
    "https://github.com/openai/grade-school-math (grade_school_math/data/) or "
    "https://huggingface.co/datasets/openai/gsm8k (main/)"
)


def gold_answer(answer: str) -> str | None:
    """The number after the last ``####`` without thousands commas, or None if there is none."""
    if "####" not in answer:
        return None
    gold = answer.rsplit("####", 1)[1].strip()
    if parse_number(gold) is None:
        return None
    return gold.replace(",", "")


def parse_row(row: Any) -> tuple[Example | None, str | None]:
    """One GSM8K row -> ``(example, None)`` or ``(None, reason)``."""
    question, reason = required_str(row, "question")
    if reason:
        return None, reason
    answer, reason = required_str(row, "answer")
    if reason:
        return None, reason
    if "####" not in answer:
        return None, "no '#### N' in answer"
    gold = gold_answer(answer)
    if gold is None:
        return None, "gold answer after '####' is not a number"
    return {
        "question": question.strip(),
        "answer": gold,
        "solution": answer.strip(),
        "verifier": VERIFIER,
    }, None


class Gsm8k(ManualDirBuilder, skip_registration=True):
    """GSM8K from a manual_dir (see the module docstring)."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = "GSM8K grade-school math word problems; gold = the number after '####'."
    HOMEPAGE = "https://github.com/openai/grade-school-math"
    LAYOUTS = LAYOUTS
    DOWNLOAD = DOWNLOAD

    def _features(self) -> tfds.features.FeaturesDict:
        return tfds.features.FeaturesDict(
            {
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "solution": tfds.features.Text(),
                "verifier": tfds.features.Text(),
            }
        )

    def parse_row(self, row: Any, where: str, source: str) -> tuple[Example | None, str | None]:
        return parse_row(row)
