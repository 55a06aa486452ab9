"""Examples from JSON Lines files, for quick experiments without a tfds builder.

A directory holds one file per split, ``<split>.jsonl`` (``train.jsonl``, ``test.jsonl``), one
example per line: ``{"question": ..., "answer": ..., "verifier": "math"}`` and any fields the
verifier reads (``numbers`` and ``target`` for countdown, ``tests`` for code). ``verifier`` is
optional per row; a row without it is checked by the task's verifier (``get_task("jsonl",
verifier=...)``, ``math`` by default). Rows that fail the task's checks are skipped and counted
like a dataset's malformed rows; a line that is not JSON stops the run, naming file and line.

In a config: ``--config.task.name=jsonl --config.data.manual_dir=DIR``.
"""

from __future__ import annotations

import json
from pathlib import Path

SUFFIX = ".jsonl"


def split_path(split: str, manual_dir: str | Path | None) -> Path:
    if manual_dir is None or not str(manual_dir):
        raise ValueError(
            "task 'jsonl' reads <manual_dir>/<split>.jsonl: set config.data.manual_dir (or "
            "pass manual_dir=) to the directory holding train.jsonl and test.jsonl"
        )
    path = Path(manual_dir).expanduser() / f"{split}{SUFFIX}"
    if not path.is_file():
        parent = path.parent
        have = sorted(p.name for p in parent.glob(f"*{SUFFIX}")) if parent.is_dir() else []
        raise FileNotFoundError(
            f"task 'jsonl': no split {split!r} at {path} (found: {', '.join(have) or 'none'})"
        )
    return path


class Rows(list):
    """A split's rows; ``source_name`` (the file) names it in malformed-row reports."""

    source_name: str = ""


def read_split(split: str, manual_dir: str | Path | None) -> Rows:
    """The examples of ``<manual_dir>/<split>.jsonl`` (blank lines are skipped)."""
    path = split_path(split, manual_dir)
    rows = Rows()
    rows.source_name = str(path)
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{number}: not a JSON object ({e.msg}); fix or remove the line"
                ) from None
    if not rows:
        raise ValueError(f"{path} holds no examples")
    return rows
