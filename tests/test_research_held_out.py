"""The held-out completions log: one full file per evaluation pass, named by the RL step."""

import json

import pytest

from rl_reason.pipelines.research import held_out
from rl_reason.tasks import arithmetic, templates

PROBLEMS = arithmetic.ArithmeticTask().eval_set(0, 5)


def _texts(answer_of):
    return [
        templates.make_completion(arithmetic.worked_solution(p), answer_of(p)) for p in PROBLEMS
    ]


def test_a_pass_in_chunks_is_written_once_complete(tmp_path):
    log = held_out.HeldOutLog(tmp_path, PROBLEMS)
    texts = _texts(lambda p: p["answer"])
    log(texts[:2], PROBLEMS[:2])
    assert not log.path(0).exists()  # not before the pass is complete
    log(texts[2:], PROBLEMS[2:])
    rows = held_out.read_jsonl(log.path(0))
    assert [r["id"] for r in rows] == list(range(5))
    assert all(r["correct"] and r["has_answer"] for r in rows)
    first = rows[0]
    assert first["question"] == PROBLEMS[0]["question"] and first["gold"] == PROBLEMS[0]["answer"]
    assert first["answer"] == PROBLEMS[0]["answer"] and first["completion"] == texts[0]
    assert first["ops"] == len(PROBLEMS[0]["steps"])
    assert first["steps"] == {str(i + 1): "on_chain" for i in range(first["ops"])}
    assert first["strict_steps"] == [True] * first["ops"]
    assert list(tmp_path.glob("held_out/*.tmp")) == []

    step = 7
    log.step = lambda: step
    wrong = _texts(lambda p: str(int(p["answer"]) + 1))
    log(wrong, PROBLEMS)
    later = held_out.read_jsonl(tmp_path / "held_out" / "step000007.jsonl")
    assert not any(r["correct"] for r in later)
    assert [r["answer"] for r in later] == [str(int(p["answer"]) + 1) for p in PROBLEMS]
    assert set(log.written) == {0, 7}
    json.dumps(later)  # plain JSON all the way down


def test_a_pass_out_of_order_is_refused(tmp_path):
    log = held_out.HeldOutLog(tmp_path, PROBLEMS)
    texts = _texts(lambda p: p["answer"])
    with pytest.raises(ValueError, match="not for evaluation problem 0"):
        log(texts[1:2], PROBLEMS[1:2])
    with pytest.raises(ValueError, match="evaluation set"):
        held_out.HeldOutLog(tmp_path, [])


def test_write_jsonl_replaces_the_file_whole(tmp_path):
    path = tmp_path / "x" / "a.jsonl"
    held_out.write_jsonl(path, [{"a": 1}, {"a": 2}])
    held_out.write_jsonl(path, [{"a": 3}])
    assert held_out.read_jsonl(path) == [{"a": 3}]
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.jsonl"]
