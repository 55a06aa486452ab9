"""A config's ``plugins``: user modules whose registrations reach the config's checks, the
update and the verifier pool's worker processes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rl_reason import losses, plugins, verifiers

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "tests.plugin_example"


@pytest.fixture
def clean_plugins():
    # Registrations and worker imports are process-wide; later tests must not see these.
    estimators = dict(losses.ADVANTAGE_ESTIMATORS)
    registered = dict(verifiers._REGISTRY)
    imports = list(verifiers._WORKER_IMPORTS)
    yield
    losses.ADVANTAGE_ESTIMATORS.clear()
    losses.ADVANTAGE_ESTIMATORS.update(estimators)
    verifiers._REGISTRY.clear()
    verifiers._REGISTRY.update(registered)
    verifiers._WORKER_IMPORTS[:] = imports
    sys.modules.pop(PLUGIN, None)


def test_a_plugin_verifier_runs_in_the_pool_workers(clean_plugins):
    assert plugins.load([PLUGIN]) == [PLUGIN]
    assert "ends_with_gold" in verifiers.names() and "plugin_zero" in losses.ADVANTAGE_ESTIMATORS
    items = [
        ("ends_with_gold", "so it is 42", {"answer": 42}),
        ("ends_with_gold", "42 is not it", {"answer": 42}),
    ]
    with verifiers.VerifierPool(1, timeout_s=60.0) as pool:
        got = pool.submit(items).result(timeout=120)
    # Had the worker not imported the plugin, both items would fail with "unknown verifier".
    assert [(r.correct, r.reason) for r in got] == [
        (True, "ends with the gold"),
        (False, "does not end with it"),
    ]


def test_a_module_that_cannot_be_imported_is_named(clean_plugins):
    with pytest.raises(ValueError, match=r"config.plugins: cannot import 'no_such_lab.estimators'"):
        plugins.load(["no_such_lab.estimators"])


@pytest.mark.slow
def test_a_plugin_estimator_from_the_command_line_drives_the_update(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "experiments.train",
        "--config=experiments/configs/r1_zero_tiny.py:smoke",
        f"--config.plugins=('{PLUGIN}',)",
        "--config.grpo.loss.advantage_estimator=plugin_zero",
        "--config.grpo.steps=1",
        "--config.data.eval_size=4",
        f"--config.workdir={tmp_path}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Rewards varied, yet the plugin's all-zero advantages leave nothing to follow.
    assert row["reward_std"] > 0 and row["grad_norm"] == 0


def test_load_from_a_config(clean_plugins):
    import ml_collections

    assert plugins.load_from(ml_collections.ConfigDict({"workdir": "x"})) == []
    config = ml_collections.ConfigDict({"plugins": (PLUGIN,)})
    assert plugins.load_from(config) == [PLUGIN] and "plugin_zero" in losses.ADVANTAGE_ESTIMATORS
