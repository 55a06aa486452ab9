"""The layering rules that can be checked by importing: what a module loads, transitively.

Each import runs in a fresh interpreter, so nothing another test imported counts.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("flax", "optax", "orbax", "tensorflow", "tensorflow_datasets", "grain", "torch")


def _loaded(module: str) -> set[str]:
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.splitlines()[-1]))


def _tops(mods: set[str]) -> set[str]:
    return {m.split(".")[0] for m in mods}


@pytest.mark.parametrize("module", ["rl_reason.losses", "rl_reason.core.objectives"])
def test_the_objective_loads_only_jax(module):
    mods = _loaded(module)
    assert not _tops(mods) & set(HEAVY), sorted(_tops(mods) & set(HEAVY))
    ours = {m for m in mods if m.split(".")[0] in ("rl_reason", "models")}
    assert all(
        m in ("rl_reason", "rl_reason.losses") or m.startswith("rl_reason.core") for m in ours
    )


def test_the_verifiers_load_no_jax_and_no_tasks():
    mods = _loaded("rl_reason.verifiers")
    assert not _tops(mods) & {"jax", "jaxlib", "flax", *HEAVY}
    # The tasks sit above the verifiers (their registry names verifiers), never below.
    assert not {m for m in mods if m.startswith("rl_reason.tasks")}
