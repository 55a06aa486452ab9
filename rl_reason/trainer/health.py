"""The divergence guard: which steps are healthy, and what a run that diverged leaves behind.

A step is unhealthy when one of its updates had a non-finite loss or gradient (the update is
skipped), or when the policy's entropy on its own samples moved by more than
`max_entropy_change` nats from the last healthy step's: a finite update that blew the policy up
shows first in the next step's samples (an absurd learning rate turns a trained policy uniform,
entropy ln V, or collapses a fresh one onto a single token, entropy 0, in one update), and the
entropy stays far from the healthy one while the streak lasts. `max_nonfinite_steps` unhealthy
steps in a row stop the run.

Checkpoints follow the same rule. The weights saved at step s are trusted once step s + 1 was
healthy, so when the guard stops a run it moves aside every checkpoint from the step before the
failing streak on, and the newest checkpoint left is a healthy one; a checkpoint written inside
a streak (a run killed before the guard stopped it) is marked, and resume skips it the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any


class DivergedError(FloatingPointError):
    """The run stopped on unhealthy steps; the message says how to go on."""


@dataclasses.dataclass
class Health:
    max_unhealthy: int
    max_entropy_change: float  # 0: entropy is not watched
    in_a_row: int = 0
    nonfinite_total: int = 0
    streak_start: int | None = None  # the first step of the current unhealthy streak
    entropy: float | None = None  # of the last healthy step

    def observe(self, step: int, finite: Sequence[float], entropy: float) -> list[str]:
        """Record step `step` (1-based) from its updates' `finite` flags and its samples'
        entropy; returns why it is unhealthy (empty when it is healthy)."""
        why = []
        skipped = sum(1 for f in finite if not f)
        if skipped:
            self.nonfinite_total += skipped
            why.append(f"{skipped} of {len(finite)} updates had a non-finite loss or gradient")
        change = abs(entropy - self.entropy) if self.entropy is not None else 0.0
        if self.max_entropy_change and not change <= self.max_entropy_change:
            why.append(
                f"the policy's entropy went {self.entropy:.3f} -> {entropy:.3f} nats (more than "
                f"max_entropy_change={self.max_entropy_change:g} from the last healthy step: "
                "an update blew it up)"
            )
        if why:
            self.in_a_row += 1
            self.streak_start = step if self.streak_start is None else self.streak_start
        else:
            self.in_a_row, self.streak_start = 0, None
            self.entropy = entropy
        return why

    @property
    def healthy(self) -> bool:
        return self.in_a_row == 0

    @property
    def should_stop(self) -> bool:
        return self.in_a_row >= self.max_unhealthy

    def last_trusted_step(self) -> int | None:
        """Checkpoints after this step are not to be resumed from (None: all are fine)."""
        return None if self.streak_start is None else self.streak_start - 2

    def to_meta(self) -> dict[str, Any]:
        return {
            "nonfinite_in_a_row": self.in_a_row,
            "nonfinite_total": self.nonfinite_total,
            "healthy": self.healthy,
            "streak_start": self.streak_start,
            "healthy_entropy": self.entropy,
        }

    def load_meta(self, counters: Mapping[str, Any]) -> None:
        self.in_a_row = counters["nonfinite_in_a_row"]
        self.nonfinite_total = counters["nonfinite_total"]
        self.streak_start = counters.get("streak_start")
        self.entropy = counters.get("healthy_entropy")


def untrusted_from(meta: Mapping[str, Any] | None) -> int | None:
    """For the newest checkpoint's meta: the first step not to resume from, when that checkpoint
    was written inside an unhealthy streak (None when it is healthy)."""
    counters = (meta or {}).get("trainer", {})
    if counters.get("healthy", True) or counters.get("streak_start") is None:
        return None
    return counters["streak_start"] - 1


def stop_diverged(health: Health, why: Sequence[str], checkpointer) -> None:
    """Leave the newest checkpoint a healthy one, and raise DivergedError saying how to go on."""
    moved, kept = [], None
    if checkpointer is not None:
        moved = checkpointer.discard_from(health.last_trusted_step() + 1)
        kept = checkpointer.latest_step()
    raise DivergedError(_stop_message(why, health.in_a_row, moved, kept))


def _stop_message(why: Sequence[str], in_a_row: int, moved: Sequence[int], kept: int | None) -> str:
    where = (
        f"resume from the healthy checkpoint of step {kept} by rerunning with safer options "
        "(the same workdir), or start fresh in a new workdir"
        if kept is not None
        else "no healthy checkpoint is left: start fresh (a new workdir, or remove its "
        "checkpoints/ and metrics.jsonl)"
    )
    aside = (
        f" Checkpoints of steps {list(moved)} were moved aside (<step>.diverged)." if moved else ""
    )
    return (
        f"{in_a_row} unhealthy steps in a row (last: {'; '.join(why)}); stopped. Lower the "
        "learning rate, check the data, or set dtype=float32." + aside + f" To go on, {where}."
    )
