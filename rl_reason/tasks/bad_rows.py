"""Skip-and-count of malformed dataset rows, with a threshold that stops the run.

A few broken rows in a large file (a missing field, a gold answer that does not parse) should
not stop a build or a training run, but they must not vanish silently either, and a file that is
mostly broken (the wrong file, a changed layout) must stop everything before any of it is used.
`BadRows` does both: ``skip(where, reason)`` counts a row per reason and keeps the first few
locations; ``check()`` raises `MalformedRowsError` when the skipped share exceeds
``max_bad_fraction``; ``report()`` is the JSON-able summary that builders store in their
metadata and pipelines expose.

Reasons are short categories without the row's values ("missing field 'answer'"), so that
counts per reason stay meaningful; the location (``file:line``) goes with the first examples.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MAX_BAD_FRACTION = 0.01
MAX_EXAMPLES = 5


class MalformedRowsError(ValueError):
    """Too many malformed rows: the data is probably not what the reader expects."""


def check_max_bad_fraction(max_bad_fraction: float) -> float:
    if isinstance(max_bad_fraction, bool) or not isinstance(max_bad_fraction, int | float):
        raise TypeError(f"max_bad_fraction must be a number, got {max_bad_fraction!r}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    return float(max_bad_fraction)


@dataclasses.dataclass
class BadRows:
    """Counts of read and skipped rows of one dataset part (``what``, e.g. "gsm8k train").

    Attributes:
      what: names the data in messages.
      max_bad_fraction: ``check()`` fails when skipped / rows is above this.
      rows: rows seen, good and bad.
      skipped: skipped rows per reason.
      first_bad: ``"where: reason"`` of the first `MAX_EXAMPLES` skipped rows.
    """

    what: str
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION
    rows: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first_bad: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.max_bad_fraction = check_max_bad_fraction(self.max_bad_fraction)

    def keep(self) -> None:
        """Counts one good row."""
        self.rows += 1

    def skip(self, where: str, reason: str) -> None:
        """Counts one malformed row at ``where`` (a file:line or an index) for ``reason``."""
        self.rows += 1
        self.skipped[reason] += 1
        if len(self.first_bad) < MAX_EXAMPLES:
            self.first_bad.append(f"{where}: {reason}")

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def kept(self) -> int:
        return self.rows - self.num_skipped

    def check(self) -> None:
        """Logs what was skipped; raises `MalformedRowsError` above the threshold or if no row
        is usable."""
        bad = self.num_skipped
        if self.rows == 0:
            raise MalformedRowsError(f"{self.what}: no rows at all; check the input files")
        fraction = bad / self.rows
        if fraction > self.max_bad_fraction or bad == self.rows:
            raise MalformedRowsError(
                f"{self.what}: {bad} of {self.rows} rows ({fraction:.1%}) are malformed, above "
                f"max_bad_fraction={self.max_bad_fraction:g}. Reasons: {self._reasons()}. First "
                f"bad rows: {'; '.join(self.first_bad)}. Fix or remove these rows (is this the "
                "right file?), or raise max_bad_fraction to skip them (a recipe config: "
                "--config.task.params.max_bad_fraction)."
            )
        if bad:
            log.warning(
                "%s: skipped %d of %d malformed rows (%s); first: %s",
                self.what,
                bad,
                self.rows,
                self._reasons(),
                "; ".join(self.first_bad),
            )

    def report(self) -> dict[str, Any]:
        """``{"rows", "kept", "skipped": {reason: count}, "first_bad": [...]}`` (JSON-able)."""
        return {
            "rows": self.rows,
            "kept": self.kept,
            "skipped": dict(sorted(self.skipped.items())),
            "first_bad": list(self.first_bad),
        }

    def _reasons(self) -> str:
        return ", ".join(f"{reason}: {n}" for reason, n in self.skipped.most_common())


def required_str(row: Any, field: str) -> tuple[str | None, str | None]:
    """``(value, None)`` for a non-empty string field of a dict row, else ``(None, reason)``."""
    if not isinstance(row, dict):
        return None, "row is not an object"
    if field not in row or row[field] is None:
        return None, f"missing field {field!r}"
    value = row[field]
    if not isinstance(value, str):
        return None, f"field {field!r} is not a string"
    if not value.strip():
        return None, f"empty field {field!r}"
    return value, None
