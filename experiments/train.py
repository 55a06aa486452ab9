"""Run any experiment config: python -m experiments.train --config=experiments/configs/NAME.py"""

from absl import app, flags
from ml_collections import config_flags

from rl_reason import r1_zero

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file[:arg]", lock_config=True
)


def main(argv):
    del argv
    r1_zero.configure_logging()
    r1_zero.run(_CONFIG.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
