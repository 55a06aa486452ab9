"""The Python tool in the tool-call format of chat models (Qwen2.5's): the model calls

    <tool_call>
    {"name": "python", "arguments": {"code": "print(6 * 7)"}}
    </tool_call>

and the observation is whatever the tokenizer's own chat template writes between the end of
that assistant turn and the next assistant reply around a "tool" message with the output
(for Qwen2.5: `<|im_end|>`, a user turn holding `<tool_response>...</tool_response>`, and the
`<|im_start|>assistant` header), so the policy sees exactly the conversation a chat
deployment would render. The tool is announced through the template's `tools` argument
(`TOOLS`), as `apply_chat_template(..., tools=...)` does.

The code runs as `python_tool.PythonTool` runs it (the verifiers' sandbox, earlier cells of the
trajectory re-run first, every fault an observation with its reason); a call that is not
valid JSON naming this tool with a string "code" gets reason "malformed".
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from rl_reason.rollout.envs.base import Observation
from rl_reason.rollout.envs.python_tool import PythonTool

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME = "python"
TOOLS = (
    {
        "type": "function",
        "function": {
            "name": NAME,
            "description": "Runs Python 3 code in a fresh interpreter with the earlier calls' "
            "code run first; returns what it prints (or the exception).",
            "parameters": {
                "type": "object",
                "properties": {"code": {"type": "string", "description": "The code to run."}},
                "required": ["code"],
            },
        },
    },
)
_TURN = "\u2063turn\u2063"


def parse_call(turn: str) -> tuple[str | None, str]:
    """(the code of the turn's last tool call, "") or (None, what is wrong with it)."""
    text = turn.rstrip()
    if not text.endswith(CLOSE):
        return None, "no tool call"
    start = text.rfind(OPEN)
    if start < 0:
        return None, f"no {OPEN} before {CLOSE}"
    try:
        call = json.loads(text[start + len(OPEN) : -len(CLOSE)])
    except json.JSONDecodeError as e:
        return None, f"the tool call is not JSON: {e}"
    if not isinstance(call, dict) or call.get("name") != NAME:
        return None, f'the tool call must be {{"name": "{NAME}", "arguments": {{"code": ...}}}}'
    arguments = call.get("arguments")
    code = arguments.get("code") if isinstance(arguments, dict) else None
    if not isinstance(code, str):
        return None, 'the tool call\'s "arguments" need a string "code"'
    return code, ""


def response_text(tokenizer, output: str) -> str:
    """What the chat template writes after an assistant turn (up to its content's end) and
    before the next assistant reply, around a tool message holding `output`."""
    turn = [{"role": "assistant", "content": _TURN}]
    alone = tokenizer.apply_chat_template(turn, add_generation_prompt=False)
    both = tokenizer.apply_chat_template(
        turn + [{"role": "tool", "content": output}], add_generation_prompt=True
    )
    end = alone.index(_TURN) + len(_TURN)
    if both[:end] != alone[:end]:
        raise ValueError(
            f"{tokenizer.source}'s chat template renders an assistant turn differently when a "
            "tool message follows it; a multi-turn rollout cannot append the tool's response"
        )
    return both[end:]


@dataclasses.dataclass
class ChatPythonEpisode:
    env: ChatPythonTool
    cells: list[str] = dataclasses.field(default_factory=list)

    def respond(self, turn: str) -> Observation:
        code, problem = parse_call(turn)
        if code is None:
            if problem == "no tool call":
                return Observation(done=True, reason="answered")
            return Observation(text=response_text(self.env.tokenizer, problem), reason="malformed")
        text, reason = self.env.tool.run(self.cells + [code])
        if reason != "timeout":
            self.cells.append(code)
        return Observation(text=response_text(self.env.tokenizer, text.rstrip()), reason=reason)


@dataclasses.dataclass(frozen=True)
class ChatPythonTool:
    """`tokenizer` must have a chat template that renders "tool" messages, and `</tool_call>`
    as one token."""

    tokenizer: Any
    tool: PythonTool = PythonTool()
    stop_marker: str = CLOSE

    @property
    def max_turns(self) -> int:
        return self.tool.max_turns

    def episode(self, example: dict) -> ChatPythonEpisode:
        del example
        return ChatPythonEpisode(self)
