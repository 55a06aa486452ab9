"""Export a recipe checkpoint's policy (LoRA merged) as a Hugging Face model directory:

  python -m experiments.export --config=experiments/configs/NAME.py --checkpoint=latest \
      [--out=DIR]

--checkpoint as for experiments.evaluate (a step, latest, best, or a checkpoints path); the
output (default WORKDIR/export_step_N) holds config.json, safetensors and the tokenizer files,
and loads with models.from_pretrained or transformers' AutoModelForCausalLM.
"""

from absl import flags
from ml_collections import config_flags

from rl_reason.infra import launch
from rl_reason.pipelines import evaluate as evaluate_run

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "recipe config file[:arg]", lock_config=True
)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "the checkpoint to export")
_OUT = flags.DEFINE_string("out", None, "output directory (default: WORKDIR/export_step_N)")


def main(argv):
    del argv
    launch.start()
    out = evaluate_run.export(_CONFIG.value, _CHECKPOINT.value, _OUT.value)
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "checkpoint"])
    launch.run_app(main)
