"""The default demo: python -m experiments.r1_zero_tiny [--config.grpo.steps=...]"""

import os

from ml_collections import config_flags

from rl_reason.infra import launch

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "configs", "r1_zero_tiny.py"),
    "experiment config file[:arg]",
    lock_config=True,
)


def main(argv):
    del argv
    launch.main(_CONFIG.value)


if __name__ == "__main__":
    launch.run_app(main)
