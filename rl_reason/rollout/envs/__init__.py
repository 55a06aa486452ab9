"""Environments for multi-turn rollouts: the policy writes a turn, the environment answers.

`base` fixes the protocol (an `Environment` starts an `Episode` per trajectory; an episode
answers each model turn with an `Observation`); `python_tool` runs the model's code in the
verifiers' sandbox; `guess_number` is a tiny deterministic game for tests. `make` builds the
one a run's `multi_turn` options name.
"""

from rl_reason.rollout.envs.base import Environment, Episode, Observation
from rl_reason.rollout.envs.guess_number import GuessNumber
from rl_reason.rollout.envs.python_tool import PythonTool

ENVIRONMENTS = {
    "python_tool": lambda o: PythonTool(
        timeout_s=o.tool_timeout_s, max_output_chars=o.tool_max_output_chars, max_turns=o.max_turns
    ),
    "guess_number": lambda o: GuessNumber(max_turns=o.max_turns),
}


def make(options) -> Environment:
    """The environment of `options` (core.config.MultiTurnOptions; `env` names it)."""
    if options.env not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {options.env!r}; valid: {sorted(ENVIRONMENTS)}")
    return ENVIRONMENTS[options.env](options)


__all__ = ["ENVIRONMENTS", "Environment", "Episode", "Observation", "make"]
