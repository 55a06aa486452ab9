"""Tests for rl_reason.infra.metrics: exact JSONL lines, TensorBoard events, progress/ETA
with a fake
clock, and plots.

TensorBoard files are decoded here with a hand-written TFRecord reader (length, crc, payload, crc)
and the Event protobuf, independent of the writer that produced them.
"""

import json
import math
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from rl_reason.infra import metrics as M


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def read_tb_scalars(tb_dir: Path) -> list[tuple[str, int, float]]:
    from tensorboardX.proto.event_pb2 import Event

    out = []
    for f in sorted(tb_dir.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            payload = data[pos + 12 : pos + 12 + length]
            pos += 12 + length + 4
            ev = Event.FromString(payload)
            for v in ev.summary.value:
                out.append((v.tag, ev.step, v.simple_value))
    return out


def test_jsonl_lines_are_exact_and_flushed_before_close(tmp_path):
    mw = M.MetricsWriter(tmp_path, tensorboard=False)
    mw.write(3, {"loss": np.float32(0.5), "n": jnp.int32(2), "bad": float("nan")})
    mw.write(4, {"kl": jnp.asarray(0.25), "inf": -math.inf, "ok": True})
    # Read while still open: a killed process would leave exactly this on disk.
    text = (tmp_path / "metrics.jsonl").read_text()
    assert text == (
        '{"step": 3, "loss": 0.5, "n": 2, "bad": null}\n'
        '{"step": 4, "kl": 0.25, "inf": null, "ok": 1}\n'
    )
    mw.close()
    # Reopening appends (a resumed run continues the file).
    with M.MetricsWriter(tmp_path, tensorboard=False) as mw2:
        mw2.write(5, {"loss": 1})
    rows = M.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 4, 5]
    assert math.isnan(rows[0]["bad"]) and math.isnan(rows[1]["inf"])
    assert rows[2] == {"step": 5, "loss": 1}


def test_write_rejects_bad_metrics(tmp_path):
    with M.MetricsWriter(tmp_path, tensorboard=False) as mw:
        with pytest.raises(ValueError, match="'v' must be a scalar"):
            mw.write(0, {"v": np.zeros(3)})
        with pytest.raises(TypeError, match="'s' must be a number"):
            mw.write(0, {"s": "high"})
        with pytest.raises(ValueError, match="'step'"):
            mw.write(0, {"step": 1})
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_tensorboard_scalars(tmp_path):
    with M.MetricsWriter(tmp_path) as mw:
        mw.write(1, {"reward": 0.5, "len": np.int64(12)})
        mw.write(2, {"reward": jnp.float32(0.75)})
    got = read_tb_scalars(tmp_path / "tb")
    assert got == [("reward", 1, 0.5), ("len", 1, 12.0), ("reward", 2, 0.75)]


def test_disabled_writer_does_nothing(tmp_path):
    workdir = tmp_path / "run"
    with M.MetricsWriter(workdir, total_steps=10, enabled=False) as mw:
        mw.write(0, {"reward": 1.0})
        assert mw.progress_line(0, {"reward": 1.0}) == ""
        mw.log_progress(0, {"reward": 1.0})
    assert not workdir.exists()


def test_progress_line_golden_with_fake_clock(tmp_path, capsys):
    clock = FakeClock()
    m = {
        "reward_mean": 0.41,
        "accuracy": np.float32(0.375),
        "response_length_mean": 31.25,
        "kl": 1e-4,
    }
    with M.MetricsWriter(tmp_path, total_steps=200, tensorboard=False, clock=clock) as mw:
        assert mw.progress_line(10, m) == "step 10/200 | reward 0.41 | acc 0.375 | len 31.2"
        clock.t = 1.5
        mw.write(11, m)
        clock.t = 2.5
        mw.write(12, m)
        clock.t = 99.0  # the same step again must not count as another interval
        mw.log_progress(12, m)
        # Intervals 1.5 s and 1.0 s -> 1.25 s/step; 188 steps left -> 235 s.
        assert capsys.readouterr().out == (
            "step 12/200 | reward 0.41 | acc 0.375 | len 31.2 | 1.25 s/step | ETA 3m55s\n"
        )
        line = mw.progress_line(12, m | {"eval_accuracy": 0.5})
        assert line == (
            "step 12/200 | reward 0.41 | acc 0.375 | len 31.2 | eval_acc 0.5 | 1.25 s/step | "
            "ETA 3m55s"
        )
        line = mw.progress_line(12, m, keys=("kl", ("reward_mean", "r")))
        assert line == "step 12/200 | kl 1.00e-04 | r 0.41 | 1.25 s/step | ETA 3m55s"


