"""What every pipeline's `run(config)` sets up around its own subject, written once.

    ctx = RunContext.start(config)  # plugins, clock, workdir, echo, metrics options, mesh
    grpo_cfg = ...
    checkpointer = ctx.make_checkpointer(grpo_cfg)
    ... the pipeline's own set-up (skipping costly parts when ctx.resuming) ...
    with ctx.preemptible() as guard:
        result = ctx.run_grpo(grpo_cfg, graphdef=..., params=..., tokenizer=..., task=..., ...)
    ctx.write_summary(summary, curves=CURVES, title="...", table="...")

Only process 0 echoes and writes the summary and the plot; every process takes part in
everything else (the mesh, the checkpoints and the GRPO stage are collective).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from rl_reason import plugins
from rl_reason.infra import sharding
from rl_reason.infra.checkpoint import Checkpointer
from rl_reason.infra.metrics import MetricsConfig, plot_curves
from rl_reason.infra.preemption import PreemptionGuard
from rl_reason.pipelines import grpo_stage, options
from rl_reason.trainer import GRPOConfig

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"

# A checkpointer of None is a real choice (grpo.checkpoint_every = 0), so "not made yet" needs
# its own marker: running GRPO before make_checkpointer is a mistake, not a run without saves.
_NOT_MADE: Any = object()


def _print(msg: str) -> None:
    print(msg, flush=True)


def _silent(msg: str) -> None:
    del msg


def _config_workdir(config) -> Path:
    return Path(config.workdir)


@dataclasses.dataclass
class RunContext:
    """One run's workdir, mesh, metrics options, checkpointer and preemption guard."""

    config: Any
    workdir: Path | None  # None: the run writes no workdir (e.g. stage 1 alone)
    metrics: MetricsConfig | None  # None without a workdir: metrics are written there
    mesh: Mesh
    is_main: bool
    echo: Callable[[str], None]
    started: float  # time.perf_counter() when the run started
    checkpointer: Checkpointer | None = _NOT_MADE
    guard: PreemptionGuard | None = None

    @classmethod
    def start(
        cls,
        config,
        *,
        workdir: Callable[[Any], Path] | None = _config_workdir,
        one_process: str = "",
    ) -> RunContext:
        """Load config.plugins, start the clock, make the workdir and the mesh.

        `workdir` maps the config to the run's directory (default config.workdir; None for a
        run that writes none). `one_process`, if set, is the error raised when the run was
        started in several processes.
        """
        plugins.load_from(config)  # before anything checks a registered name
        started = time.perf_counter()
        options.check(config)  # every bad option at once, before any data, model or compile
        if one_process and jax.process_count() > 1:
            raise ValueError(one_process)
        path, metrics = None, None
        if workdir is not None:
            path = workdir(config)
            path.mkdir(parents=True, exist_ok=True)
            metrics = grpo_stage.config_from(MetricsConfig, config.metrics)
        mesh = sharding.make_mesh(grpo_stage.config_from(sharding.MeshConfig, config.mesh))
        is_main = jax.process_index() == 0
        # Every process runs the same lines; one copy of each is enough.
        echo = _print if is_main else _silent
        return cls(config, path, metrics, mesh, is_main, echo, started)

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.started

    def make_checkpointer(self, cfg: GRPOConfig) -> Checkpointer | None:
        """The GRPO stage's checkpointer in workdir/checkpoints (None when cfg saves none)."""
        self.checkpointer = grpo_stage.make_checkpointer(self._workdir(), cfg)
        return self.checkpointer

    @property
    def resuming(self) -> bool:
        """Whether the checkpoints hold a step, so the GRPO stage continues from it."""
        return grpo_stage.is_resuming(self._checkpointer())

    @contextlib.contextmanager
    def preemptible(self) -> Iterator[PreemptionGuard]:
        """A PreemptionGuard around the block; `run_grpo` inside it stops at a step boundary."""
        with PreemptionGuard() as guard:
            self.guard = guard
            try:
                yield guard
            finally:
                self.guard = None

    def run_grpo(self, cfg: GRPOConfig, **stage: Any) -> dict[str, Any]:
        """`grpo_stage.run_grpo` with this run's workdir, mesh, checkpointer, guard, metrics
        options, configuration and echo; `stage` is the rest of its arguments."""
        if self.guard is None:
            raise RuntimeError("call run_grpo inside `with ctx.preemptible():`")
        return grpo_stage.run_grpo(
            cfg,
            metrics_cfg=self.metrics,
            run_config=self.config.to_dict(),
            workdir=self._workdir(),
            mesh=self.mesh,
            checkpointer=self._checkpointer(),
            guard=self.guard,
            echo=self.echo,
            **stage,
        )

    def write_summary(
        self,
        summary: Mapping[str, Any],
        *,
        curves: Sequence[str],
        title: str,
        table: str | None = None,
    ) -> None:
        """On process 0: workdir/summary.json, the `curves` of metrics.jsonl plotted into
        curves.png, then `table` echoed."""
        if not self.is_main:
            return
        workdir = self._workdir()
        (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        plot_curves(workdir / METRICS_FILE, workdir / CURVES_FILE, curves, title=title)
        if table is not None:
            self.echo(table)

    def _workdir(self) -> Path:
        if self.workdir is None:
            raise RuntimeError("this run was started without a workdir (RunContext.start)")
        return self.workdir

    def _checkpointer(self) -> Checkpointer | None:
        if self.checkpointer is _NOT_MADE:
            raise RuntimeError("call ctx.make_checkpointer(grpo_cfg) before the GRPO stage")
        return self.checkpointer
