"""The ``code`` verifier: run the response's last ```python block in a sandbox.

example: ``{"tests": "<python source with top-level assert statements>"}`` or
``{"io": [{"stdin": "1 2\\n", "stdout": "3\\n"}, ...]}``; optional ``"timeout_s"`` (wall clock
for all cases together, default ``SandboxLimits.wall_s``, at most ``MAX_TIMEOUT_S``). The forms
datasets ship are read too (``code_forms``): HumanEval's ``{"test": "def check(candidate): ...",
"entry_point": ..., "helpers": <the prompt's code>}``, MBPP's ``test_list``, APPS' and
CodeContests' ``inputs``/``outputs`` lists. ``helpers`` is trusted code that runs before the
solution and is part of the tests.

Trust argument. Model-written code runs in the sandbox (see ``sandbox``), and anything that comes
out of the sandbox is what the code *claims*: a process that ran it can print, exit, patch
builtins, hijack any in-process harness, write fake records. So nothing that crosses is taken as
a verdict, and the expected answers never enter a process that runs model code:

- io: the sandbox returns each case's stdout, exit status and whether it hit a limit. The parent
  compares the whole stdout with the expected output (line ends normalised, trailing whitespace
  of lines and of the output dropped) and requires exit status 0. Printing "PASS", exiting early
  or crashing cannot match an output the program never saw.
- tests: each top-level ``assert`` is split, in the parent, into *probes* (the smallest
  sub-expressions that call into the solution, e.g. ``f(3)`` in ``assert sorted(f(3)) == [1, 2]``)
  and a *check* (the rest, with the probes as placeholders). The sandbox evaluates only the probes,
  after the solution and the parts of the test setup the probes need, and reports their values as
  plain data (numbers, strings, containers...; see ``sandbox_runner.encode_value``). The parent
  decodes them strictly, so an object that "equals everything" cannot cross, and evaluates each
  check itself when it only compares plain values, or in a second sandbox run that never sees the
  solution (setup + checks + the decoded values) otherwise. The model's process thus never holds
  an expected value, and ``sys.exit(0)`` before the tests leaves the probes unanswered: failed.

A check function with loops or random inputs cannot be split statically; it is replayed
(``_replay``): the tests run without the solution, which only ever sees the arguments of its calls
and whose decoded results the tests then check.

What this cannot protect: expected values the tests put in setup statements that probes also
need (those run next to the solution), and probes that pass the solution's functions to test
helpers (``map(f, xs)``): then the whole comparison operand is probed. Write tests as
``assert solution_call(args) == expected`` and they are fully protected.

Test format rules (a malformed example raises ValueError): asserts must be top-level statements
(not in loops or helper functions), other top-level statements are setup, the setup must not use
the solution's names, and an assert must not call the solution from inside a comprehension or
lambda. Checks may use standard-library modules without importing them (``math.isclose``).
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import functools
import json
import operator
import sys
from collections.abc import Mapping
from typing import Any

from rl_reason.verifiers import code_forms
from rl_reason.verifiers.answer_extraction import last_python_block
from rl_reason.verifiers.result import VerifyResult, accept, reject
from rl_reason.verifiers.sandbox import CaseRun, SandboxLimits, run_job
from rl_reason.verifiers.sandbox_runner import decode_value, encode_value

MAX_CODE_CHARS = 100_000
MAX_TIMEOUT_S = 60.0
# Calls a replayed check function may make to the solution (HumanEval's most: 100).
MAX_REPLAY_CALLS = 10_000
TEST_FORMS = ("tests", "test", "test_list")
IO_FORMS = ("io", "input_output")
_BUILTIN_NAMES = frozenset(dir(builtins))
_STDLIB_MODULES = frozenset(sys.stdlib_module_names)


# ----------------------------------------------------------------------------------------------
# Example parsing.


@dataclasses.dataclass(frozen=True)
class _TestSuite:
    setup: tuple[ast.stmt, ...]
    setup_bound: frozenset[str]
    checks: tuple[ast.expr, ...]


def _bound_names(statements: list[ast.stmt]) -> set[str]:
    """Names a module's top-level statements bind (not descending into functions/classes)."""
    names: set[str] = set()

    def targets(node: ast.AST) -> None:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                names.add(sub.id)

    for stmt in statements:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(stmt.name)
        elif isinstance(stmt, ast.Import | ast.ImportFrom):
            for alias in stmt.names:
                names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                targets(target)
        elif isinstance(stmt, ast.AnnAssign | ast.AugAssign):
            targets(stmt.target)
        elif isinstance(stmt, ast.For | ast.AsyncFor):
            targets(stmt.target)
        elif isinstance(stmt, ast.With | ast.AsyncWith):
            for item in stmt.items:
                if item.optional_vars is not None:
                    targets(item.optional_vars)
        elif isinstance(stmt, ast.Expr):
            targets(stmt)  # walrus
        for field in ("body", "orelse", "finalbody"):
            if not isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names |= _bound_names(getattr(stmt, field, []))
        for handler in getattr(stmt, "handlers", []):
            if handler.name:
                names.add(handler.name)
            names |= _bound_names(handler.body)
    return names


