"""The tool demo, every seed and arm: python -m experiments.tool_arithmetic [--seeds=0,1,2]
[--out=experiments/results/tool_arithmetic] [--runs=runs/tool_arithmetic]
(rl_reason/pipelines/tool_arithmetic.py): the runs' workdirs and bases under --runs, the
aggregate summary.json and curves.png under --out."""

from absl import app, flags

from experiments.configs import tool_arithmetic as configs
from rl_reason.pipelines import tool_arithmetic

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Base-model and RL seeds.")
_OUT = flags.DEFINE_string("out", "experiments/results/tool_arithmetic", "Results directory.")
_RUNS = flags.DEFINE_string("runs", "runs/tool_arithmetic", "Workdirs of the runs and bases.")


def main(argv):
    del argv
    seeds = [int(s) for s in _SEEDS.value]
    summary = tool_arithmetic.run_arms(configs.get_config, seeds, _OUT.value, runs_dir=_RUNS.value)
    print(summary.get("accuracy_after_tool_minus_no_tool"))


if __name__ == "__main__":
    app.run(main)