def test_step_time_per_step_window_and_restart(tmp_path):
    clock = FakeClock()
    with M.MetricsWriter(tmp_path, tensorboard=False, timing_window=2, clock=clock) as mw:
        assert mw.seconds_per_step() is None
        mw.write(0, {})
        clock.t = 30.0  # first interval: compilation
        mw.write(2, {})  # logged every 2 steps: 15 s per step
        assert mw.seconds_per_step() == 15.0
        clock.t = 32.0
        mw.write(4, {})
        clock.t = 34.0
        mw.write(6, {})
        # The window of 2 dropped the compile interval: (1 + 1) / 2.
        assert mw.seconds_per_step() == 1.0
        # No total_steps: no ETA, and fast steps are shown in ms.
        clock.t = 34.05
        mw.write(7, {})
        clock.t = 34.1
        mw.write(8, {})
        assert mw.progress_line(8, {}) == "step 8 | 50 ms/step"
        clock.t = 35.0
        mw.write(3, {})  # steps went back: a restart, timings start over
        assert mw.seconds_per_step() is None


@pytest.mark.parametrize(
    "x,want",
    [
        (0.41, "0.41"),
        (31.25, "31.2"),
        (1234.5, "1234"),
        (123456.0, "1.23e+05"),
        (0.0, "0"),
        (2e-5, "2.00e-05"),
        (-0.5, "-0.5"),
        (7, "7"),
        (float("nan"), "nan"),
    ],
)
def test_format_number(x, want):
    assert M.format_number(x) == want


@pytest.mark.parametrize(
    "s,want", [(0.4, "0s"), (42, "42s"), (231, "3m51s"), (7500, "2h05m"), (273600, "3d04h")]
)
def test_format_duration(s, want):
    assert M.format_duration(s) == want


def test_read_jsonl_truncated_tail_and_corrupt_middle(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 0, "a": 1}\n{"step": 1, "a": null}\n{"step": 2, "a"')
    with pytest.warns(UserWarning, match="truncated last line 3"):
        rows = M.read_jsonl(p)
    assert len(rows) == 2 and rows[0] == {"step": 0, "a": 1} and math.isnan(rows[1]["a"])
    p.write_text('{"step": 0}\n{"step": 1\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2 is not valid JSON"):
        M.read_jsonl(p)


def test_series_sorts_and_keeps_last_of_repeated_steps():
    rows = [
        {"step": 0, "r": 1.0},
        {"step": 1, "r": 2.0},
        {"step": 2, "x": 0},
        {"step": 1, "r": 5.0},
        {"step": 2, "r": 3.0},
    ]  # resumed from step 0
    steps, values = M.series(rows, "r")
    np.testing.assert_array_equal(steps, [0, 1, 2])
    np.testing.assert_array_equal(values, [1.0, 5.0, 3.0])


def test_plot_curves_writes_png_and_skips_absent_keys(tmp_path):
    import matplotlib.image

    with M.MetricsWriter(tmp_path, tensorboard=False) as mw:
        for s in range(5):
            mw.write(s, {"accuracy": s / 10, "reward": s / 5, "response_length": 20 + s})
    png = tmp_path / "plots" / "curves.png"
    plotted = M.plot_curves(
        tmp_path / "metrics.jsonl", png, ["accuracy", "missing", "response_length"], title="t"
    )
    assert plotted == ["accuracy", "response_length"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w = matplotlib.image.imread(png).shape[:2]
    assert (w, h) == (840, 648)  # 7.0 x (1 + 2.2 * 2) inches at 120 dpi: two subplots
    with pytest.raises(ValueError, match=r"has \['accuracy', 'response_length', 'reward'\]"):
        M.plot_curves(tmp_path / "metrics.jsonl", png, ["nope"])


def test_jsonl_is_strict_json(tmp_path):
    with M.MetricsWriter(tmp_path, tensorboard=False) as mw:
        mw.write(0, {"x": math.inf})
    line = (tmp_path / "metrics.jsonl").read_text().strip()

    def reject(c):
        raise AssertionError(f"non-standard constant {c}")

    assert json.loads(line, parse_constant=reject) == {"step": 0, "x": None}


def test_resumed_writer_drops_rows_logged_after_the_checkpoint(tmp_path):
    with M.MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in range(1, 6):
            w.write(step, {"loss": float(step)})
    # A crash mid-line leaves a cut-off row; it goes too.
    with open(tmp_path / M.JSONL_NAME, "a") as f:
        f.write('{"step": 6, "lo')
    with M.MetricsWriter(tmp_path, tensorboard=False, resume_step=3) as w:
        w.write(4, {"loss": 40.0})
    rows = M.read_jsonl(tmp_path / M.JSONL_NAME)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
