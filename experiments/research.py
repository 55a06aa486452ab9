"""Run research experiments' sweeps (one process per arm and seed) and summarise them.

  python -m experiments.research --config=experiments/configs/research_supervision.py
  python -m experiments.research --all                      # every experiment, seed by seed
  python -m experiments.research --all --summarize_only     # tables and plots from the runs
  python -m experiments.research --config=...py:smoke --seeds=0 --runs_root=/tmp/r  # quick

Summaries go to experiments/results/<experiment>/, runs to runs/research/ (one directory per
distinct arm and seed), each finished run's record to experiments/results/runs/ (committed).
Points already run or recorded are skipped, so a stopped campaign continues, here or on a
fresh checkout (rl_reason/pipelines/research/sweep.py).
"""

from pathlib import Path

from absl import app, flags

from rl_reason.infra import launch
from rl_reason.pipelines.research import summary, sweep

CONFIG_DIR = Path(__file__).parent / "configs"

_CONFIG = flags.DEFINE_string("config", None, "experiment config file[:arg]")
_ALL = flags.DEFINE_bool("all", False, f"every experiment: {', '.join(sweep.EXPERIMENTS)}")
_SEEDS = flags.DEFINE_list("seeds", None, "only these seeds (default: the sweep's)")
_ARMS = flags.DEFINE_list("arms", None, "only these arm labels (default: every arm)")
_RUNS_ROOT = flags.DEFINE_string("runs_root", None, "override config.runs_root")
_RESULTS = flags.DEFINE_string("results_root", "experiments/results", "where summaries go")
_RECORDS = flags.DEFINE_string("records", None, "run records (default: <results_root>/runs)")
_SUMMARIZE_ONLY = flags.DEFINE_bool("summarize_only", False, "only regenerate tables/plots")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print the commands, run nothing")


def main(argv):
    del argv
    try:
        exps = sweep.select_experiments(_CONFIG.value, _ALL.value, _RUNS_ROOT.value, CONFIG_DIR)
        if _ARMS.value is not None:
            sweep.check_arms(exps, _ARMS.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    seeds = None if _SEEDS.value is None else [int(s) for s in _SEEDS.value]
    records = Path(_RECORDS.value or Path(_RESULTS.value) / "runs")
    if not _SUMMARIZE_ONLY.value:
        results = sweep.run_sweep(
            exps, seeds=seeds, dry_run=_DRY_RUN.value, records=records, arms=_ARMS.value
        )
        for p in [p for p, status in results if status.startswith("failed")]:
            print(f"FAILED: {p.label} seed {p.seed}: {p.workdir}/run.log")
    if _DRY_RUN.value:
        return
    for exp in exps:
        out = Path(_RESULTS.value) / (exp.name + ("_" + exp.arg if exp.arg else ""))
        summary.summarize(exp, out, seeds, records)
        print(f"wrote {out}/results.md")
        print((out / "results.md").read_text())


if __name__ == "__main__":
    launch.run_app(main)
