"""Tests for the optional Weights & Biases sink of rl_reason.infra.metrics, in wandb's offline mode.

The run's ``.wandb`` transaction log is decoded here with a hand-written reader of its LevelDB
log format (a 7-byte file header, then 32 KiB blocks of crc32 / length / type chunks holding
``wandb_internal.Record`` protobufs), independent of the wandb code that wrote it.
"""

import json
import math
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from rl_reason.infra import metrics as M

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list:
    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:_HEADER]) == (b":W&B", 0xBEE1, 0)
    records, pos, parts = [], _HEADER, []
    while pos < len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # too short for a chunk header: zero padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        assert len(chunk) == length, "truncated chunk"
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad crc at {pos}"
        pos += _HEADER + length
        assert (kind in (_FULL, _FIRST)) == (not parts), f"chunk type {kind} out of order"
        parts.append(chunk)
        if kind in (_FULL, _LAST):
            records.append(wandb_internal_pb2.Record.FromString(b"".join(parts)))
            parts = []
    assert not parts, "file ends inside a record"
    return records


def of_type(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def history(records: list) -> dict[int, dict]:
    """{step: {key: value}} of the logged metrics, without wandb's own ``_step`` etc."""
    rows = {}
    for h in of_type(records, "history"):
        row = {}
        for item in h.item:
            key = item.key or "/".join(item.nested_key)
            if not key.startswith("_"):
                row[key] = json.loads(item.value_json)
        assert h.step.num not in rows, f"step {h.step.num} logged twice"
        rows[h.step.num] = row
    return rows


def flush_wandb() -> None:
    """Wait until the closed runs' .wandb files are complete on disk.

    ``run.finish()`` returns before wandb's service process has written the run's buffered
    records (the file can still hold only its header then); shutting the service down waits
    for that. The next run starts a new service.
    """
    wandb.teardown()


def offline_runs(workdir: Path) -> set[Path]:
    return set((workdir / "wandb").glob("offline-run-*"))


def only_run_file(run_dir: Path) -> Path:
    (f,) = run_dir.glob("run-*.wandb")
    return f


@pytest.fixture(scope="module")
def wandb_env(tmp_path_factory):
    """Offline, silent wandb with its per-user files under a temporary directory."""
    home = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_ERROR_REPORTING", "false")
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(var, str(home / var.lower()))
        for var in ("WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_NAME"):
            mp.delenv(var, raising=False)
        yield home
        wandb.teardown()  # the service process outlives finished runs


@pytest.fixture(scope="module")
def logged_run(wandb_env, tmp_path_factory):
    """A workdir with one offline wandb run of three steps; its .wandb file."""
    workdir = tmp_path_factory.mktemp("run")
    options = M.MetricsConfig(wandb=True, wandb_project="p", wandb_run_name="r")
    with M.MetricsWriter(
        workdir, tensorboard=False, options=options, run_config={"lr": 1e-3, "steps": 3}
    ) as mw:
        mw.write(1, {"reward": 0.25, "n": np.int64(7)})
        mw.write(2, {"reward": np.float32(0.5), "kl": float("nan")})
        mw.write(3, {"reward": 0.75, "ok": True})
    flush_wandb()
    (run_dir,) = offline_runs(workdir)
    return workdir, only_run_file(run_dir)


def test_offline_run_holds_every_scalar_at_its_step(logged_run):
    workdir, run_file = logged_run
    run_id = (workdir / M.WANDB_RUN_ID_NAME).read_text().strip()
    assert run_file.parent.name.endswith(f"-{run_id}") and run_file.name == f"run-{run_id}.wandb"

    records = read_wandb_records(run_file)
    rows = history(records)
    assert rows.keys() == {1, 2, 3}
    assert rows[1] == {"reward": 0.25, "n": 7}
    kl = rows[2].pop("kl")
    assert math.isnan(kl) and rows[2] == {"reward": 0.5}
    assert rows[3] == {"reward": 0.75, "ok": 1}

    (run,) = of_type(records, "run")
    assert (run.run_id, run.project, run.display_name) == (run_id, "p", "r")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["lr"] == 1e-3 and config["steps"] == 3
    (exit_record,) = of_type(records, "exit")
    assert exit_record.exit_code == 0

    # The JSONL is exactly what it is without wandb.
    assert (workdir / M.JSONL_NAME).read_text() == (
        '{"step": 1, "reward": 0.25, "n": 7}\n'
        '{"step": 2, "reward": 0.5, "kl": null}\n'
        '{"step": 3, "reward": 0.75, "ok": 1}\n'
    )


def test_resumed_workdir_continues_the_same_run_and_marks_a_crash_failed(logged_run):
    workdir, _ = logged_run
    id_file = workdir / M.WANDB_RUN_ID_NAME
    run_id = id_file.read_text()
    before = offline_runs(workdir)
    options = M.MetricsConfig(wandb=True, wandb_project="p")
    with pytest.raises(RuntimeError, match="boom"):
        with M.MetricsWriter(workdir, tensorboard=False, options=options, resume_step=2) as mw:
            mw.write(3, {"reward": 0.125})
            raise RuntimeError("boom")
    flush_wandb()
    assert id_file.read_text() == run_id
    (run_dir,) = offline_runs(workdir) - before
    records = read_wandb_records(only_run_file(run_dir))
    (run,) = of_type(records, "run")
    assert run.run_id == run_id.strip()
    assert history(records) == {3: {"reward": 0.125}}
    (exit_record,) = of_type(records, "exit")
    assert exit_record.exit_code == 1
    rows = M.read_jsonl(workdir / M.JSONL_NAME)
    assert [(r["step"], r["reward"]) for r in rows] == [(1, 0.25), (2, 0.5), (3, 0.125)]


def test_invalid_wandb_mode_is_rejected():
    with pytest.raises(ValueError, match=r"MetricsConfig\.wandb_mode .* got 'offlin'"):
        M.MetricsConfig(wandb=True, wandb_mode="offlin")
    for mode in ("", "online", "offline", "disabled"):
        assert M.MetricsConfig(wandb_mode=mode).wandb_mode == mode


def test_without_wandb_nothing_of_it_is_created(tmp_path, monkeypatch):
    def no_init(*args, **kwargs):
        raise AssertionError("wandb.init called")

    monkeypatch.setattr(wandb, "init", no_init)
    with M.MetricsWriter(tmp_path / "off", tensorboard=False, options=M.MetricsConfig()) as mw:
        mw.write(0, {"reward": 1.0})
    with M.MetricsWriter(tmp_path / "default", tensorboard=False) as mw:
        mw.write(0, {"reward": 1.0})
    for name in ("off", "default"):
        assert [p.name for p in (tmp_path / name).iterdir()] == [M.JSONL_NAME]
    # Processes other than the writer's do not start a run either.
    on = M.MetricsConfig(wandb=True)
    with M.MetricsWriter(tmp_path / "other", enabled=False, options=on) as mw:
        mw.write(0, {"reward": 1.0})
    assert not (tmp_path / "other").exists()


def test_missing_wandb_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[wandb\]"'):
        M.MetricsWriter(tmp_path, tensorboard=False, options=M.MetricsConfig(wandb=True))
