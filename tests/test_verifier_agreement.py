"""The verifiers against other graders' published cases (tests/fixtures/agreement/*.json).

Each fixture names its source. A case holds the source's verdict (``source``); where our verdict
differs it also holds ours (``ours``) and the reason (``why``), a key of ``DESIGN`` below, each of
which the README's verifier table explains. So a change that moves any verdict fails here: a new
agreement must drop its ``ours``/``why``, a new disagreement must be judged.

    python -m pytest -q tests/test_verifier_agreement.py
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from rl_reason import verifiers

FIXTURES = Path(__file__).parent / "fixtures" / "agreement"
README = Path(__file__).parents[1] / "README.md"
# Disagreements by design; the README's verifier table gives each one's reason.
DESIGN = {
    "anchored": "only \\boxed{} / <answer> (/ #### for gsm8k) after the reasoning is an answer",
    "anchors": "gsm8k also takes \\boxed{} and <answer>, not only '#### N'",
    "decimal_comma": "a comma is a list or thousands separator, never a decimal point",
    "unordered_lists": "a comma list of answers is compared as a set",
    "percent_is_not_fraction": "50 is not 0.5: no x100 or /100 matches",
    "numeric_value": "numbers are compared by value (72.00 is 72), not as strings",
    "hedging": "every distinct final answer must be right",
    "number_forms": "currency signs, the Unicode minus and '####72' are read",
    "multiline_answer": "an expression in <answer> may span lines",
    "operator_spellings": "x, ÷, \\times, \\cdot, \\div are the four operations",
    "countdown_operations": "only binary + - * /: no unary minus, no **",
}


def _cases():
    for path in sorted(FIXTURES.glob("*.json")):
        data = json.loads(path.read_text())
        assert data["source"], path
        for i, case in enumerate(data["cases"]):
            yield pytest.param(case, id=f"{path.stem}-{i}")


@pytest.mark.parametrize("case", _cases())
def test_verdict(case):
    expected = case.get("ours", case["source"])
    if "ours" in case:
        assert case["ours"] != case["source"] and case["why"] in DESIGN, case
    result = verifiers.get(case["verifier"])(case["response"], case["example"])
    assert result.correct is expected, (case, result.reason)
    assert result.reason


def test_every_reason_is_in_the_readme():
    readme = README.read_text()
    used = {
        case["why"]
        for path in FIXTURES.glob("*.json")
        for case in json.loads(path.read_text())["cases"]
        if "why" in case
    }
    assert used <= set(DESIGN)
    assert [key for key in DESIGN if f"`{key}`" not in readme] == []


def agreement_table() -> list[tuple[str, int, int, collections.Counter]]:
    """(source file, cases, agreeing, disagreements by reason): the README's table."""
    rows = []
    for path in sorted(FIXTURES.glob("*.json")):
        cases = json.loads(path.read_text())["cases"]
        why = collections.Counter(c["why"] for c in cases if "why" in c)
        rows.append((path.stem, len(cases), len(cases) - sum(why.values()), why))
    return rows


if __name__ == "__main__":
    for name, total, agree, why in agreement_table():
        print(f"| {name} | {total} | {agree} | {', '.join(f'{k} {v}' for k, v in why.items())} |")
