r"""MATH competition problems (Hendrycks et al.) and MATH-500, built from downloaded files.

Layouts read (the first one present wins):

- JSONL ``train.jsonl`` / ``test.jsonl`` with ``problem``, ``solution``, ``answer``, ``subject``,
  ``level``, ``unique_id``: MATH-500 (``test.jsonl`` of HuggingFaceH4/MATH-500) and PRM800K's
  ``math_splits``;
- the original release: ``train/<subject>/<id>.json`` / ``test/<subject>/<id>.json`` (also
  under ``MATH/``), each with ``problem``, ``level`` ("Level 5"), ``type`` and ``solution``;
- parquet: ``**/train-*.parquet`` / ``**/test-*.parquet`` (or ``**/<split>/*.parquet``), with
  the fields of either form above (hendrycks_math, competition_math, MATH-500 conversions).

The gold answer is the ``answer`` field when a row has one, else the content of the last
``\boxed{...}`` (or ``\fbox{...}``) of the solution, braces balanced. An example is::

    {"question": <problem>, "answer": "\frac{1}{2}", "solution": <solution>,
     "subject": "Algebra", "level": 3 (0 when unknown), "unique_id": "test/algebra/1.json",
     "verifier": "math"}

With ``verify_gold=True`` (default) a gold answer must also pass the ``math`` verifier against
itself (``\boxed{gold}`` vs gold): a gold that math-verify cannot parse would otherwise stop a
training run when its problem is drawn. That costs a few ms per row (about half a minute for
the 12,500 MATH problems) once, at build time. Failing rows are skipped and counted.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from rl_reason.tasks import manual_files
from rl_reason.tasks.bad_rows import DEFAULT_MAX_BAD_FRACTION, required_str
from rl_reason.tasks.builder_base import Example, ManualDirBuilder

VERIFIER = "math"
NAME = "math"

LAYOUTS = (
    manual_files.Layout(
        "train.jsonl and/or test.jsonl (MATH-500 form: problem, solution, answer, subject, "
        "level, unique_id)",
        {"train": ("train.jsonl",), "test": ("test.jsonl",)},
        "jsonl",
    ),
    manual_files.Layout(
        "train/<subject>/<id>.json and/or test/<subject>/<id>.json (the original MATH release: "
        "problem, level, type, solution)",
        {
            "train": ("train/*/*.json", "MATH/train/*/*.json"),
            "test": ("test/*/*.json", "MATH/test/*/*.json"),
        },
        "json",
    ),
    manual_files.Layout(
        "parquet files named train-*.parquet / test-*.parquet (or in train/ and test/ folders)",
        {
            "train": ("**/train-*.parquet", "**/train.parquet", "**/train/*.parquet"),
            "test": ("**/test-*.parquet", "**/test.parquet", "**/test/*.parquet"),
        },
        "parquet",
    ),
)
DOWNLOAD = (
    "https://huggingface.co/datasets/HuggingFaceH4/MATH-500 (test.jsonl), "
    "https://github.com/hendrycks/math (MATH.tar: train/ and test/) or "
    "https://huggingface.co/datasets/EleutherAI/hendrycks_math (parquet)"
)

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_TOKENS = re.compile(r"\\.|[{}]", re.DOTALL)
_LEVEL = re.compile(r"^\s*(?:level\s*)?(\d+)\s*$", re.IGNORECASE)


def last_boxed(solution: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` / ``\fbox{...}`` whose braces balance, else None.

    Escaped braces (``\{``, ``\}``) are text, not grouping: ``\boxed{\{1, 2\}}`` gives
    ``\{1, 2\}``. A box nested in another counts as part of the outer one.
    """
    result = None
    pos = 0
    while True:
        match = _BOX.search(solution, pos)
        if match is None:
            return result
        depth = 0
        for token in _BRACE_TOKENS.finditer(solution, match.end() - 1):
            if token.group() == "{":
                depth += 1
            elif token.group() == "}":
                depth -= 1
                if depth == 0:
                    result = solution[match.end() : token.start()].strip()
                    pos = token.end()
                    break
        else:  # unbalanced: nothing after this can close it either
            return result


