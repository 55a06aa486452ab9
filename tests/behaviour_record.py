"""A fingerprint of what the code computes, to show that a refactor changed no number.

    python -m tests.behaviour_record OUT.json            # record
    python -m tests.behaviour_record OUT.json --compare BEFORE.json

Runs seeded smoke runs as a user would (`python -m experiments.train`, each in its own process
and fresh workdir) and records every per-step metric except wall-clock timings, and a SHA-256
of every array of each run's final checkpoint (params and optimizer state):

  default     the default experiment's smoke config (stage 1 from scratch, then GRPO)
  off_policy  the same with one-step-off-policy pipelining
  recipe      the countdown recipe's smoke config (a tiny Qwen2-layout model)
  engine      the default run sampling with the continuous-batching engine (a slot a sample)
  engine_refilled   ... with 8 slots, refilled as samples finish
  resumed     the default run's workdir without its last checkpoint, continued from there

The hashes are exact for one machine type and library versions; compare records made on the
same machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("time_", "generated_tokens_per_s")
DEFAULT = "experiments/configs/r1_zero_tiny.py:smoke"
RUNS = {
    "default": [f"--config={DEFAULT}"],
    "off_policy": [f"--config={DEFAULT}", "--config.grpo.off_policy_steps=1"],
    "recipe": ["--config=experiments/configs/countdown_qwen2_5_3b.py:smoke"],
    "engine": [f"--config={DEFAULT}", "--config.grpo.sampling.engine=continuous"],
    "engine_refilled": [
        f"--config={DEFAULT}",
        "--config.grpo.sampling.engine=continuous",
        "--config.grpo.sampling.engine_slots=8",
    ],
}


def _train(workdir: Path, flags: list[str]) -> None:
    cmd = [sys.executable, "-m", "experiments.train", *flags, f"--config.workdir={workdir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def _fingerprint(workdir: Path) -> dict:
    import numpy as np
    import orbax.checkpoint as ocp

    from rl_reason.infra.metrics import read_jsonl

    rows = read_jsonl(workdir / "metrics.jsonl")
    metrics = [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]
    last = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    with ocp.PyTreeCheckpointer() as ckpt:
        tree = ckpt.restore(workdir / "checkpoints" / str(last) / "state")
    leaves = ocp.tree.to_flat_dict(tree, sep="/")
    arrays = {
        k: hashlib.sha256(np.ascontiguousarray(np.asarray(v)).tobytes()).hexdigest()
        for k, v in sorted(leaves.items())
    }
    return {"checkpoint_step": last, "metrics": metrics, "arrays": arrays}


def record() -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in RUNS.items():
            workdir = Path(tmp) / name
            _train(workdir, [*flags, "--config.grpo.checkpoint_every=1"])
            out[name] = _fingerprint(workdir)
        # As if killed once step 2's checkpoint was written: a copy of the default run without
        # its last checkpoint continues from step 2.
        workdir = Path(tmp) / "resumed"
        shutil.copytree(Path(tmp) / "default", workdir)
        last = out["default"]["checkpoint_step"]
        shutil.rmtree(workdir / "checkpoints" / str(last))
        _train(workdir, [*RUNS["default"], "--config.grpo.checkpoint_every=1"])
        out["resumed"] = _fingerprint(workdir)
    return out


def compare(got: dict, want: dict) -> tuple[list[str], list[str]]:
    """(differences, metrics only the new record has). A metric added since BEFORE is not a
    difference in what was computed; a changed or missing value is."""
    diffs, added = [], set()
    for run in sorted(set(got) | set(want)):
        a, b = got.get(run), want.get(run)
        if a is None or b is None:
            diffs.append(f"{run}: only in {'the record' if b is None else 'BEFORE'}")
            continue
        if len(a["metrics"]) != len(b["metrics"]):
            diffs.append(f"{run}: {len(a['metrics'])} steps, BEFORE has {len(b['metrics'])}")
        for step, (new, old) in enumerate(zip(a["metrics"], b["metrics"], strict=False), 1):
            added |= set(new) - set(old)
            changed = sorted(k for k in old if new.get(k, "missing") != old[k])
            if changed:
                diffs.append(f"{run}: step {step} metrics differ: {changed}")
        for key in sorted(set(a["arrays"]) | set(b["arrays"])):
            if a["arrays"].get(key) != b["arrays"].get(key):
                diffs.append(f"{run}: {key} differs")
    return diffs, sorted(added)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--compare", help="an earlier record; exit 1 on any difference")
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    rec = record()
    Path(args.out).write_text(json.dumps(rec, indent=1, sort_keys=True))
    print(
        f"wrote {args.out}: "
        + ", ".join(f"{k} ({len(v['metrics'])} steps)" for k, v in rec.items())
    )
    if args.compare:
        diffs, added = compare(rec, json.loads(Path(args.compare).read_text()))
        print("\n".join(diffs) if diffs else "identical: every metric and every array")
        if added:
            print(f"metrics new since BEFORE (not compared): {added}")
        sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