def _used_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


@functools.lru_cache(maxsize=1024)
def _parse_tests(source: str) -> _TestSuite:
    try:
        module = ast.parse(source)
    except SyntaxError as e:
        raise ValueError(f"code: 'tests' is not valid Python: {e}") from None
    setup, checks = [], []
    for stmt in module.body:
        if isinstance(stmt, ast.Assert):
            checks.append(stmt.test)
        elif any(isinstance(n, ast.Assert) for n in ast.walk(stmt)):
            raise ValueError(
                "code: assert statements must be top-level statements (not inside loops, "
                f"functions or classes), one per case; line {stmt.lineno} nests one"
            )
        else:
            setup.append(stmt)
    if not checks:
        raise ValueError("code: 'tests' has no assert statement")
    bound = _bound_names(setup)
    used = set().union(*(_used_names(s) for s in setup))
    unknown = used - bound - _BUILTIN_NAMES - _locally_bound(setup)
    if unknown:
        raise ValueError(
            f"code: test setup uses {sorted(unknown)}, which it does not define; setup must not "
            "depend on the solution (it also runs without it)"
        )
    return _TestSuite(tuple(setup), frozenset(bound), tuple(checks))


def _locally_bound(statements: list[ast.stmt]) -> set[str]:
    """Parameters and local names of functions, comprehensions and lambdas in the setup."""
    names: set[str] = set()
    for stmt in statements:
        for node in ast.walk(stmt):
            if isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.ExceptHandler) and node.name:
                names.add(node.name)
            elif isinstance(node, ast.Import | ast.ImportFrom):
                names.update(a.asname or a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
    return names


@dataclasses.dataclass(frozen=True)
class _IoCase:
    stdin: str
    stdout: str


def _text(value: Any) -> Any:
    # tfds text features arrive as bytes.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _parse_io(cases: Any) -> tuple[_IoCase, ...]:
    if not isinstance(cases, list | tuple) or not cases:
        raise ValueError("code: 'io' must be a non-empty list of {'stdin': ..., 'stdout': ...}")
    parsed = []
    for i, case in enumerate(cases):
        if not isinstance(case, Mapping) or not isinstance(_text(case.get("stdout")), str):
            raise ValueError(f"code: io case {i} needs a string 'stdout', got {case!r:.100}")
        stdin = _text(case.get("stdin", ""))
        if not isinstance(stdin, str):
            raise ValueError(f"code: io case {i} has a non-string 'stdin'")
        parsed.append(_IoCase(stdin, _text(case["stdout"])))
    return tuple(parsed)


def _limits(example: Mapping[str, Any]) -> SandboxLimits:
    timeout = example.get("timeout_s")
    if timeout is None:
        return SandboxLimits()
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ValueError(f"code: 'timeout_s' must be a positive number, got {timeout!r}")
    timeout = min(float(timeout), MAX_TIMEOUT_S)
    return dataclasses.replace(SandboxLimits(), wall_s=timeout, cpu_s=max(1, round(timeout)))


# ----------------------------------------------------------------------------------------------
# io.


def normalise_output(text: str) -> str:
    """Line ends to \\n, trailing whitespace of each line and of the whole output removed."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).rstrip()


def _verify_io(code: str, cases: tuple[_IoCase, ...], limits: SandboxLimits) -> VerifyResult:
    report = run_job({"mode": "io", "code": code, "inputs": [c.stdin for c in cases]}, limits)
    if report.failure:
        return reject(report.failure)
    for i, case in enumerate(cases):
        if i >= len(report.runs):
            return reject("timeout" if report.timed_out else f"case {i} did not run")
        problem = _run_problem(report.runs[i])
        if problem:
            return reject(f"{problem} on case {i} (passed {i}/{len(cases)})")
        output = report.runs[i].stdout.decode("utf-8", "replace")
        if normalise_output(output) != normalise_output(case.stdout):
            return reject(f"wrong output on case {i} (passed {i}/{len(cases)})")
    return accept(f"passed {len(cases)}/{len(cases)}")


def _run_problem(run: CaseRun) -> str:
    if run.timed_out:
        return "timeout"
    if run.overflow:
        return "output limit exceeded"
    if run.signal is not None:
        return f"killed by signal {run.signal}"
    if run.exit_code != 0:
        return f"exit status {run.exit_code}"
    return ""


# ----------------------------------------------------------------------------------------------
# tests: splitting asserts into probes and checks.


def _chain_root(node: ast.expr) -> ast.expr:
    while isinstance(node, ast.Call | ast.Attribute | ast.Subscript):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def _in_chain_position(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    parent = parents.get(node)
    if isinstance(parent, ast.Call):
        return parent.func is node
    return isinstance(parent, ast.Attribute | ast.Subscript) and parent.value is node


def _operands(check: ast.expr) -> list[ast.expr]:
    """The value-producing operands under a check's and/or/not/comparison structure."""
    if isinstance(check, ast.BoolOp):
        return [o for v in check.values for o in _operands(v)]
    if isinstance(check, ast.UnaryOp) and isinstance(check.op, ast.Not):
        return _operands(check.operand)
    if isinstance(check, ast.Compare):
        return [o for v in [check.left, *check.comparators] for o in _operands(v)]
    return [check]


class _ProbeReplacer(ast.NodeTransformer):
    def __init__(self, solution_names: frozenset[str], probes: list[str], whole: set[int]):
        self.solution_names = solution_names
        self.probes = probes
        self.whole = whole  # ids of operands to probe as a whole

    def _probe(self, node: ast.expr) -> ast.Name:
        name = f"__probe_{len(self.probes)}__"
        self.probes.append(ast.unparse(node))
        return ast.copy_location(ast.Name(id=name, ctx=ast.Load()), node)

    def visit(self, node: ast.AST) -> ast.AST:
        if isinstance(node, ast.expr):
            root = _chain_root(node)
            if id(node) in self.whole or (
                root is not node and isinstance(root, ast.Name) and root.id in self.solution_names
            ):
                return self._probe(node)
            if isinstance(node, ast.Name) and node.id in self.solution_names:
                return self._probe(node)
        return self.generic_visit(node)


def _split(check: ast.expr, solution_names: frozenset[str], probes: list[str]) -> ast.expr:
    """The check with solution-dependent sub-expressions replaced by probe placeholders."""
    check = ast.parse(ast.unparse(check), mode="eval").body  # a private copy to rewrite
    parents = {child: node for node in ast.walk(check) for child in ast.iter_child_nodes(node)}
    whole = set()
    for operand in _operands(check):
        passed_around = any(
            isinstance(n, ast.Name)
            and n.id in solution_names
            and n is not operand
            and not _in_chain_position(n, parents)
            for n in ast.walk(operand)
        )
        if passed_around:  # e.g. map(f, xs): only the whole operand has a plain value
            whole.add(id(operand))
    first = len(probes)
    replaced = _ProbeReplacer(solution_names, probes, whole).visit(check)
    bound_in_check = _names_bound_inside(check)
    for source in probes[first:]:
        probe = ast.parse(source, mode="eval")
        if (_used_names(probe) - _names_bound_inside(probe)) & bound_in_check:
            raise ValueError(
                f"code: the check {ast.unparse(check)!r} calls the solution with names bound "
                "inside the assert (comprehension or lambda); write one assert per case"
            )
    return replaced


def _names_bound_inside(node: ast.AST) -> set[str]:
    return {
        n.arg if isinstance(n, ast.arg) else n.id
        for n in ast.walk(node)
        if isinstance(n, ast.arg) or (isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
    }


def _probe_names(check: ast.expr) -> set[str]:
    return {n for n in _used_names(check) if n.startswith("__probe_")}


def _setup_for_probes(suite: _TestSuite, probes: list[str]) -> str:
    """The setup statements the probes need (transitively), in order.

    Statements that bind nothing (``random.seed(0)``) are kept; statements binding only names no
    probe needs (typically expected values) stay out of the solution's process.
    """
    needed = set().union(*(_used_names(ast.parse(p, mode="eval")) for p in probes))
    keep = [False] * len(suite.setup)
    changed = True
    while changed:
        changed = False
        for i, stmt in enumerate(suite.setup):
            binds = _bound_names([stmt])
            if not keep[i] and (not binds or binds & needed):
                keep[i] = changed = True
                needed |= _used_names(stmt)
    return "\n".join(ast.unparse(s) for s, k in zip(suite.setup, keep, strict=True) if k)


# ----------------------------------------------------------------------------------------------
# tests: evaluating checks.

_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_UNARY = {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos}
_PLAIN_NODES = (
    ast.Constant, ast.Name, ast.Load, ast.Tuple, ast.List, ast.Set, ast.Dict,
    ast.UnaryOp, ast.BoolOp, ast.Compare, ast.And, ast.Or, *_UNARY, *_COMPARE,
)  # fmt: skip


def _is_plain(check: ast.expr) -> bool:
    """Whether the parent can evaluate the check itself: literals, probe values, not/and/or and
    comparisons. Anything else (calls, arithmetic, setup names) goes to the reference sandbox."""
    for node in ast.walk(check):
        if not isinstance(node, _PLAIN_NODES):
            return False
        if isinstance(node, ast.Name) and not node.id.startswith("__probe_"):
            return False
        if isinstance(node, ast.Dict) and None in node.keys:
            return False
    return True


def _evaluate_plain(node: ast.expr, values: dict[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return values[node.id]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        items = [_evaluate_plain(e, values) for e in node.elts]
        return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict):
        pairs = zip(node.keys, node.values, strict=True)
        return {_evaluate_plain(k, values): _evaluate_plain(v, values) for k, v in pairs}
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate_plain(node.operand, values))
    if isinstance(node, ast.BoolOp):
        result = None
        for value_node in node.values:
            result = _evaluate_plain(value_node, values)
            if bool(result) != isinstance(node.op, ast.And):
                return result
        return result
    if isinstance(node, ast.Compare):
        left = _evaluate_plain(node.left, values)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = _evaluate_plain(right_node, values)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    raise TypeError(f"not a plain check node: {type(node).__name__}")


def _read_records(run: CaseRun, count: int, field: str) -> list[tuple[bool, Any]]:
    """Per index, (answered, payload) from a run's JSON-lines records.

    A malformed or repeated record means the solution wrote into the record channel: then no
    record counts. (Well-formed forged values are just claims; they are checked like any.)
    """
    results: list[tuple[bool, Any]] = [(False, None)] * count
    seen = set()
    for line in run.records.splitlines():
        try:
            record = json.loads(line)
            i = record["i"]
            if type(i) is not int or not 0 <= i < count or i in seen:
                raise ValueError("bad index")
        except (ValueError, KeyError, TypeError, RecursionError):
            return [(False, None)] * count
        seen.add(i)
        if field in record:
            results[i] = (True, record[field])
    return results


def _run_probes(code: str, suite: _TestSuite, probes: list[str], limits: SandboxLimits):
    """Probe values by placeholder name, or a rejection when the run itself failed."""
    job = {
        "mode": "probes",
        "code": code,
        "setup": _setup_for_probes(suite, probes),
        "probes": probes,
    }
    report = run_job(job, limits)
    if report.failure:
        return reject(report.failure)
    run = report.runs[0]
    if run.timed_out or run.overflow:
        return reject(_run_problem(run))
    values = {}
    for k, (answered, encoded) in enumerate(_read_records(run, len(probes), "v")):
        if answered:
            try:
                values[f"__probe_{k}__"] = decode_value(encoded)
            except (ValueError, RecursionError):
                pass
    return values


def _verify_tests(
    code: str, tree: ast.Module, suite: _TestSuite, limits: SandboxLimits
) -> VerifyResult:
    solution_names = frozenset(
        _bound_names(tree.body) - suite.setup_bound - _BUILTIN_NAMES - _STDLIB_MODULES
    )
    probes: list[str] = []
    checks = [_split(check, solution_names, probes) for check in suite.checks]
    values: dict[str, Any] = {}
    if probes:
        values = _run_probes(code, suite, probes, limits)
        if isinstance(values, VerifyResult):
            return values
    total = len(checks)
    deferred = []
    for i, check in enumerate(checks):
        if _probe_names(check) - values.keys():
            return reject(f"test {i} failed: the solution raised or did not answer (of {total})")
        if not _is_plain(check):
            deferred.append(i)
            continue
        try:
            ok = bool(_evaluate_plain(check, values))
        except Exception:  # noqa: BLE001 - comparing incomparable values fails the test
            ok = False
        if not ok:
            return reject(f"test {i} failed (of {total})")
    if deferred:
        verdicts = _reference_checks(suite, [checks[i] for i in deferred], values, limits)
        for i, ok in zip(deferred, verdicts, strict=True):
            if not ok:
                return reject(f"test {i} failed (of {total})")
    return accept(f"passed {total}/{total}")


def _reference_checks(
    suite: _TestSuite, checks: list[ast.expr], values: dict[str, Any], limits: SandboxLimits
) -> list[bool]:
    """Evaluates checks in a sandbox with the test setup and the decoded values, no solution."""
    count = max((int(name[8:-2]) + 1 for name in values), default=0)
    encoded = [
        [encode_value(values[f"__probe_{k}__"])] if f"__probe_{k}__" in values else None
        for k in range(count)
    ]
    used = set().union(*(_used_names(c) for c in checks))
    imports = [f"import {m}" for m in sorted((used & _STDLIB_MODULES) - suite.setup_bound)]
    setup = "\n".join([*imports, *(ast.unparse(s) for s in suite.setup)])
    conditions = [ast.unparse(c) for c in checks]
    job = {"mode": "reference", "setup": setup, "conditions": conditions, "values": encoded}
    report = run_job(job, limits)
    if report.failure or not report.runs or report.runs[0].timed_out:
        return [False] * len(checks)
    run = report.runs[0]
    if run.exit_code != 0:
        last_line = (run.stderr.strip().splitlines() or [f"exit status {run.exit_code}"])[-1]
        raise ValueError(f"code: the test setup fails without the solution ({last_line})")
    return [answered and ok is True for answered, ok in _read_records(run, len(checks), "ok")]


# ----------------------------------------------------------------------------------------------
# The verifier.


def _replay(code: str, form: code_forms.CheckFunction, limits: SandboxLimits) -> VerifyResult:
    """A check function that is not straight-line code, in three runs.

    1. The tests alone, with a stand-in that records the arguments of each call to the solution
       (its results are placeholders; failing asserts do not stop the recording).
    2. The solution alone, called with those arguments (probes): it sees no expected value.
    3. The tests alone again, the stand-in replaying the solution's decoded results for the same
       arguments; the check finishing is the verdict. Calls whose arguments depend on earlier
       results do not replay the same way and fail (the reason says so).
    """
    run = "check(__candidate__)"
    job = {"mode": "calls", "setup": form.record_setup, "run": run, "max_calls": MAX_REPLAY_CALLS}
    report = run_job(job, limits)
    if report.failure or not report.runs or report.runs[0].timed_out:
        return reject(f"recording the tests' calls failed ({report.failure or 'timeout'})")
    if report.runs[0].exit_code != 0:
        last_line = (report.runs[0].stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"code: the test setup fails without the solution ({last_line})")
    recorded = []
    for answered, arguments in _read_records(report.runs[0], MAX_REPLAY_CALLS, "a"):
        if not answered:
            break
        recorded.append(arguments)
    if not recorded:
        raise ValueError("code: the check function never calls its candidate")
    probes = [
        f"{form.entry_point}(*__value_{k}__[0], **__value_{k}__[1])" for k in range(len(recorded))
    ]
    job = {"mode": "probes", "code": code, "setup": "", "probes": probes, "values": recorded}
    report = run_job(job, limits)
    if report.failure:
        return reject(report.failure)
    if report.runs[0].timed_out or report.runs[0].overflow:
        return reject(_run_problem(report.runs[0]))
    replies = []
    for answered, encoded in _read_records(report.runs[0], len(probes), "v"):
        try:
            # Decoded and encoded again here: only plain values reach the tests.
            replies.append([encode_value(decode_value(encoded))] if answered else None)
        except (ValueError, TypeError, RecursionError):
            replies.append(None)
    job = {
        "mode": "calls",
        "setup": form.setup,
        "run": run,
        "max_calls": MAX_REPLAY_CALLS,
        "recorded": recorded,
        "replies": replies,
    }
    report = run_job(job, limits)
    if report.failure or not report.runs or report.runs[0].timed_out:
        return reject(f"checking the results failed ({report.failure or 'timeout'})")
    [(answered, ok)] = _read_records(report.runs[0], 1, "ok")
    if answered and ok is True:
        return accept(f"passed ({len(recorded)} calls)")
    [(_, error)] = _read_records(report.runs[0], 1, "e")
    failed = sum(reply is None for reply in replies)
    detail = f"; the solution failed {failed} of {len(replies)} calls" if failed else ""
    return reject(f"check failed ({error or 'no verdict'}{detail})")


def _tests_source(example: Mapping[str, Any], form: str, helpers: str):
    """The test source (top-level asserts) or a `code_forms.CheckFunction` to replay."""
    if form == "test_list":
        tests = code_forms.mbpp_tests(example)
    else:
        tests = _text(example[form])
        if not isinstance(tests, str):
            raise ValueError(f"code: {form!r} must be Python source (a string)")
    if "entry_point" in example:
        entry_point = _text(example["entry_point"])
        if not isinstance(entry_point, str):
            raise ValueError("code: 'entry_point' must be a string")
        return code_forms.check_function_tests(tests, entry_point, helpers)
    return "\n".join(filter(None, [helpers, tests]))


def verify_code(response: str, example: Mapping[str, Any]) -> VerifyResult:
    """Runs the last ```python block of ``response`` against ``example`` (module docstring)."""
    forms = [k for k in (*TEST_FORMS, *IO_FORMS) if k in example]
    if len(forms) != 1:
        raise ValueError(
            f"code: example needs exactly one of {', '.join(TEST_FORMS + IO_FORMS)}, got keys "
            f"{sorted(example)}"
        )
    form = forms[0]
    helpers = _text(example.get("helpers") or "")
    if not isinstance(helpers, str):
        raise ValueError("code: 'helpers' must be Python source (a string)")
    suite = replay = cases = None
    if form in TEST_FORMS:
        tests = _tests_source(example, form, helpers)
        if isinstance(tests, code_forms.CheckFunction):
            replay = tests
        else:
            suite = _parse_tests(tests)
    else:
        cases = _parse_io(code_forms.io_cases(example))
    limits = _limits(example)
    code = last_python_block(response)
    if code is None:
        return reject("no complete ```python block after the reasoning")
    if not code.strip():
        return reject("empty code block")
    if len(code) > MAX_CODE_CHARS:
        return reject("code too long")
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return reject("syntax error")
    if cases is not None:
        return _verify_io(code, cases, limits)
    if helpers:
        # The prompt's own code (imports, helper functions) comes first, as in HumanEval's
        # harness: a solution may use it without repeating it.
        code = helpers + "\n" + code
        tree = ast.parse(code)
    if replay is not None:
        return _replay(code, replay, limits)
    return _verify_tests(code, tree, suite, limits)