def parse_level(level: Any) -> int:
    """``"Level 3"``, ``"3"`` or ``3`` -> 3; anything else (MATH has "Level ?") -> 0."""
    if isinstance(level, bool):
        return 0
    if isinstance(level, int):
        return level
    if isinstance(level, str):
        match = _LEVEL.match(level)
        if match:
            return int(match[1])
    return 0


def _subject_from_path(source: str) -> str:
    # train/counting_and_probability/12.json -> "Counting & Probability", as MATH's "type".
    parts = PurePosixPath(source).parts
    if len(parts) >= 2:
        return parts[-2].replace("_and_", " & ").replace("_", " ").title()
    return ""


def _unique_id(source: str) -> str:
    parts = PurePosixPath(source).parts
    if parts and parts[0] == "MATH":
        parts = parts[1:]
    return "/".join(parts)


def self_check(gold: str) -> str | None:
    """Why ``gold`` does not verify against itself with the ``math`` verifier, or None."""
    from rl_reason.verifiers.math_equivalence import verify_math

    try:
        result = verify_math("\\boxed{" + gold + "}", {"answer": gold})
    except ValueError:
        return "gold answer cannot be parsed by math-verify"
    return None if result.correct else "gold answer does not verify against itself"


def parse_row(
    row: Any, source: str = "", *, verify_gold: bool = True
) -> tuple[Example | None, str | None]:
    """One MATH row -> ``(example, None)`` or ``(None, reason)``.

    ``source`` is the row's file relative to the manual_dir: for one-problem JSON files it gives
    the subject (when the row has none) and the unique_id.
    """
    problem, reason = required_str(row, "problem")
    if reason:
        return None, reason
    solution, reason = required_str(row, "solution")
    if reason:
        return None, reason
    if row.get("answer") is not None:
        gold, reason = required_str(row, "answer")
        if reason:
            return None, reason
        gold = gold.strip()
    else:
        gold = last_boxed(solution)
        if not gold:
            return None, "no \\boxed{} answer in solution"
    if verify_gold:
        reason = self_check(gold)
        if reason:
            return None, reason
    subject = row.get("subject") or row.get("type")
    if not isinstance(subject, str):
        subject = _subject_from_path(source) if source.endswith(".json") else ""
    unique_id = row.get("unique_id")
    if not isinstance(unique_id, str):
        unique_id = _unique_id(source) if source.endswith(".json") else ""
    return {
        "question": problem.strip(),
        "answer": gold,
        "solution": solution,
        "subject": subject,
        "level": parse_level(row.get("level")),
        "unique_id": unique_id,
        "verifier": VERIFIER,
    }, None


class Math(ManualDirBuilder, skip_registration=True):
    """MATH / MATH-500 from a manual_dir (see the module docstring).

    Args:
      verify_gold: check each gold answer with the ``math`` verifier at build time.
      manual_dir, max_bad_fraction, **kwargs: see `ManualDirBuilder` and tfds.
    """

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = "MATH / MATH-500 competition problems; gold = answer field or last \\boxed{}."
    HOMEPAGE = "https://github.com/hendrycks/math"
    LAYOUTS = LAYOUTS
    DOWNLOAD = DOWNLOAD

    def __init__(
        self,
        *,
        verify_gold: bool = True,
        manual_dir: Any = None,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
        **kwargs: Any,
    ):
        self._verify_gold = bool(verify_gold)
        super().__init__(manual_dir=manual_dir, max_bad_fraction=max_bad_fraction, **kwargs)

    def _features(self) -> tfds.features.FeaturesDict:
        return tfds.features.FeaturesDict(
            {
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "solution": tfds.features.Text(),
                "subject": tfds.features.Text(),
                "level": np.int32,
                "unique_id": tfds.features.Text(),
                "verifier": tfds.features.Text(),
            }
        )

    def parse_row(self, row: Any, where: str, source: str) -> tuple[Example | None, str | None]:
        return parse_row(row, source, verify_gold=self._verify_gold)
