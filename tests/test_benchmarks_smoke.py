"""Each benchmark's --smoke mode runs end to end and writes a well-formed record.

These are not speed tests (nothing here asserts a time): they keep the benchmark scripts from
rotting as the code they measure changes. Each runs in its own process, as a user would; the
ones that compile a model and import torch take 20-40 s on two cores, hence `slow`.
"""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module: str, tmp_path, *flags: str) -> dict:
    out = tmp_path / f"{module.rsplit('.', 1)[-1]}.json"
    proc = subprocess.run(
        [sys.executable, "-m", module, "--smoke", f"--json={out}", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _positive(*values) -> bool:
    return all(isinstance(v, float | int) and math.isfinite(v) and v > 0 for v in values)


def test_roofline_smoke(tmp_path):
    roof = _run("benchmarks.roofline", tmp_path)["roofline"]
    assert _positive(
        roof["matmul_f32_flops_per_s"],
        roof["matmul_bf16_flops_per_s"],
        roof["read_bytes_per_s"],
        roof["update_bytes_per_s"],
    )


@pytest.mark.slow
@pytest.mark.ref
def test_sampling_smoke(tmp_path):
    pytest.importorskip("transformers")
    # One torch thread: on a loaded machine torch's default threads spin-wait on each other
    # through every generate step (seconds of CPU); the timing code is the same either way.
    rec = _run("benchmarks.sampling", tmp_path, "--nohf_one_thread", "--torch_threads=1")
    assert rec["smoke"] and rec["max_logit_diff_vs_hf"] < 1e-3
    assert _positive(rec["ours_tokens_per_s"], rec["hf_tokens_per_s"], rec["ratio"])
    assert _positive(rec["prefill_seconds_ours"], rec["prefill_seconds_hf"])
    assert 0 < rec["roofline_fraction"] and _positive(rec["work"]["decode_flops"])
    assert rec["settings"]["batch"] * rec["settings"]["new_tokens"] == 32
    assert "load_average_1_5_15" in rec["environment"]


@pytest.mark.slow
@pytest.mark.ref
def test_train_step_smoke(tmp_path):
    pytest.importorskip("transformers")
    rec = _run("benchmarks.train_step", tmp_path)
    assert _positive(rec["ours_tokens_per_s"], rec["torch_tokens_per_s"], rec["ours_mfu"])
    # The run refuses to time two sides that disagree; the record shows how close they were.
    for ours, theirs in rec["first_step_agreement"].values():
        assert math.isclose(ours, theirs, rel_tol=2e-3, abs_tol=2e-3)


@pytest.mark.slow
def test_rl_step_smoke(tmp_path):
    rec = _run("benchmarks.rl_step", tmp_path, "--workers=1")
    parts = rec["breakdown"]
    assert _positive(parts["step_s"], parts["sample_device_s"], parts["train_device_s"])
    assert 0 <= parts["outside_fraction"] <= 1
    assert parts["verify_hidden_s"] <= parts["verify_s"] + 1e-9


@pytest.mark.slow
def test_rollout_smoke(tmp_path):
    rec = _run("benchmarks.rollout", tmp_path)
    assert rec["smoke"] and rec["engine_slots"] == 4
    for case in rec["cases"].values():
        # Both samplers' log-probs of their own tokens were checked against a forward pass.
        assert max(case["max_logprob_gap_vs_forward"].values()) < 1e-4
        assert _positive(case["static_tokens_per_s"], case["engine_tokens_per_s"], case["ratio"])
        assert 0 < case["slot_occupancy"] <= 1
    assert rec["uniform_slot_occupancy"] == 1.0 and rec["p99_over_median"] >= 1
    assert _positive(rec["partial_tokens_per_s"], rec["partial_ratio"])
    assert 0 < rec["partial_slot_occupancy"] <= 1


def test_rollout_multi_turn_smoke(tmp_path):
    rec = _run("benchmarks.rollout", tmp_path, "--multi_turn")
    assert rec["smoke"] and rec["benchmark"] == "rollout_multi_turn"
    assert _positive(rec["cached_tokens_per_s"], rec["reprefill_tokens_per_s"], rec["ratio"])
    # The cached path's log-probs of the policy's own tokens match a whole forward pass.
    assert rec["policy_logprob_gap_vs_forward"] < 1e-4 and rec["tool_calls_mean"] > 0
