"""The value every verifier returns."""

from __future__ import annotations

import dataclasses

# Reasons end up in logs and metrics; a response can be a megabyte, so they are clipped.
MAX_REASON_CHARS = 200


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """Outcome of checking one response.

    Attributes:
      reward: the scalar the trainer uses (1.0 or 0.0 for the built-in verifiers).
      correct: whether the final answer was accepted.
      reason: a short human-readable explanation ("correct", "no final answer", "timeout"...).
      steps: for a verifier that also scores the reasoning step by step (a process reward
        model), each step's (end, reward): `end` the offset in `response` just past the
        step's text, in order. Empty for outcome-only verifiers. The trainer credits each step's
        reward to the step's own tokens when `loss.process_weight` > 0.
    """

    reward: float
    correct: bool
    reason: str
    steps: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if len(self.reason) > MAX_REASON_CHARS:
            object.__setattr__(self, "reason", self.reason[: MAX_REASON_CHARS - 3] + "...")


def accept(reason: str = "correct") -> VerifyResult:
    return VerifyResult(reward=1.0, correct=True, reason=reason)


def reject(reason: str) -> VerifyResult:
    return VerifyResult(reward=0.0, correct=False, reason=reason)
