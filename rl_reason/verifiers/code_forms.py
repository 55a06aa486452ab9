"""Tests as code datasets ship them, read into the ``code`` verifier's forms.

- HumanEval / MBPP-style check functions: ``{"test": "def check(candidate): ...", "entry_point":
  "add", "helpers": <trusted code the prompt gives>}`` (``tests`` may stand for ``test``). A check
  function whose body is straight-line code (asserts, imports, assignments made once) becomes
  top-level asserts on the entry point, which the probe machinery of ``code_execution`` protects
  fully. Any other body (loops, random inputs) is run by the record/replay path there.
- MBPP's ``test_list`` (assert strings) with its ``test_setup_code``.
- stdin/stdout cases: a list of ``{"stdin", "stdout"}``, APPS' ``{"inputs": [...], "outputs":
  [...]}`` (also as the JSON string of its ``input_output`` field) or CodeContests'
  ``{"input": [...], "output": [...]}``.

Malformed forms raise ValueError (the dataset's fault), as in ``code_execution``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
from collections.abc import Mapping
from typing import Any

CHECK_NAME = "check"
CANDIDATE_CALL = "__candidate__"


def text(value: Any) -> Any:
    # tfds text features arrive as bytes.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


@dataclasses.dataclass(frozen=True)
class CheckFunction:
    """A ``check(candidate)`` test that is not straight-line code (run by record/replay).

    setup: the helpers and the test module (which defines ``check``), trusted code.
    record_setup: the same with every assert inside ``check`` made non-fatal, so that recording
      the solution's calls goes on past checks that fail on placeholder results.
    entry_point: the solution's function that ``candidate`` stands for.
    """

    setup: str
    record_setup: str
    entry_point: str


class _SoftAsserts(ast.NodeTransformer):
    def visit_Assert(self, node: ast.Assert) -> ast.AST:
        handler = ast.ExceptHandler(type=ast.Name("Exception", ast.Load()), body=[ast.Pass()])
        return ast.Try(body=[node], handlers=[handler], orelse=[], finalbody=[])


def _straight_line(body: list[ast.stmt], param: str) -> bool:
    assigned: list[str] = []
    for stmt in body:
        if isinstance(stmt, ast.Assert):
            continue
        if not isinstance(stmt, ast.Expr | ast.Import | ast.ImportFrom | ast.Assign | ast.Pass):
            return False
        names = {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name)}
        if param in names:
            return False
        assigned += [
            n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
        ]
    return len(assigned) == len(set(assigned))


class _Rename(ast.NodeTransformer):
    def __init__(self, old: str, new: str):
        self.old, self.new = old, new

    def visit_Name(self, node: ast.Name) -> ast.Name:
        return (
            ast.copy_location(ast.Name(self.new, node.ctx), node) if node.id == self.old else node
        )


@functools.lru_cache(maxsize=1024)
def check_function_tests(source: str, entry_point: str, helpers: str) -> str | CheckFunction:
    """Top-level-assert test source for a check function, or a `CheckFunction` to replay."""
    if not entry_point.isidentifier():
        raise ValueError(f"code: 'entry_point' must be a function name, got {entry_point!r}")
    try:
        module = ast.parse(source)
        ast.parse(helpers)
    except SyntaxError as e:
        raise ValueError(f"code: the tests or helpers are not valid Python: {e}") from None
    checks = [s for s in module.body if isinstance(s, ast.FunctionDef) and s.name == CHECK_NAME]
    if len(checks) != 1 or len(checks[0].args.args) != 1:
        raise ValueError(
            "code: with 'entry_point' the tests must define one 'def check(candidate)' function"
        )
    check = checks[0]
    param = check.args.args[0].arg
    rest = [s for s in module.body if s is not check]
    if _straight_line(check.body, param):
        body = [_Rename(param, entry_point).visit(s) for s in check.body]
        flat = ast.Module(body=[*rest, *body], type_ignores=[])
        return "\n".join(filter(None, [helpers, ast.unparse(flat)]))
    soft = ast.parse(source)
    for node in soft.body:
        if isinstance(node, ast.FunctionDef) and node.name == CHECK_NAME:
            node.body = [_SoftAsserts().visit(s) for s in node.body]
    return CheckFunction(
        setup="\n".join(filter(None, [helpers, source])),
        record_setup="\n".join(
            filter(None, [helpers, ast.unparse(ast.fix_missing_locations(soft))])
        ),
        entry_point=entry_point,
    )


def mbpp_tests(example: Mapping[str, Any]) -> str:
    """MBPP's ``test_setup_code`` and ``test_list`` as one test source."""
    cases = example["test_list"]
    if not isinstance(cases, list | tuple) or not cases:
        raise ValueError("code: 'test_list' must be a non-empty list of assert statements")
    cases = [text(c) for c in cases]
    if not all(isinstance(c, str) for c in cases):
        raise ValueError("code: 'test_list' entries must be strings")
    setup = text(example.get("test_setup_code") or "")
    if not isinstance(setup, str):
        raise ValueError("code: 'test_setup_code' must be a string")
    return "\n".join([setup, *cases])


def _lines(value: Any, what: str) -> str:
    value = text(value)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return "\n".join(value) + "\n"  # APPS sometimes gives the lines of one case
    if not isinstance(value, str):
        raise ValueError(f"code: {what} must be a string, got {type(value).__name__}")
    return value


def io_cases(example: Mapping[str, Any]) -> list[dict[str, str]]:
    """Stdin/stdout cases from any of the forms in the module docstring."""
    cases = example["io"] if "io" in example else text(example["input_output"])
    if isinstance(cases, str):
        try:
            cases = json.loads(cases)
        except json.JSONDecodeError as e:
            raise ValueError(f"code: 'input_output' is not JSON: {e}") from None
    if isinstance(cases, Mapping):
        if "fn_name" in cases:
            raise ValueError(
                "code: call-based cases (fn_name) are not stdin/stdout cases; give them as "
                "'tests' asserts"
            )
        keys = ("inputs", "outputs") if "inputs" in cases else ("input", "output")
        inputs, outputs = (cases.get(k) for k in keys)
        if not isinstance(inputs, list) or not isinstance(outputs, list):
            raise ValueError(f"code: io cases need lists '{keys[0]}' and '{keys[1]}'")
        if len(inputs) != len(outputs):
            raise ValueError(f"code: {len(inputs)} inputs but {len(outputs)} outputs")
        return [
            {"stdin": _lines(i, "an input"), "stdout": _lines(o, "an output")}
            for i, o in zip(inputs, outputs, strict=True)
        ]
    return cases
