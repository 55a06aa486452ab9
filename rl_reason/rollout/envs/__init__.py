"""Environments for multi-turn rollouts: the policy writes a turn, the environment answers.

`base` fixes the protocol (an `Environment` starts an `Episode` per trajectory; an episode
answers each model turn with an `Observation`); `python_tool` runs the model's code in the
verifiers' sandbox; `guess_number` is a tiny deterministic game for tests.
"""

from rl_reason.rollout.envs.base import Environment, Episode, Observation

__all__ = ["Environment", "Episode", "Observation"]
