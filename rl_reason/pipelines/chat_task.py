"""How a recipe's question becomes prompt text, and which tokens end a response.

config.prompt.format "r1_zero" keeps the task's own plain R1-Zero template (`task.prompt`),
encoded after the tokenizer's bos; "chat" puts the question in the tokenizer's chat template
(`ChatTask`), encoded exactly as the template wrote it. A response stops at eos, or at the
template's end: `</answer>` when it is a single token (r1_zero), or the end-of-turn token the
chat template closes an assistant reply with (chat).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, ClassVar

from rl_reason.infra.tokenizer import TextTokenizer
from rl_reason.pipelines.recipe_options import PromptOptions
from rl_reason.tasks.templates import ANSWER_CLOSE

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ChatTask:
    """A task whose prompts are the tokenizer's chat template around the question.

    The template writes the bos it wants (or none), so the trainer must add none.
    """

    prompt_add_bos: ClassVar[bool] = False
    task: Any
    tokenizer: Any
    system: str = ""
    suffix: str = ""
    # Tools the template announces (JSON schemas, its `tools` argument): a multi-turn run's
    # environment in the chat tool-call format (rl_reason.rollout.envs.CHAT_TOOLS).
    tools: tuple = ()

    @property
    def verifier_name(self) -> str:
        return self.task.verifier_name

    def messages(self, question: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": "user", "content": question + self.suffix}]

    def prompt(self, example: Mapping[str, Any]) -> str:
        extra = {"tools": list(self.tools)} if self.tools else {}
        return self.tokenizer.apply_chat_template(self.messages(example["question"]), **extra)


_REPLY_SENTINEL = "\u2063reply\u2063"


def chat_end_token(tokenizer: TextTokenizer) -> int | None:
    """The special token a chat template closes an assistant reply with (<|im_end|>,
    <|eot_id|>, <end_of_turn>), or None if what follows a reply is not a special token."""
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "?"}, {"role": "assistant", "content": _REPLY_SENTINEL}],
            add_generation_prompt=False,
        )
    except Exception as e:  # a template may refuse this conversation; then eos alone stops
        log.warning(
            "%s: cannot find the end-of-turn token (%s); stopping at eos only", tokenizer.source, e
        )
        return None
    at = rendered.rfind(_REPLY_SENTINEL)
    if at < 0:
        return None
    tail = tokenizer.encode(rendered[at + len(_REPLY_SENTINEL) :])
    return tail[0] if tail and tail[0] in set(tokenizer.special_ids.values()) else None


def stop_token_ids(tokenizer: TextTokenizer, prompt_format: str) -> tuple[int, ...]:
    """eos and the template's end (see the module docstring), without duplicates."""
    stops = [tokenizer.eos_id]
    if prompt_format == "r1_zero":
        ids = tokenizer.encode(ANSWER_CLOSE)
        if len(ids) == 1:
            stops.append(ids[0])
    else:
        end = chat_end_token(tokenizer)
        if end is not None:
            stops.append(end)
    return tuple(dict.fromkeys(stops))


def prompting(tokenizer: TextTokenizer, task, prompt: PromptOptions, tools: tuple = ()):
    """(the tokenizer the trainer encodes prompts with, the task it takes prompts from);
    `tools`: what a chat prompt announces (a multi-turn run's chat-format environment)."""
    if prompt.format == "r1_zero":
        if tools:
            raise ValueError(
                "a chat tool-call environment (grpo.multi_turn.env) needs config.prompt.format="
                "'chat': the r1_zero template cannot announce its tools"
            )
        return tokenizer, task
    if tokenizer.chat_template is None:
        raise ValueError(
            f"config.prompt.format='chat', but {tokenizer.source} has no chat template: use "
            "prompt.format='r1_zero' or a tokenizer with one"
        )
    return tokenizer, ChatTask(task, tokenizer, prompt.system, prompt.suffix, tuple(tools))
