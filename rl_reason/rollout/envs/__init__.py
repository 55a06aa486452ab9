"""Environments for multi-turn rollouts: the policy writes a turn, the environment answers.

`base` fixes the protocol (an `Environment` starts an `Episode` per trajectory; an episode
answers each model turn with an `Observation`); `python_tool` runs the model's code in the
verifiers' sandbox (`<code>...</code>`), `chat_tool` the same tool in chat models' tool-call
format (Qwen2.5's `<tool_call>` JSON, answered through the tokenizer's chat template);
`guess_number` is a tiny deterministic game for tests. `make` builds the one a run's
`multi_turn` options name.
"""

from rl_reason.rollout.envs import chat_tool
from rl_reason.rollout.envs.base import Environment, Episode, Observation
from rl_reason.rollout.envs.chat_tool import ChatPythonTool
from rl_reason.rollout.envs.guess_number import GuessNumber
from rl_reason.rollout.envs.python_tool import PythonTool


def _python(o) -> PythonTool:
    return PythonTool(
        timeout_s=o.tool_timeout_s, max_output_chars=o.tool_max_output_chars, max_turns=o.max_turns
    )


# name -> (options, tokenizer) -> environment
ENVIRONMENTS = {
    "python_tool": lambda o, tok: _python(o),
    "python_tool_chat": lambda o, tok: ChatPythonTool(tok, _python(o)),
    "guess_number": lambda o, tok: GuessNumber(max_turns=o.max_turns),
}
# The tools a chat prompt announces (the template's `tools`), per environment.
CHAT_TOOLS = {"python_tool_chat": chat_tool.TOOLS}


def make(options, tokenizer) -> Environment:
    """The environment of `options` (core.config.MultiTurnOptions; `env` names it)."""
    if options.env not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {options.env!r}; valid: {sorted(ENVIRONMENTS)}")
    return ENVIRONMENTS[options.env](options, tokenizer)


__all__ = ["CHAT_TOOLS", "ENVIRONMENTS", "Environment", "Episode", "Observation", "make"]
