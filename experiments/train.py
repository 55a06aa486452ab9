"""Run any experiment config: python -m experiments.train --config=experiments/configs/NAME.py

Any field can be overridden (`--config.grpo.loss.kl_coef=0.01`); multi-host flags are in
rl_reason/infra/launch.py.
"""

from absl import flags
from ml_collections import config_flags

from rl_reason.infra import launch

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file[:arg]", lock_config=True
)


def main(argv):
    del argv
    launch.main(_CONFIG.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    launch.run_app(main)
