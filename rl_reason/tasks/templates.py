"""The R1-Zero prompt template shared by the reasoning tasks.

A prompt is a short instruction, the problem, and an opening ``<think>`` so that the policy starts
by writing its reasoning. The completion the policy should learn to write is::

    \\n{reasoning}\\n</think>\\n<answer>{answer}</answer>

or, with no reasoning, ``\\n</think>\\n<answer>{answer}</answer>``. Exact example (prompt, then
completion, joined they are one pretraining text)::

    Think step by step in <think> </think>, then give the final answer in <answer> </answer>.
    Problem: Start with 17. Add 8, then subtract 5.
    <think>
    17 + 8 = 25
    25 - 5 = 20
    </think>
    <answer>20</answer>

The outcome verifiers read only the last ``<answer>...</answer>`` of a response, so nothing here
may put text after the closing answer tag.
"""

# One home for the tags: the verifiers that read them (and never import tasks).
from rl_reason.verifiers.answer_extraction import (  # noqa: F401 - re-exported
    ANSWER_CLOSE,
    ANSWER_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    think_block,
)

# Train tokenizers with these as user-defined symbols so each is one token: the policy then emits
# a tag in one step, and a prompt ending in "<think>" tokenizes the same alone or with its
# completion appended (see tests/test_tokenizer.py).
SPECIAL_TOKENS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# Short on purpose: the demo policy is tiny and every prompt token costs context and compute.
INSTRUCTION = (
    f"Think step by step in {THINK_OPEN} {THINK_CLOSE}, "
    f"then give the final answer in {ANSWER_OPEN} {ANSWER_CLOSE}."
)


def make_prompt(question: str) -> str:
    """The prompt for one problem; it ends with an opening think tag and no newline."""
    return f"{INSTRUCTION}\nProblem: {question}\n{THINK_OPEN}"


def make_completion(reasoning: str, answer: str) -> str:
    """The target completion for a prompt from `make_prompt`.

    An empty `reasoning` gives an empty think block without a blank line, so that "no reasoning"
    is one fixed token pattern rather than several.
    """
    reasoning = reasoning.strip("\n")
    body = f"\n{reasoning}" if reasoning else ""
    return f"{body}\n{THINK_CLOSE}\n{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"
