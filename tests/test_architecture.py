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


def test_models_load_nothing_of_rl_reason():
    assert not {m for m in _loaded("models") if m.split(".")[0] == "rl_reason"}


def test_entry_points_are_short():
    # The logic lives in rl_reason/; an entry point parses flags and calls it.
    long = {
        p.name: n
        for p in (ROOT / "experiments").glob("*.py")
        if (n := len(p.read_text().splitlines())) > 60
    }
    assert not long, long


def _module_imports(path: Path) -> list[str]:
    """The module-level imports of a file (imports inside functions are deliberate late binding),
    each as `pkg.mod` and `pkg.mod.name` for a from-import."""
    import ast

    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_no_import_cycle_between_subpackages():
    graph: dict[str, set[str]] = {}
    for path in (ROOT / "rl_reason").rglob("*.py"):
        unit = path.relative_to(ROOT / "rl_reason").parts[0].removesuffix(".py")
        for name in _module_imports(path):
            parts = name.split(".")
            if parts[0] == "rl_reason" and len(parts) > 1 and parts[1] != unit:
                if (ROOT / "rl_reason" / parts[1]).is_dir():
                    graph.setdefault(unit, set()).add(parts[1])
    subpackages = {p.name for p in (ROOT / "rl_reason").iterdir() if (p / "__init__.py").exists()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(p for p in subpackages if reaches(p, p, {p}))
    assert not cycles, {p: sorted(graph.get(p, ())) for p in cycles}


# Lower layers first; a module imports (at module level) only its own layer or those before it.
LAYERS = (
    ("verifiers",),
    ("tasks",),
    ("infra", "plugins"),
    ("core", "losses"),
    ("rollout",),
    ("trainer",),
    ("pipelines",),
)


def test_each_layer_imports_only_the_layers_below_it():
    rank = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
    package = ROOT / "rl_reason"
    units = {p.name.removesuffix(".py") for p in package.iterdir() if p.name != "__init__.py"}
    units = {u for u in units if not u.startswith(("_", "."))}
    assert units <= set(rank), f"place {sorted(units - set(rank))} in LAYERS"
    upward = []
    for path in package.rglob("*.py"):
        unit = path.relative_to(package).parts[0].removesuffix(".py")
        if unit not in rank:
            continue
        for name in _module_imports(path):
            parts = name.split(".")
            if parts[0] == "rl_reason" and len(parts) > 1 and parts[1] in rank:
                if rank[parts[1]] > rank[unit]:
                    upward.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not upward, sorted(set(upward))
