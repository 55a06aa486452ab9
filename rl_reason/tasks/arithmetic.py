"""Synthetic multi-step arithmetic: the task behind the default R1-Zero demo.

A problem is a start number and a chain of operations::

    Start with 17. Step 1: add 8. Step 2: subtract 5. Step 3: multiply by 3.

Every operand and every intermediate result lies in ``[0, max_value]``, so a small model can
learn each step; the answer needs all of them. Its worked solution has one line per step::

    Step 1: 17 + 8 = 25
    Step 2: 25 - 5 = 20
    Step 3: 20 * 3 = 60

A tiny transformer is pretrained on `pretraining_corpus` (mostly bare answers, some worked
solutions, in several layouts); GRPO with an outcome-only reward should then teach it to write
the steps before answering. The step checkers below measure that without affecting the reward.

Randomness: each entry point draws from its own stream of ``seed`` (problems/eval, train,
corpus), so equal seeds do not give equal problems across them. Overlap by chance is still
possible in small problem spaces: pass ``exclude_keys`` (sets of `problem_key`) to keep the
pretraining corpus, the RL training problems and the eval set disjoint.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Collection, Iterator, Mapping
from typing import Any, ClassVar

import numpy as np

from rl_reason.tasks import templates
from rl_reason.verifiers.arithmetic_steps import apply_op

VERIFIER = "arithmetic"
OPS = "+-*"
STYLES = ("worked", "bare", "steps", "qa")

Step = tuple[int, str, int, int]  # (a, op, b, result): result = a op b
Problem = dict[str, Any]  # keys: question, answer, steps, verifier

_OP_WORDS = {"+": "add", "-": "subtract", "*": "multiply by"}
# Stream ids for np.random.SeedSequence spawn keys; see the module docstring.
_PROBLEMS_STREAM, _TRAIN_STREAM, _CORPUS_STREAM, _RETRY_STREAM = 0, 1, 2, 3
# A retried step's first, wrong value is off by one of these (research_self_correction).
RETRY_DELTAS = (1, -1, 2, -2, 3, -3)
RETRY_WORD = "Wait."


@dataclasses.dataclass(frozen=True)
class ArithmeticConfig:
    """Problem distribution.

    Attributes:
      min_ops, max_ops: number of chained operations, drawn uniformly in [min_ops, max_ops].
      max_value: every start value, operand and intermediate result lies in [0, max_value].
      ops: which operations may appear, a subset of "+-*" (stored in that canonical order).
      max_factor: multiplications are by a factor in [2, max_factor].
    """

    min_ops: int = 2
    max_ops: int = 4
    max_value: int = 99
    ops: str = OPS
    max_factor: int = 5

    def __post_init__(self):
        for name in ("min_ops", "max_ops", "max_value", "max_factor"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or isinstance(value, bool):
                raise TypeError(f"ArithmeticConfig.{name} must be an int, got {value!r}")
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(
                f"ArithmeticConfig needs 1 <= min_ops <= max_ops, got min_ops={self.min_ops}, "
                f"max_ops={self.max_ops}"
            )
        if self.max_value < 1:
            raise ValueError(f"ArithmeticConfig.max_value must be >= 1, got {self.max_value}")
        if self.max_factor < 2:
            raise ValueError(f"ArithmeticConfig.max_factor must be >= 2, got {self.max_factor}")
        if not isinstance(self.ops, str) or not self.ops or set(self.ops) - set(OPS):
            raise ValueError(
                f"ArithmeticConfig.ops must be a non-empty subset of {OPS!r}, got {self.ops!r}"
            )
        if len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ArithmeticConfig.ops has a repeated operation: {self.ops!r}")
        # Canonical order, so that configs with the same set of ops are equal and draw the same
        # problems.
        object.__setattr__(self, "ops", "".join(op for op in OPS if op in self.ops))
        if not _feasible(self)[self.max_ops].any():
            raise ValueError(
                f"No chain of {self.max_ops} operations from {self.ops!r} keeps every value in "
                f"[0, {self.max_value}]: raise max_value or lower max_ops"
            )


# ----------------------------------------------------------------------------- problems


@functools.lru_cache(maxsize=32)
def _feasible(cfg: ArithmeticConfig) -> np.ndarray:
    """``[max_ops + 1, max_value + 1]`` bool: row k says from which values k more steps fit.

    Drawing only moves that keep the rest of the chain possible means no rejection loop, and
    tight configs (e.g. only "*" with a small max_value) still sample every valid chain.
    """
    n_values = cfg.max_value + 1
    table = np.zeros((cfg.max_ops + 1, n_values), dtype=bool)
    table[0] = True
    values = np.arange(n_values)
    for k in range(1, cfg.max_ops + 1):
        nxt = table[k - 1]
        ok = np.zeros(n_values, dtype=bool)
        if "+" in cfg.ops:  # some v' > v is feasible
            ok |= np.concatenate([np.cumsum(nxt[::-1])[::-1][1:] > 0, [False]])
        if "-" in cfg.ops:  # some v' < v is feasible
            ok |= np.concatenate([[False], np.cumsum(nxt)[:-1] > 0])
        if "*" in cfg.ops:
            for f in range(2, cfg.max_factor + 1):
                target = values[1:] * f
                fits = target <= cfg.max_value
                hit = np.zeros(n_values - 1, dtype=bool)
                hit[fits] = nxt[target[fits]]
                ok[1:] |= hit
        table[k] = ok
    return table


def _successors(cur: int, op: str, feasible_next: np.ndarray, cfg: ArithmeticConfig) -> np.ndarray:
    """Operands b for which ``cur op b`` is a valid step that leaves the rest feasible."""
    if op == "+":
        b = np.arange(1, cfg.max_value - cur + 1)
        return b[feasible_next[cur + b]]
    if op == "-":
        b = np.arange(1, cur + 1)
        return b[feasible_next[cur - b]]
    if cur == 0:  # "0 * f" teaches nothing
        return np.zeros(0, dtype=np.int64)
    b = np.arange(2, min(cfg.max_factor, cfg.max_value // cur) + 1)
    return b[feasible_next[cur * b]]


def _apply(a: int, op: str, b: int) -> int:
    return apply_op(a, op, b)


DEFAULT_CONFIG = ArithmeticConfig()


def question_text(start: int, ops_and_operands: list[tuple[str, int]]) -> str:
    """``"Start with 17. Step 1: add 8. Step 2: subtract 5."`` for ``(17, [("+", 8), ("-", 5)])``.

    Numbered clauses let a worked line "Step i: ..." find its operation by its label; without
    them a small model spends most of its pretraining learning to count clauses.
    """
    clauses = [f"Step {i}: {_OP_WORDS[op]} {b}." for i, (op, b) in enumerate(ops_and_operands, 1)]
    return f"Start with {start}. {' '.join(clauses)}"


def generate_problem(rng: np.random.Generator, cfg: ArithmeticConfig = DEFAULT_CONFIG) -> Problem:
    """One problem: ``{"question", "answer", "steps", "verifier"}``.

    The number of operations is uniform in [min_ops, max_ops]; each step picks an operation
    uniformly among those that can continue the chain within range, then an operand uniformly
    among the valid ones. ``answer`` is the final value as a decimal string.
    """
    table = _feasible(cfg)
    n_ops = int(rng.integers(cfg.min_ops, cfg.max_ops + 1))
    starts = np.flatnonzero(table[n_ops])
    cur = int(starts[rng.integers(starts.size)])
    start = cur
    steps: list[Step] = []
    for remaining in range(n_ops - 1, -1, -1):
        options = [(op, _successors(cur, op, table[remaining], cfg)) for op in cfg.ops]
        options = [(op, b) for op, b in options if b.size]
        op, operands = options[int(rng.integers(len(options)))]
        b = int(operands[rng.integers(operands.size)])
        result = _apply(cur, op, b)
        steps.append((cur, op, b, result))
        cur = result
    return {
        "question": question_text(start, [(op, b) for _, op, b, _ in steps]),
        "answer": str(cur),
        "steps": steps,
        "verifier": VERIFIER,
    }


def problem_key(problem: Mapping[str, Any]) -> str:
    """Identity of a problem for de-duplication: its question (which fixes the whole chain)."""
    return problem["question"]


def _rng(seed: int, stream: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, *extra)))


def _draw(
    rng: np.random.Generator,
    n: int,
    cfg: ArithmeticConfig,
    exclude_keys: Collection[str],
    unique: bool,
) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[str] = set()
    budget = 100 * n + 1000  # a generous bound; hitting it means the space is nearly exhausted
    for _ in range(budget):
        if len(problems) == n:
            return problems
        problem = generate_problem(rng, cfg)
        key = problem_key(problem)
        if key in exclude_keys or (unique and key in seen):
            continue
        seen.add(key)
        problems.append(problem)
    if len(problems) == n:
        return problems
    raise ValueError(
        f"Found only {len(problems)} of {n} {'distinct ' if unique else ''}problems outside "
        f"exclude_keys ({len(exclude_keys)} keys) in {budget} draws from {cfg}: the problem space "
        "is too small; raise max_value or max_ops, or ask for fewer problems"
    )


def generate_problems(seed: int, n: int, cfg: ArithmeticConfig = DEFAULT_CONFIG) -> list[Problem]:
    """`n` problems, a deterministic function of `seed` (the first k are the same for any n)."""
    rng = _rng(seed, _PROBLEMS_STREAM)
    return [generate_problem(rng, cfg) for _ in range(n)]


# ----------------------------------------------------------------------------- text formats


def worked_solution(problem: Mapping[str, Any]) -> str:
    """One ``"Step i: a op b = c"`` line per step, joined by newlines (no trailing newline)."""
    return "\n".join(
        f"Step {i}: {a} {op} {b} = {c}" for i, (a, op, b, c) in enumerate(problem["steps"], 1)
    )


def retried_solution(problem: Mapping[str, Any], at: int, delta: int) -> str:
    """The worked solution with step `at` (1-based) first written with its value off by
    `delta`, then retried right on the next line, and the chain carried on from the right
    value::

        Step 1: 17 + 8 = 25
        Step 2: 25 - 5 = 22
        Wait. Step 2: 25 - 5 = 20
        Step 3: 20 * 3 = 60
    """
    steps = [tuple(s) for s in problem["steps"]]
    if not 1 <= at <= len(steps) or delta == 0:
        raise ValueError(f"retried_solution needs 1 <= at <= {len(steps)} and delta != 0")
    lines = []
    for i, (a, op, b, c) in enumerate(steps, 1):
        if i == at:
            lines.append(f"Step {i}: {a} {op} {b} = {c + delta}")
            lines.append(f"{RETRY_WORD} Step {i}: {a} {op} {b} = {c}")
        else:
            lines.append(f"Step {i}: {a} {op} {b} = {c}")
    return "\n".join(lines)


def draw_retry(rng: np.random.Generator, problem: Mapping[str, Any], max_value: int) -> tuple:
    """(at, delta) of a retry: a uniform step, and a delta that keeps the wrong value in
    [0, max_value] (the values a problem's chain can hold)."""
    steps = problem["steps"]
    at = int(rng.integers(1, len(steps) + 1))
    value = steps[at - 1][3]
    for k in rng.permutation(len(RETRY_DELTAS)):
        if 0 <= value + RETRY_DELTAS[k] <= max_value:
            return at, int(RETRY_DELTAS[k])
    raise ValueError(f"no retry delta keeps {value} in [0, {max_value}]")


def make_prompt(question: str) -> str:
    """The R1-Zero prompt (see `rl_reason.tasks.templates`); it ends with ``<think>``."""
    return templates.make_prompt(question)


def target_completion(problem: Mapping[str, Any], *, worked: bool = True) -> str:
    """The completion for ``make_prompt(problem["question"])``, with or without the steps."""
    reasoning = worked_solution(problem) if worked else ""
    return templates.make_completion(reasoning, problem["answer"])


def format_pretraining_example(
    problem: Mapping[str, Any], style: str, retry: tuple[int, int] | None = None
) -> str:
    """One pretraining text for `problem` in one of `STYLES`.

    - "worked": prompt + completion with the worked solution in the think block.
    - "bare": prompt + completion with an empty think block, then the answer.
    - "steps": a web-like worked solution without the template:
      ``"{question}\\nStep 1: 17 + 8 = 25\\n...\\nThe answer is 60."``
    - "qa": a web-like bare answer: ``"Q: {question}\\nA: 60"``.

    `retry` (at, delta), for the two worked styles: step `at` is written wrong, then retried
    (`retried_solution`).
    """
    question, answer = problem["question"], problem["answer"]
    if retry is not None and style not in ("worked", "steps"):
        raise ValueError(f"a retry needs a worked style, not {style!r}")
    reasoning = worked_solution(problem) if retry is None else retried_solution(problem, *retry)
    if style == "worked":
        return make_prompt(question) + templates.make_completion(reasoning, answer)
    if style == "bare":
        return make_prompt(question) + target_completion(problem, worked=False)
    if style == "steps":
        return "\n".join([question, reasoning, f"The answer is {answer}."])
    if style == "qa":
        return f"Q: {question}\nA: {answer}"
    raise ValueError(f"Unknown pretraining style {style!r}; expected one of {STYLES}")


def corpus_styles(
    n: int,
    *,
    frac_worked: float,
    frac_template: float = 0.5,
    frac_template_worked: float | None = None,
) -> list[str]:
    """The unshuffled style of each of `n` corpus texts: exact counts, rounded.

    ``round(frac_worked * n)`` texts carry worked steps ("worked" or "steps"), the others only
    the answer ("bare" or "qa"); within each group a `frac_template` share uses the R1 template
    (`frac_template_worked`, when given, sets that share for the worked group alone: a base
    model that knows its arithmetic from elsewhere but rarely shows steps inside the template).
    """
    if frac_template_worked is None:
        frac_template_worked = frac_template
    for name, frac in (
        ("frac_worked", frac_worked),
        ("frac_template", frac_template),
        ("frac_template_worked", frac_template_worked),
    ):
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {frac}")
    n_worked = round(frac_worked * n)
    n_bare = n - n_worked
    n_worked_template = round(frac_template_worked * n_worked)
    n_bare_template = round(frac_template * n_bare)
    return (
        ["worked"] * n_worked_template
        + ["steps"] * (n_worked - n_worked_template)
        + ["bare"] * n_bare_template
        + ["qa"] * (n_bare - n_bare_template)
    )


def pretraining_corpus(
    seed: int,
    n: int,
    cfg: ArithmeticConfig = DEFAULT_CONFIG,
    *,
    frac_worked: float,
    exclude_keys: Collection[str] = (),
    frac_template: float = 0.5,
    frac_template_worked: float | None = None,
    frac_retry: float = 0.0,
) -> list[str]:
    """`n` texts in shuffled styles (counts from `corpus_styles`), deterministic for `seed`.

    This stands in for a web-pretrained base model: it has seen worked arithmetic sometimes
    (`frac_worked`) and bare answers often, and the R1 template only in part of the texts.
    Problems whose `problem_key` is in `exclude_keys` never appear; problems may repeat.

    `frac_retry`: the share of the worked texts (rounded) in which one step is first written
    wrong and then retried (`retried_solution`), chosen from a stream of their own, so the
    rest of the corpus is the one `frac_retry=0` gives.
    """
    if not 0.0 <= frac_retry <= 1.0:
        raise ValueError(f"frac_retry must be in [0, 1], got {frac_retry}")
    rng = _rng(seed, _CORPUS_STREAM)
    styles = corpus_styles(
        n,
        frac_worked=frac_worked,
        frac_template=frac_template,
        frac_template_worked=frac_template_worked,
    )
    styles = [styles[i] for i in rng.permutation(n)]
    exclude_keys = _as_set(exclude_keys)
    problems = _draw(rng, n, cfg, exclude_keys, unique=False)
    retries: dict[int, tuple[int, int]] = {}
    if frac_retry > 0:
        worked = [i for i, s in enumerate(styles) if s in ("worked", "steps")]
        r_rng = _rng(seed, _RETRY_STREAM)
        picked = r_rng.permutation(len(worked))[: round(frac_retry * len(worked))]
        retries = {worked[k]: draw_retry(r_rng, problems[worked[k]], cfg.max_value) for k in picked}
    return [
        format_pretraining_example(p, s, retries.get(i))
        for i, (p, s) in enumerate(zip(problems, styles, strict=True))
    ]


# ----------------------------------------------------------------------------- step checks
# The checker lives with the verifiers that use it; these names stay importable from here.
from rl_reason.verifiers.arithmetic_steps import (  # noqa: E402, F401
    check_arithmetic,
    check_steps,
    count_steps,
    has_steps,
    parse_steps,
    process_correct,
)

# ----------------------------------------------------------------------------- the task


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
    """What the trainer needs from the arithmetic task.

    Examples are the `generate_problem` dicts. Typical use::

        task = ArithmeticTask(ArithmeticConfig(max_ops=5))
        eval_set = task.eval_set(seed=0, n=512)
        held_out = {task.key(p) for p in eval_set}
        corpus = task.pretraining_corpus(0, 100_000, frac_worked=0.2, exclude_keys=held_out)
        for batch in task.train_iterator(0, batch_size=64, exclude_keys=held_out):
            prompts = [task.prompt(ex) for ex in batch]
    """

    cfg: ArithmeticConfig = dataclasses.field(default_factory=ArithmeticConfig)
    name: ClassVar[str] = "arithmetic"
    verifier_name: ClassVar[str] = VERIFIER

    def prompt(self, example: Mapping[str, Any]) -> str:
        return make_prompt(example["question"])

    def key(self, example: Mapping[str, Any]) -> str:
        return problem_key(example)

    def train_iterator(
        self,
        seed: int,
        batch_size: int,
        exclude_keys: Collection[str] = (),
        *,
        start_batch: int = 0,
    ) -> Iterator[list[Problem]]:
        """Endless batches of problems; batch i depends only on (seed, i, cfg, exclude_keys).

        Resume after preemption with ``start_batch=step`` instead of replaying the stream.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        exclude_keys = _as_set(exclude_keys)
        i = start_batch
        while True:
            yield _draw(_rng(seed, _TRAIN_STREAM, i), batch_size, self.cfg, exclude_keys, False)
            i += 1

    def eval_set(self, seed: int, n: int, exclude_keys: Collection[str] = ()) -> list[Problem]:
        """`n` distinct problems, none in `exclude_keys`, deterministic for `seed`."""
        return _draw(_rng(seed, _PROBLEMS_STREAM), n, self.cfg, _as_set(exclude_keys), True)

    def pretraining_corpus(
        self,
        seed: int,
        n: int,
        *,
        frac_worked: float,
        exclude_keys: Collection[str] = (),
        frac_template: float = 0.5,
        frac_template_worked: float | None = None,
        frac_retry: float = 0.0,
    ) -> list[str]:
        return pretraining_corpus(
            seed,
            n,
            self.cfg,
            frac_worked=frac_worked,
            exclude_keys=exclude_keys,
            frac_template=frac_template,
            frac_template_worked=frac_template_worked,
            frac_retry=frac_retry,
        )


def _as_set(keys: Collection[str]) -> Collection[str]:
    # Membership tests on a list of 100k keys would dominate generation time.
    return keys if isinstance(keys, set | frozenset | dict) else set(keys)
