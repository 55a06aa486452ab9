"""Evaluate a recipe's policy on its held-out split (see rl_reason/pipelines/evaluate.py):

  python -m experiments.evaluate --config=experiments/configs/NAME.py --checkpoint=latest \
      [--split=test --samples=8 --num_examples=500 --out=FILE.json]

--checkpoint: a step number, latest or best (of the config's workdir), a workdir, a checkpoints
directory or one of its step directories, or a Hugging Face model directory (e.g. an export).
Prints a markdown table and writes the JSON. Multi-host flags are in rl_reason/infra/launch.py.
"""

from absl import flags
from ml_collections import config_flags

from rl_reason.infra import launch
from rl_reason.pipelines import evaluate as evaluate_run

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "recipe config file[:arg]", lock_config=True
)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "what to evaluate (see above)")
_SPLIT = flags.DEFINE_string("split", None, "held-out split (default: config.data.eval_split)")
_SAMPLES = flags.DEFINE_integer("samples", None, "k for mean@k/pass@k/maj@k (default: config)")
_NUM = flags.DEFINE_integer("num_examples", None, "first N examples (default: config; 0: all)")
_OUT = flags.DEFINE_string("out", None, "result JSON (default: WORKDIR/eval/NAME_SPLIT.json)")


def main(argv):
    del argv
    launch.start()
    result = evaluate_run.evaluate(
        _CONFIG.value,
        _CHECKPOINT.value,
        split=_SPLIT.value,
        samples=_SAMPLES.value,
        num_examples=_NUM.value,
        out=_OUT.value,
    )
    if "written_to" in result:
        print(evaluate_run.markdown(result), flush=True)
        print(f"wrote {result['written_to']}", flush=True)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "checkpoint"])
    launch.run_app(main)
