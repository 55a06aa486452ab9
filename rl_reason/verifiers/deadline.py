"""A wall-clock limit for in-process work, where the platform allows one.

SIGALRM-based limits only work in a process's main thread, and they cannot interrupt long C
calls (a huge integer power inside sympy). They are a convenience for direct calls; the pool's
kill-on-timeout is what actually bounds a verifier.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator


class DeadlineExceeded(BaseException):
    """Raised inside the guarded block when its time is up.

    A BaseException so that libraries' ``except Exception`` clauses (math-verify has several)
    do not swallow it.
    """


def can_interrupt() -> bool:
    return threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[bool]:
    """Raises DeadlineExceeded in the block after ``seconds``; yields whether a limit is active.

    Off the main thread (or with ``seconds=None``) the block runs unlimited and yields False.
    An outer timer or SIGALRM handler is restored afterwards.
    """
    if seconds is None or not can_interrupt():
        yield False
        return

    def _expire(signum, frame):
        raise DeadlineExceeded(f"over {seconds:g} s")

    start = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, _expire)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:
            # The outer timer kept running while ours was armed; a tiny delay fires it at once.
            remaining = max(previous_delay - (time.monotonic() - start), 1e-6)
            signal.setitimer(signal.ITIMER_REAL, remaining, previous_interval)
