"""Finding and reading the files a user downloaded into a tfds ``manual_dir``.

A dataset that cannot be downloaded at build time is described by one or more `Layout`s: the
file patterns of each split in one of the forms it is distributed in (the official JSONL, one
JSON file per problem, Hugging Face parquet). The first layout with any file wins, so a
directory holding two layouts is read in one of them, always the same one. A directory holding
none stops with `ManualFilesMissing`, which names the directory, the files expected and where
to download them.

Rows are read as ``(where, row, reason)``: ``where`` is ``"file:line"`` (or ``"file"`` for a
one-problem file, ``"file:row N"`` for parquet), ``row`` the parsed object or None, ``reason``
why a row could not be parsed at all (invalid JSON) or None.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

FORMATS = ("jsonl", "json", "parquet")


class ManualFilesMissing(FileNotFoundError):
    """The manual_dir does not exist or holds none of the expected files."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """One distributed form of a dataset.

    Attributes:
      description: what the user should put in the manual_dir, for error messages.
      patterns: split name -> glob patterns relative to the manual_dir.
      format: "jsonl" (a row per line), "json" (a row per file) or "parquet".
    """

    description: str
    patterns: Mapping[str, tuple[str, ...]]
    format: str

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"Layout.format must be one of {FORMATS}, got {self.format!r}")

    def find(self, root: Path) -> dict[str, list[Path]]:
        """Split -> sorted files under ``root`` (splits without files are left out)."""
        found = {}
        for split, patterns in self.patterns.items():
            files = sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})
            if files:
                found[split] = files
        return found


def find_layout(
    dataset: str, root: Path | str | None, layouts: tuple[Layout, ...], download: str
) -> tuple[Layout, dict[str, list[Path]]]:
    """The first of ``layouts`` with files under ``root``, and its files per split.

    Raises:
      ManualFilesMissing: ``root`` is unset, missing, or holds none of the layouts' files; the
        message names the directory, every expected layout and ``download`` (where to get them).
    """
    expected = "; or ".join(layout.description for layout in layouts)
    how = (
        f"Expected {expected}. Download them from {download}, put them in the manual_dir, and "
        "build again (pass manual_dir=... to the builder, or "
        "download_config=tfds.download.DownloadConfig(manual_dir=...))."
    )
    if root is None:
        raise ManualFilesMissing(f"{dataset}: no manual_dir given. {how}")
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise ManualFilesMissing(f"{dataset}: manual_dir {str(root)!r} does not exist. {how}")
    for layout in layouts:
        files = layout.find(root)
        if files:
            return layout, files
    present = sorted(os.listdir(root))[:10]
    raise ManualFilesMissing(
        f"{dataset}: manual_dir {str(root)!r} holds none of the expected files (it has: "
        f"{', '.join(present) or 'nothing'}). {how}"
    )


def read_rows(path: Path, fmt: str, root: Path) -> Iterator[tuple[str, Any, str | None]]:
    """``(where, row, reason)`` for each row of ``path`` (see the module docstring).

    Blank lines of a JSONL file are not rows. A parquet file that cannot be read at all raises
    ValueError naming it: that is a broken download, not a few bad rows.
    """
    name = _relative(path, root)
    if fmt == "jsonl":
        with open(path, "rb") as f:
            for line_number, raw in enumerate(f, 1):
                where = f"{name}:{line_number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    yield where, None, "not UTF-8 text"
                    continue
                if line.strip():
                    yield _parsed_json(where, line)
    elif fmt == "json":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            yield name, None, "not UTF-8 text"
            return
        yield _parsed_json(name, text)
    elif fmt == "parquet":
        import pyarrow.parquet as pq  # a dependency of tensorflow-datasets

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise ValueError(
                f"cannot read parquet file {str(path)!r} ({type(e).__name__}: {e}); download it "
                "again"
            ) from e
        for i, row in enumerate(rows):
            yield f"{name}:row {i}", row, None
    else:
        raise ValueError(f"unknown file format {fmt!r}; expected one of {FORMATS}")


def _parsed_json(where: str, text: str) -> tuple[str, Any, str | None]:
    try:
        return where, json.loads(text), None
    except json.JSONDecodeError:
        return where, None, "invalid JSON"


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
