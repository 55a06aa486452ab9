"""The environment protocol of multi-turn rollouts (host side).

An `Environment` gives the first prompt of an example and starts one `Episode` per trajectory
(G samples of a prompt are G episodes, each with its own state). After each model turn (decoding
stops at the environment's `stop_marker`, or at the end of the response), the episode answers
with an `Observation`: the text appended to the context before decoding goes on (its tokens are
never scored by the objective), or `done` when the trajectory ends. `reason` says why a turn
ended the way it did (a tool's "timeout", "error", "truncated"; "answered"; "turn_limit"), so
that faults are counted in the metrics instead of stopping the run.

The outcome stays the only supervision: the trajectory's final answer goes to the task's
verifier as in single-turn rollouts; nothing labels the turns.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol


@dataclasses.dataclass(frozen=True)
class Observation:
    """An environment's answer to one model turn. `text`: appended to the context (empty when
    `done`); `done`: the trajectory ends here; `reason`: what happened, for the metrics."""

    text: str = ""
    done: bool = False
    reason: str = "ok"


class Episode(Protocol):
    """One trajectory's state."""

    def respond(self, turn: str) -> Observation:
        """The answer to the model's latest turn (its text since the last observation)."""
        ...


class Environment(Protocol):
    """`stop_marker`: the text that ends a model turn that calls the environment (decoding
    stops after it); `max_turns`: the most observations a trajectory gets before it is ended
    with reason "turn_limit"."""

    stop_marker: str
    max_turns: int

    def episode(self, example: dict) -> Episode: ...


def run_turns(env: Environment, example: dict, turns: list[str]) -> list[Observation]:
    """The observations an episode gives to a fixed list of model turns, with the turn cap
    applied as a rollout applies it (a reference for tests and for replaying a trajectory)."""
    episode, out = env.episode(example), []
    for turn in turns:
        if len(out) >= env.max_turns:
            out.append(Observation(done=True, reason="turn_limit"))
            break
        obs = episode.respond(turn)
        out.append(obs)
        if obs.done:
            break
    return out
