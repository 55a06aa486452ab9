"""A tiny deterministic environment for tests: guess a secret number from higher/lower hints.

The model writes `<guess>N</guess>`; the episode answers `<hint>higher</hint>` or
`<hint>lower</hint>` and the trajectory goes on, or ends when the guess is right. A turn
without a guess ends the trajectory (reason "answered"): its text is the final answer.
"""

from __future__ import annotations

import dataclasses
import re

from rl_reason.rollout.envs.base import Observation

_GUESS = re.compile(r"<guess>\s*(-?\d+)\s*</guess>\s*$")


@dataclasses.dataclass
class GuessEpisode:
    secret: int

    def respond(self, turn: str) -> Observation:
        m = _GUESS.search(turn)
        if m is None:
            return Observation(done=True, reason="answered")
        guess = int(m.group(1))
        if guess == self.secret:
            return Observation(done=True, reason="solved")
        hint = "higher" if guess < self.secret else "lower"
        return Observation(text=f"<hint>{hint}</hint>")


@dataclasses.dataclass(frozen=True)
class GuessNumber:
    """Examples carry their secret in `example["secret"]` (an int)."""

    max_turns: int = 8
    stop_marker: str = "</guess>"

    def episode(self, example: dict) -> GuessEpisode:
        secret = example.get("secret")
        if isinstance(secret, bool) or not isinstance(secret, int):
            raise ValueError(f"guess_number needs an int example['secret'], got {secret!r}")
        return GuessEpisode(secret)
