"""Every evaluation's held-out completions, one JSON line per problem, in the run's workdir.

    <workdir>/held_out/step<N>.jsonl      N (six digits): the RL steps the policy had taken

so ``step000000`` is the evaluation before RL and the largest N the one after (a periodic
evaluation at the last step is the same policy and the same greedy text). A line::

    {"id": 3, "question": ..., "gold": "20", "ops": 2, "completion": ...,
     "answer": "20" (as written, null if none or several), "correct": true,
     "has_answer": true, "steps": {"1": "on_chain", "2": "wrong"} (lenient checker, last
     attempts), "strict_steps": [true, false] (`arithmetic.check_steps`), "retries": 0,
     "repairs": 0, "harms": 0, "prose_lines": 0}

``id`` is the problem's position in the evaluation set. Files are written whole (a temporary
file renamed), so a run killed mid-write leaves the previous file or none, never half of one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rl_reason.pipelines.research import measures, steps
from rl_reason.tasks import arithmetic
from rl_reason.verifiers.arithmetic import verify_arithmetic

DIRECTORY = "held_out"


def record(prompt_id: int, completion: str, problem: Mapping[str, Any]) -> dict[str, Any]:
    """One line of the file (see the module docstring)."""
    report = steps.read_steps(completion, problem)
    return {
        "id": prompt_id,
        "question": problem["question"],
        "gold": str(problem["answer"]),
        "ops": len(problem["steps"]),
        "completion": completion,
        "answer": measures.final_answer(completion),
        "correct": verify_arithmetic(completion, problem).correct,
        "has_answer": measures.has_answer(completion),
        "steps": {str(i): v for i, v in report.verdicts().items()},
        "strict_steps": arithmetic.check_steps(completion, problem),
        "retries": report.retries,
        "repairs": report.repairs,
        "harms": report.harms,
        "prose_lines": report.prose_lines,
    }


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """All rows or nothing: written beside `path`, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


class HeldOutLog:
    """A `response_stats`-style hook that keeps the completions of each full pass over
    `examples` and writes them when the pass is complete.

    The evaluator hands it its greedy completions chunk by chunk, in order; `step()` says how
    many RL steps the policy has taken (set it once the trainer exists). Only passes over
    exactly `examples`, in their order, are recorded: anything else is an error, not a file
    with the wrong ids.
    """

    def __init__(self, workdir: str | Path, examples: Sequence[Mapping[str, Any]]):
        if not examples:
            raise ValueError("HeldOutLog needs the evaluation set (at least one example)")
        self.directory = Path(workdir) / DIRECTORY
        self.examples = list(examples)
        self.step: Callable[[], int] = lambda: 0
        self.written: dict[int, Path] = {}
        self._rows: list[dict[str, Any]] = []

    def path(self, step: int) -> Path:
        return self.directory / f"step{step:06d}.jsonl"

    def __call__(self, texts: Sequence[str], examples: Sequence[Mapping[str, Any]]) -> None:
        for text, example in zip(texts, examples, strict=True):
            i = len(self._rows)
            if i >= len(self.examples) or example["question"] != self.examples[i]["question"]:
                raise ValueError(
                    f"held-out completion {i} is not for evaluation problem {i}: the log "
                    "records full passes over the evaluation set, in order"
                )
            self._rows.append(record(i, text, example))
        if len(self._rows) == len(self.examples):
            step = self.step()
            write_jsonl(self.path(step), self._rows)
            self.written[step] = self.path(step)
            self._rows = []
