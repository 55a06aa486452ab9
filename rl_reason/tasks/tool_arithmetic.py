"""Products a tiny model cannot compute in its head, and a Python tool that can.

A problem is "What is a * b?" with a of `a_digits` and b of `b_digits` digits; the answer is
checked by the arithmetic verifier (the integer in the last <answer>). The pretraining corpus
shows a share `frac_tool` of solutions that call the tool,

    <think>
    <code>print(347 * 29)</code>
    <output>
    10063
    </output>
    </think>
    <answer>10063</answer>

and the rest with the bare answer (right, as a corpus would print it; a small model cannot
learn the product from them). In a multi-turn rollout with the Python tool
(rl_reason/rollout/envs/python_tool.py) decoding stops at `</code>` and the sandbox writes the
`<output>` block; without it the policy writes that block itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any, ClassVar

import numpy as np

from rl_reason.tasks.templates import THINK_CLOSE, make_completion, make_prompt

VERIFIER = "arithmetic"
TOOL_SYMBOLS = ("<code>", "</code>", "<output>", "</output>")
_PROBLEMS, _TRAIN, _CORPUS = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class ToolArithmeticConfig:
    a_digits: int = 3
    b_digits: int = 2

    def __post_init__(self) -> None:
        for name in ("a_digits", "b_digits"):
            if not 1 <= getattr(self, name) <= 9:
                raise ValueError(f"tool_arithmetic {name} must be in [1, 9]")


def _draw_one(rng: np.random.Generator, cfg: ToolArithmeticConfig) -> dict[str, Any]:
    a = int(rng.integers(10 ** (cfg.a_digits - 1), 10**cfg.a_digits))
    b = int(rng.integers(10 ** (cfg.b_digits - 1), 10**cfg.b_digits))
    return {"question": f"What is {a} * {b}?", "answer": str(a * b), "a": a, "b": b}


def tool_completion(example: Mapping[str, Any]) -> str:
    """The corpus's solution that calls the tool (the output block as the tool writes it)."""
    call = f"<code>print({example['a']} * {example['b']})</code>"
    output = f"\n<output>\n{example['answer']}\n</output>\n"
    return make_completion(call + output.rstrip("\n"), example["answer"])


@dataclasses.dataclass(frozen=True)
class ToolArithmeticTask:
    cfg: ToolArithmeticConfig = dataclasses.field(default_factory=ToolArithmeticConfig)
    name: ClassVar[str] = "tool_arithmetic"
    verifier_name: ClassVar[str] = VERIFIER

    def prompt(self, example: Mapping[str, Any]) -> str:
        return make_prompt(example["question"])

    def key(self, example: Mapping[str, Any]) -> str:
        return f"{example['a']}*{example['b']}"

    def _draw(self, rng, n: int, exclude: Collection[str]) -> list[dict[str, Any]]:
        space = 9 * 10 ** (self.cfg.a_digits - 1) * 9 * 10 ** (self.cfg.b_digits - 1)
        if n > space - len(exclude):
            raise ValueError(f"asked for {n} distinct problems; only {space} exist")
        seen, out = set(exclude), []
        while len(out) < n:
            ex = _draw_one(rng, self.cfg)
            if self.key(ex) not in seen:
                seen.add(self.key(ex))
                out.append(ex)
        return out

    def eval_set(self, seed: int, n: int, exclude_keys: Collection[str] = ()) -> list[dict]:
        """`n` distinct problems, none in `exclude_keys`, deterministic for `seed`."""
        return self._draw(np.random.default_rng([seed, _PROBLEMS]), n, set(exclude_keys))

    def train_iterator(self, seed: int, batch_size: int, exclude_keys=(), *, start_batch=0):
        exclude = set(exclude_keys)
        i = start_batch
        while True:
            rng = np.random.default_rng([seed, _TRAIN, i])
            yield self._draw(rng, batch_size, exclude)
            i += 1

    def pretraining_corpus(
        self, seed: int, n: int, *, frac_tool: float, exclude_keys: Collection[str] = ()
    ) -> list[str]:
        """`n` texts (prompt + solution), a share `frac_tool` of them calling the tool."""
        if not 0 <= frac_tool <= 1:
            raise ValueError(f"frac_tool must be in [0, 1], got {frac_tool}")
        rng = np.random.default_rng([seed, _CORPUS])
        texts = []
        for ex in self._draw(rng, n, set(exclude_keys)):
            if rng.random() < frac_tool:
                body = tool_completion(ex)
            else:
                body = make_completion("", ex["answer"])
            texts.append(self.prompt(ex) + body)
        return texts


def calls_tool(text: str) -> bool:
    """Whether a response (before its answer) writes a tool call."""
    return "</code>" in text.split(THINK_CLOSE)[0]
