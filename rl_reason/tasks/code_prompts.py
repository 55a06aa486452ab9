"""What the code tasks (HumanEval, MBPP) share: the question text and the prompt's own code.

The question asks for the whole program in a ```python block, which is what the ``code`` verifier
runs (the last such block after the reasoning). It goes inside the R1-Zero template like any other
task's question.
"""

from __future__ import annotations

import ast

INSTRUCTION = "Write the complete Python code in one ```python code block in your answer."


def function_question(prompt: str) -> str:
    """A HumanEval-style question: the function's signature and docstring to complete."""
    return f"Complete this Python function.\n```python\n{prompt.rstrip()}\n```\n{INSTRUCTION}"


def described_question(text: str, first_test: str) -> str:
    """An MBPP-style question: the description and one test that fixes the function's name."""
    return f"{text.strip()}\nYour code should pass this test:\n{first_test.strip()}\n{INSTRUCTION}"


def prompt_helpers(prompt: str, entry_point: str) -> str | None:
    """The prompt's code other than the function to write (imports, helper functions), which
    HumanEval's tests may use; None when the prompt is not valid Python."""
    try:
        module = ast.parse(prompt)
    except SyntaxError:
        return None
    body = [
        stmt
        for stmt in module.body
        if not (isinstance(stmt, ast.FunctionDef) and stmt.name == entry_point)
    ]
    return ast.unparse(ast.Module(body=body, type_ignores=[]))
