"""The per-host grain pipeline: exact resume, host slices of one global batch, epochs, bad rows.

Sources are plain lists of example dicts (any random-access sequence works) and, once, a real
tfds array_record source to check decoding.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from rl_reason.infra import data
from rl_reason.tasks import get_task
from rl_reason.tasks.bad_rows import MalformedRowsError


def _rows(n: int) -> list[dict]:
    return [{"question": f"q{i}", "answer": str(i), "verifier": "arithmetic"} for i in range(n)]


def _ids(batch: list[dict]) -> list[int]:
    return [int(e["answer"]) for e in batch]


def _take(iterator, steps: int) -> list[list[int]]:
    return [_ids(next(iterator)) for _ in range(steps)]


def _single(source, **kwargs):
    kwargs = {"global_batch_size": 4, "seed": 0, **kwargs}
    return data.train_iterator(source, process_index=0, process_count=1, **kwargs)


@pytest.mark.parametrize("stop_at", [1, 2, 3, 5])
def test_resume_continues_the_exact_stream(stop_at):
    # 10 rows, batches of 4: step 2 straddles the first epoch boundary, step 4 the second.
    source = _rows(10)
    straight = _take(_single(source), 8)
    first = _single(source)
    assert _take(first, stop_at) == straight[:stop_at]
    state = json.loads(json.dumps(first.get_state()))  # as a checkpoint stores it
    resumed = _single(source)
    resumed.set_state(state)
    assert _take(resumed, 8 - stop_at) == straight[stop_at:]


def test_epochs_cover_every_row_once_and_reshuffle():
    source = _rows(12)
    stream = np.concatenate(_take(_single(source, global_batch_size=3), 12))
    epochs = stream.reshape(3, 12)
    for epoch in epochs:
        assert sorted(epoch) == list(range(12))
    assert list(epochs[0]) != list(range(12))  # shuffled at all
    assert list(epochs[0]) != list(epochs[1]) and list(epochs[1]) != list(epochs[2])
    # The seed decides the order.
    assert _take(_single(source, seed=0), 3) == _take(_single(source, seed=0), 3)
    assert _take(_single(source, seed=0), 3) != _take(_single(source, seed=1), 3)


@pytest.mark.parametrize("process_count", [2, 4])
def test_hosts_slice_the_same_global_batch(process_count):
    source = _rows(10)
    global_batches = _take(_single(source, global_batch_size=8), 5)
    hosts = [
        data.train_iterator(
            source,
            global_batch_size=8,
            seed=0,
            process_index=h,
            process_count=process_count,
        )
        for h in range(process_count)
    ]
    for global_batch in global_batches:
        parts = [_ids(next(host)) for host in hosts]
        assert all(len(part) == 8 // process_count for part in parts)
        assert sum(parts, []) == global_batch  # host h holds [h * P/n, (h+1) * P/n)


def test_state_restores_on_another_process_count():
    source = _rows(10)
    one = _single(source, global_batch_size=4)
    _take(one, 3)
    state = one.get_state()
    expected = _ids(next(one))
    second_host = data.train_iterator(
        source, global_batch_size=4, seed=0, process_index=1, process_count=2
    )
    second_host.set_state(state)
    assert _ids(next(second_host)) == expected[2:]


def test_state_from_another_pipeline_is_refused():
    source = _rows(10)
    state = _single(source, seed=0).get_state()
    for other in (_single(source, seed=1), _single(source, global_batch_size=2), _single(_rows(9))):
        with pytest.raises(ValueError, match="resume with the same dataset"):
            other.set_state(state)
    with pytest.raises(ValueError, match="not a data iterator state"):
        _single(source).set_state({"next_index": 3})


def test_malformed_rows_are_skipped_counted_and_never_yielded():
    source = _rows(20)
    source[3] = {"question": "q3"}  # no answer
    source[7] = {"question": "q7", "answer": 7}  # not a string
    source[11] = {"question": "q11", "answer": "11", "verifier": "nope"}
    iterator = _single(source, global_batch_size=5, max_bad_fraction=0.2)
    assert iterator.num_examples == 17
    assert iterator.bad_rows.report() == {
        "rows": 20,
        "kept": 17,
        "skipped": {
            "field 'answer' is not a string": 1,
            "missing field 'answer'": 1,
            "unknown verifier name": 1,
        },
        "first_bad": [
            "row 3: missing field 'answer'",
            "row 7: field 'answer' is not a string",
            "row 11: unknown verifier name",
        ],
    }
    seen = np.concatenate(_take(iterator, 17 * 2 // 5))
    assert {3, 7, 11}.isdisjoint(seen)
    with pytest.raises(MalformedRowsError, match=r"3 of 20 rows \(15.0%\).*row 3: missing field"):
        _single(source)  # the default max_bad_fraction is 1%


def test_task_validation_at_read_time():
    # A row that passes the generic checks but not the task's own: a gold that is not a number.
    source = [{"question": f"q{i}", "answer": f"#### {i}", "verifier": "gsm8k"} for i in range(9)]
    source.append({"question": "q9", "answer": "#### nine", "verifier": "gsm8k"})
    task = get_task("gsm8k")
    iterator = _single(source, task=task, max_bad_fraction=0.1)
    assert iterator.bad_rows.skipped == {"unparseable gold answer": 1}
    assert iterator.num_examples == 9
    with pytest.raises(MalformedRowsError, match="row 9: unparseable gold answer"):
        _single(source, task=task, max_bad_fraction=0.05)


def test_bad_arguments():
    source = _rows(8)
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        data.train_iterator(source, global_batch_size=4, seed=0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match=r"process_index must be in \[0, 1\]"):
        data.train_iterator(source, global_batch_size=4, seed=0, process_index=2, process_count=2)
    with pytest.raises(TypeError, match="seed must be an int"):
        _single(source, seed=1.5)
    with pytest.raises(MalformedRowsError, match="no rows at all"):
        _single([])


def test_eval_examples():
    source = _rows(6)
    source[1] = {"question": "", "answer": "1"}
    assert _ids(data.eval_examples(source, max_bad_fraction=0.5)) == [0, 2, 3, 4, 5]
    assert _ids(data.eval_examples(source, 2, max_bad_fraction=0.5)) == [0, 2]
    with pytest.raises(ValueError, match="only 5 of 6 rows are usable"):
        data.eval_examples(source, 6, max_bad_fraction=0.5)


def test_tfds_source_decodes_to_plain_python(tmp_path):
    task = get_task("arithmetic", seed=0, num_train=12, num_test=4, max_ops=3, max_value=20)
    source = task.data_source("train", data_dir=tmp_path)
    assert isinstance(source[0]["question"], bytes)  # what tfds gives
    iterator = data.train_iterator(
        source, global_batch_size=4, seed=0, task=task, process_index=0, process_count=1
    )
    batch = next(iterator)
    json.dumps(batch)  # str/int/list only
    pickle.dumps(batch)
    example = batch[0]
    assert isinstance(example["question"], str) and isinstance(example["answer"], str)
    assert example["verifier"] == "arithmetic"
    steps = example["steps"]
    assert all(type(s) is tuple and [type(v) for v in s] == [int, str, int, int] for s in steps)
    assert steps[-1][3] == int(example["answer"])
    # Two hosts of the tfds source equal one host too.
    hosts = [
        data.train_iterator(
            source, global_batch_size=4, seed=0, task=task, process_index=h, process_count=2
        )
        for h in range(2)
    ]
    assert next(hosts[0]) + next(hosts[1]) == batch
