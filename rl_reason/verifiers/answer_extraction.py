"""Anchored extraction of a response's final answer.

Only text the response marks as its final answer counts; numbers or expressions anywhere else are
ignored, so a policy cannot earn reward by scattering candidate values through its reasoning.

The rules, shared by the math, gsm8k, countdown and arithmetic verifiers:

1. The reasoning ends at the last ``</think>``; only the text after it (the *answer region*) is
   searched. A response without any ``</think>`` is all answer region (prompts that do not use think
   tags, or templates whose prompt already opened ``<think>``: the verifier cannot tell these
   apart, the format reward can). An answer region that opens a new ``<think>`` has no answer.
2. In the answer region, final answers are the contents of ``<answer>...</answer>`` blocks and of
   ``\\boxed{...}`` groups with balanced braces (outermost only); a box inside an answer block
   replaces the block's text. Unterminated blocks and boxes (truncated responses) do not count.
3. Every distinct final answer must be right: a response that hedges with two different answers
   is not correct, and an empty answer is not correct.

Everything here runs in time linear in the response length (no backtracking regexes over the
whole text, no rescans per candidate), so a megabyte of adversarial text is cheap to reject.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

# The R1-Zero template's tags (rl_reason.tasks.templates writes them from these).
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"


def think_block(response: str) -> str:
    """The reasoning the policy wrote in `response`.

    `response` is normally the completion alone (text after the prompt); a full prompt+completion
    works too because the text starts after the last ``<think>``, which is the prompt's own. The
    block ends at the first ``</think>`` after that; if the policy never closed it, at the first
    ``<answer>``; otherwise at the end of the response.
    """
    start = response.rfind(THINK_OPEN)
    start = 0 if start < 0 else start + len(THINK_OPEN)
    rest = response[start:]
    for closer in (THINK_CLOSE, ANSWER_OPEN):
        end = rest.find(closer)
        if end >= 0:
            return rest[:end]
    return rest


_BOXED = re.compile(r"\\boxed\s*\{")
# Escaped characters (\{, \}, \\) are skipped as one token so that set braces do not unbalance.
_BRACE_TOKENS = re.compile(r"\\.|[{}]", re.DOTALL)
# Exactly four hashes: "##### x" is a level-5 Markdown heading.
_HASH_LINE = re.compile(r"^[ \t]*####(?!#)[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


@dataclasses.dataclass(frozen=True)
class Extraction:
    """The distinct final answers of a response, or why there are none (``reason``)."""

    answers: tuple[str, ...]
    reason: str = ""


def answer_region(response: str) -> str | None:
    """The text after the reasoning, or None when the response ends inside a think block."""
    cut = response.rfind(THINK_CLOSE)
    region = response if cut < 0 else response[cut + len(THINK_CLOSE) :]
    if THINK_OPEN in region:
        return None
    return region


def tag_spans(text: str, open_tag: str, close_tag: str) -> list[tuple[int, int]]:
    """Content spans of the complete, non-overlapping ``open_tag...close_tag`` blocks."""
    spans = []
    pos = 0
    while True:
        start = text.find(open_tag, pos)
        if start < 0:
            return spans
        end = text.find(close_tag, start + len(open_tag))
        if end < 0:
            return spans
        spans.append((start + len(open_tag), end))
        pos = end + len(close_tag)


def boxed_spans(text: str) -> list[tuple[int, int]]:
    """Content spans of the outermost ``\\boxed{...}`` groups whose braces balance."""
    opens = [m.end() - 1 for m in _BOXED.finditer(text)]
    if not opens:
        return []
    closing: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE_TOKENS.finditer(text):
        token = m.group()
        if token == "{":
            stack.append(m.start())
        elif token == "}" and stack:
            closing[stack.pop()] = m.start()
    spans = []
    covered_until = -1
    for brace in opens:
        if brace <= covered_until or brace not in closing:
            continue
        spans.append((brace + 1, closing[brace]))
        covered_until = closing[brace]
    return spans


def clean_answer(text: str) -> str:
    """Strips whitespace, math-mode delimiters and a closing full stop around an answer."""
    text = text.strip()
    changed = True
    while changed and text:
        changed = False
        for left, right in _WRAPPERS:
            if (
                len(text) >= len(left) + len(right)
                and text.startswith(left)
                and text.endswith(right)
            ):
                text = text[len(left) : len(text) - len(right)].strip()
                changed = True
                break
        if text.endswith(".") and not text.endswith(".."):
            text = text[:-1].rstrip()
            changed = True
    return text


def _inside(pos: int, spans: list[tuple[int, int]]) -> bool:
    return any(start <= pos < end for start, end in spans)


def final_answers(response: str, *, hash_lines: bool | Callable[[str], bool] = False) -> Extraction:
    """Applies the module's rules; ``hash_lines`` also accepts GSM8K-style ``#### 42`` lines
    (those whose text it accepts, when it is a predicate: the rest are Markdown headings)."""
    region = answer_region(response)
    if region is None:
        return Extraction((), "no final answer after the reasoning")
    blocks = tag_spans(region, ANSWER_OPEN, ANSWER_CLOSE)
    raw: list[str] = []
    for start, end in blocks:
        content = region[start:end]
        boxes = boxed_spans(content)
        raw.extend(content[s:e] for s, e in boxes) if boxes else raw.append(content)
    for start, end in boxed_spans(region):
        if not _inside(start, blocks):
            raw.append(region[start:end])
    if hash_lines:
        for m in _HASH_LINE.finditer(region):
            if _inside(m.start(), blocks):
                continue
            if callable(hash_lines) and not hash_lines(m.group(1)):
                continue
            raw.append(m.group(1))
    if not raw:
        if len(region) < len(response) and ("\\boxed" in response or ANSWER_OPEN in response):
            return Extraction((), "answer only inside the reasoning")
        return Extraction((), "no final answer")
    answers = [clean_answer(a) for a in raw]
    if any(not a for a in answers):
        return Extraction((), "empty answer")
    return Extraction(tuple(dict.fromkeys(answers)))


_CODE_OPEN = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n", re.IGNORECASE)


def last_python_block(response: str) -> str | None:
    """The body of the last complete ```python block in the answer region, else None."""
    region = answer_region(response)
    if region is None:
        return None
    last = None
    for last in _CODE_OPEN.finditer(region):  # noqa: B007 - only the last opener matters
        pass
    if last is None:
        return None
    end = region.find("```", last.end())
    if end < 0:
        return None
    return region[last.end() : end]
