"""Progress lines for long loops: ``[stage 1] 300/1500 | loss 1.234 | 2.61 it/s | ETA 7m40s``.

The GRPO loop reports through `MetricsWriter`; every other long loop (pretraining, evaluation,
research sweeps) takes one of these, so a user always sees how far it is and how long is left.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rl_reason.infra.metrics import format_duration


class Progress:
    """Prints a line every `every` items (and at the last one) with rate and ETA.

    The rate is measured from the first `update`, not from construction, so a first item that
    includes compilation inflates the ETA only until later items dilute it.
    """

    def __init__(
        self,
        label: str,
        total: int,
        echo: Callable[[str], None] = print,
        *,
        every: int | None = None,
        unit: str = "it",
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.label, self.total, self.echo, self.unit = label, total, echo, unit
        self.every = max(total // 10, 1) if every is None else max(every, 1)
        self._clock = clock
        self._t0 = clock()
        self._first: tuple[int, float] | None = None

    def update(self, done: int, **values: float) -> None:
        now = self._clock()
        if self._first is None:
            self._first = (done, now)
        if done % self.every and done != self.total:
            return
        parts = [f"[{self.label}] {done}/{self.total}"]
        parts += [f"{k} {v:.3f}" for k, v in values.items()]
        first_done, first_t = self._first
        if done > first_done and now > first_t:
            rate = (done - first_done) / (now - first_t)
            parts.append(f"{rate:.2f} {self.unit}/s")
            parts.append(f"ETA {format_duration((self.total - done) / rate)}")
        parts.append(f"{format_duration(now - self._t0)} elapsed")
        self.echo(" | ".join(parts))
