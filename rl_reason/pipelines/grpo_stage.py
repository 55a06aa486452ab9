"""The resumable GRPO stage every pipeline shares: evaluate, train, evaluate, with checkpoints.

    checkpointer = make_checkpointer(workdir, grpo_cfg)
    resuming = is_resuming(checkpointer)
    ... build tokenizer / model / task / data (skip costly set-up when resuming) ...
    with PreemptionGuard() as guard:
        result = run_grpo(grpo_cfg, workdir=..., graphdef=..., params=..., ..., guard=guard,
                          carry={"stage1": {...}})
    result["preempted"], result["before"], result["after"], result["carry"], ...

A workdir whose checkpoints directory holds a step resumes from the newest readable one: the
trainer restores params, optimizer state, key, counters and the data position; the "before"
evaluation and anything in `carry` come back from the checkpoint's meta.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from rl_reason import verifiers
from rl_reason.core.config import config_from  # noqa: F401  (the pipelines' import path)
from rl_reason.infra.checkpoint import Checkpointer
from rl_reason.infra.metrics import MetricsConfig, MetricsWriter
from rl_reason.trainer import GRPOConfig, GRPOTrainer

log = logging.getLogger(__name__)


def make_checkpointer(workdir: str | Path, cfg: GRPOConfig) -> Checkpointer | None:
    if not cfg.checkpoint_every:
        return None
    return Checkpointer(
        Path(workdir) / "checkpoints",
        save_every=cfg.checkpoint_every,
        max_to_keep=cfg.checkpoint_keep,
        best_metric="eval_accuracy" if cfg.eval_every else None,
    )


def is_resuming(checkpointer: Checkpointer | None) -> bool:
    return checkpointer is not None and checkpointer.latest_step() is not None


# Per-op-count shares feed accuracy_by_ops (the before/after table); on the progress line they
# would bury the figures that matter. They stay in summary.json and the metrics.
_NOT_ECHOED = ("frac_ops", "frac_correct_ops")


def fmt(ev: Mapping[str, float]) -> str:
    return " | ".join(f"{k} {v:.3f}" for k, v in ev.items() if not k.startswith(_NOT_ECHOED))


def _l2_distance(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return float(np.sqrt(sum(np.sum((np.float64(x) - y) ** 2) for x, y in pairs)))


INITIAL_PARAMS = "initial_params.npz"


def _save_initial(workdir: str | Path, params) -> None:
    if jax.process_index() != 0:
        return
    path = Path(workdir) / INITIAL_PARAMS
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, *[np.asarray(x) for x in jax.tree.leaves(params)])
    tmp.replace(path)  # atomic: a run killed here leaves no half-written file


def _load_initial(workdir: str | Path, like) -> list[np.ndarray] | None:
    path = Path(workdir) / INITIAL_PARAMS
    if not path.exists():
        return None
    with np.load(path) as f:
        leaves = [f[f"arr_{i}"] for i in range(len(f.files))]
    if len(leaves) != len(jax.tree.leaves(like)):
        raise ValueError(f"{path} holds another model's weights: use a fresh workdir")
    return leaves


def run_grpo(
    cfg: GRPOConfig,
    *,
    workdir: str | Path,
    graphdef,
    params,
    tokenizer,
    task,
    train_batches: Iterator[list[dict]],
    eval_examples: Sequence[dict],
    mesh,
    checkpointer: Checkpointer | None,
    guard,
    stop_token_ids: Sequence[int] | None = None,
    response_stats: Callable[[list[str], list[dict]], dict] | None = None,
    carry: Mapping[str, Any] | None = None,
    echo: Callable[[str], None] = print,
    trainer_kwargs: Mapping[str, Any] | None = None,
    metrics_cfg: MetricsConfig | None = None,
    run_config: Mapping[str, Any] | None = None,
    on_trainer: Callable[[GRPOTrainer], None] | None = None,
) -> dict[str, Any]:
    """Evaluate, train `cfg.steps` GRPO steps (resuming if the checkpointer has a step),
    evaluate again. Returns {preempted, step, resumed, before, after, carry,
    rl_param_change_l2, trainer}; `after` is None when preempted.

    `carry` is JSON stored in every checkpoint and handed back on resume (e.g. facts about a
    stage that a resumed run skips). `trainer_kwargs` go to GRPOTrainer (e.g. `frozen=`).
    `metrics_cfg` turns on further metrics sinks (Weights & Biases) and `run_config` is the
    configuration recorded with them; both go to MetricsWriter. `on_trainer` is called with the
    trainer once it exists, before any evaluation (hooks that need its step count).
    """
    resuming = is_resuming(checkpointer)
    with (
        verifiers.VerifierPool(cfg.verifier_workers, timeout_s=cfg.verifier_timeout_s) as pool,
        MetricsWriter(
            workdir,
            total_steps=cfg.steps,
            enabled=jax.process_index() == 0,
            resume_step=checkpointer.latest_step() if resuming else None,
            options=metrics_cfg,
            run_config=run_config,
        ) as writer,
    ):
        trainer = GRPOTrainer(
            cfg,
            graphdef=graphdef,
            params=params,
            tokenizer=tokenizer,
            task=task,
            train_batches=train_batches,
            eval_examples=eval_examples,
            pool=pool,
            metrics=writer,
            checkpointer=checkpointer,
            stop_token_ids=stop_token_ids,
            response_stats=response_stats,
            mesh=mesh,
            **dict(trainer_kwargs or {}),
        )
        if on_trainer is not None:
            on_trainer(trainer)
        meta = trainer.resume() if resuming else None
        if meta is not None:
            writer.rewind(trainer.step_count)  # the step restored, not the newest one on disk
        if meta is None:
            carry = dict(carry or {})
            # Kept on the host (and beside the checkpoints) to measure how far RL moves the
            # weights, also when the run is resumed.
            initial = multihost_utils.process_allgather(trainer.params, tiled=True)
            if checkpointer is not None:
                _save_initial(workdir, initial)
            before = trainer.evaluate(echo=echo)
        else:
            carry, before = meta["carry"], meta["before"]
            initial = _load_initial(workdir, trainer.params)
            echo(f"[grpo] resumed at step {trainer.step_count}/{cfg.steps}")
        echo("[grpo] before RL: " + fmt(before))
        trainer.train(preemption=guard, extra_meta={"before": before, "carry": carry})
        result = {
            "preempted": trainer.preempted,
            "step": trainer.step_count,
            "resumed": meta is not None,
            "before": before,
            "after": None,
            "carry": carry,
            "rl_param_change_l2": None,
            "trainer": trainer,
        }
        if trainer.preempted:
            echo(f"[grpo] preempted: saved step {trainer.step_count}; rerun to continue")
        else:
            result["after"] = trainer.evaluate(echo=echo)
            echo("[grpo] after RL:  " + fmt(result["after"]))
            if initial is not None:  # None: a run resumed from before the file was kept
                final = multihost_utils.process_allgather(trainer.params, tiled=True)
                result["rl_param_change_l2"] = _l2_distance(final, initial)
        if checkpointer is not None:
            checkpointer.close()
    return result
