"""What every experiment entry point does: multi-host start-up, logging, and the pipeline.

`experiments/*.py` define their `--config` flag and call `main(config)`. The flags below start
JAX's multi-controller runtime when a run spans several hosts:

  TPU VM slice   nothing to pass: every worker runs the same command and the topology is read
                 from the TPU environment (`gcloud ... tpu-vm ssh --worker=all --command=...`)
  GPU hosts      --coordinator_address=HOST0:PORT --num_processes=N --process_id=I on each
                 host (one process per host, all its GPUs; or SLURM, detected)
  one host       nothing

A config names its pipeline in `config.pipeline` (see PIPELINES).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from absl import flags

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for jax.distributed (multi-host GPUs)"
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "JAX processes in the run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index in [0, N)")

# config.pipeline -> "module:function" running it (imported lazily: after jax.distributed).
PIPELINES = {
    "r1_zero": "rl_reason.pipelines.r1_zero:run",
    "pretrain_base": "rl_reason.pipelines.base_model:run",
    "recipe": "rl_reason.pipelines.recipe:run",
    "research": "rl_reason.pipelines.research.pipeline:run",
    "tool_arithmetic": "rl_reason.pipelines.tool_arithmetic:run",
}


def configure_logging() -> None:
    """Progress lines are printed; library INFO chatter (orbax saves) is hidden unless asked."""
    from absl import logging as absl_logging

    level = os.environ.get("RL_REASON_LOGLEVEL", "WARNING")
    absl_logging.set_verbosity(level.lower())
    logging.getLogger().setLevel(level)


def pipeline(name: str):
    if name not in PIPELINES:
        raise ValueError(f"config.pipeline={name!r} is not one of {sorted(PIPELINES)}")
    module, fn = PIPELINES[name].split(":")
    return getattr(importlib.import_module(module), fn)


def start() -> tuple[int, int]:
    """Logging, then JAX's runtime from the multi-host flags or the TPU environment; returns
    (process_index, process_count). Call before anything touches the devices."""
    from rl_reason.infra import sharding

    configure_logging()
    return sharding.initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    )


def run_app(main) -> None:
    """absl's app.run, after a check of the command line's config overrides: an option that
    moved (--config.grpo.kl_coef, now --config.grpo.loss.kl_coef) would otherwise end in a bare
    AttributeError from inside flag parsing."""
    from absl import app

    from rl_reason.core.config import moved_name

    for arg in sys.argv[1:]:
        name = arg.split("=", 1)[0].lstrip("-")
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "config":
            new = moved_name(parts[1], parts[2])
            if new is not None:
                raise SystemExit(f"--{name} is now --config.{new} (the options are nested)")
    app.run(main)


def main(config):
    """Start the runtime, then run the config's pipeline."""
    from rl_reason.pipelines.options import OptionsError

    run = pipeline(config.pipeline)
    start()
    try:
        return run(config)
    except OptionsError as e:
        # The user's mistake, stated in full: a traceback into the checks adds nothing.
        raise SystemExit(f"error: {e}") from None
