"""Stop a training loop at a step boundary when the job is preempted (SIGTERM).

Schedulers announce preemption with SIGTERM and kill the process some seconds later. The loop
must then finish the step it is in, save a checkpoint and exit 0, rather than die mid-step or
mid-write. ``PreemptionGuard`` turns the signal into a question the loop asks once per step::

    with PreemptionGuard() as guard:
        for step in range(start, total):
            state = train_step(state)
            stop = guard.should_stop(step + 1)
            ckpt.save(step + 1, state, meta, force=stop)
            if stop:
                ckpt.wait()
                break

One process: the guard installs its own handler for the given signals on entry and puts the
previous handlers back on exit. The handler only sets a flag, so a second SIGTERM that arrives
while the checkpoint is being written changes nothing and cannot interrupt the write.

Several processes (after ``jax.distributed.initialize``): JAX's preemption notifier already
catches SIGTERM and tells the coordination service, and all hosts must stop at the same step or
the collective save hangs. The guard then installs no handler and asks
``multihost_utils.reached_preemption_sync_point(step)``, which answers True on every host at the
same step once any of them was signalled. Call ``should_stop`` at every step, on every process,
with increasing step numbers, as that protocol requires.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class PreemptionGuard:
    """Context manager that answers "should the loop stop and save now?" once per step.

    Args:
      signals: the signals that mean "preempted" in a single process (SIGTERM by default; add
        ``signal.SIGINT`` to treat Ctrl-C the same way).
      use_sync_point: ask JAX's preemption sync point instead of installing handlers. Default:
        whenever ``jax.distributed.initialize`` has been called.
    """

    def __init__(
        self,
        signals: Sequence[int] = (signal.SIGTERM,),
        *,
        use_sync_point: bool | None = None,
    ) -> None:
        if not signals:
            raise ValueError("PreemptionGuard needs at least one signal to watch")
        self.signals = tuple(signal.Signals(s) for s in signals)
        self._use_sync_point = use_sync_point
        self._previous: dict[signal.Signals, Any] = {}
        self._received: list[signal.Signals] = []
        self._stop_step: int | None = None
        self._active = False
        self._sync = False

    @property
    def uses_sync_point(self) -> bool:
        if self._use_sync_point is None:
            return jax.distributed.is_initialized()
        return self._use_sync_point

    @property
    def signalled(self) -> bool:
        """Whether this process's handler received one of the signals (single process only)."""
        return bool(self._received)

    @property
    def signal_count(self) -> int:
        """How many of the signals this process's handler received."""
        return len(self._received)

    @property
    def stop_step(self) -> int | None:
        """The step at which ``should_stop`` first answered True."""
        return self._stop_step

    def __enter__(self) -> PreemptionGuard:
        if self._active:
            raise RuntimeError("this PreemptionGuard is already in use; create one per loop")
        # With the sync point, JAX's notifier owns the signal: a Python handler would replace it.
        # (Without 'jax_enable_preemption_service', the first should_stop says so and raises.)
        self._sync = self.uses_sync_point
        if not self._sync:
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError(
                    "PreemptionGuard installs signal handlers, which Python allows only in the "
                    "main thread; enter it there (around the training loop)"
                )
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        self._active = True
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only record: logging here could re-enter a stream write the signal interrupted.
        self._received.append(signal.Signals(signum))

    def should_stop(self, step: int) -> bool:
        """True once preemption was announced; stays True for later steps.

        With the sync point, True comes at the same ``step`` on every process; call this at every
        step on every process.
        """
        if not self._active:
            raise RuntimeError("call should_stop inside `with PreemptionGuard() as guard:`")
        if self._stop_step is not None:
            return True
        if self._sync:
            stop = multihost_utils.reached_preemption_sync_point(int(step))
        else:
            stop = bool(self._received)
        if stop:
            self._stop_step = int(step)
            cause = self._received[0].name if self._received else "preemption notice"
            log.warning("%s: stopping at step %d to save and exit", cause, step)
        return stop

    def __exit__(self, *exc: object) -> None:
        if len(self._received) > 1:
            log.warning(
                "%d signals received while stopping; the ones after the first were ignored",
                len(self._received),
            )
        for sig, previous in self._previous.items():
            # None: a handler installed from C; the default is the closest Python can restore.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()
        self._active = False
