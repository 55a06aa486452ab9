"""R1-Zero in miniature: pretrain a small base model, then GRPO with an outcome reward only.

Stage 1 trains a sentencepiece tokenizer and a small decoder from scratch on a synthetic corpus
in which arithmetic-chain problems appear sometimes with worked solutions and mostly with bare
answers: the analog of a web-pretrained base model that has seen some worked math. Stage 2 runs
GRPO on held-out problems (none in the corpus), rewarding only the final <answer>. The before /
after evaluation measures accuracy, response length and the fraction of responses that write
their steps.

`run(config)` is driven by an ml_collections config (experiments/configs/r1_zero_tiny.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from models import get_config as model_preset
from rl_reason import data as data_lib
from rl_reason import pretrain, sharding, verifiers
from rl_reason.checkpoint import Checkpointer
from rl_reason.metrics import MetricsWriter, plot_curves
from rl_reason.preemption import PreemptionGuard
from rl_reason.tasks import arithmetic
from rl_reason.tasks.templates import SPECIAL_TOKENS
from rl_reason.tokenizer import Tokenizer, train_sentencepiece
from rl_reason.trainer import GRPOConfig, GRPOTrainer

log = logging.getLogger(__name__)

CURVES = ("accuracy", "reward_mean", "response_length_mean", "eval_accuracy")


def _dataclass_from(cls, section) -> Any:
    """Build a frozen dataclass from a config section; unknown fields are an error."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = dict(section)
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; valid: {sorted(fields)}")
    return cls(**values)


def _response_stats(texts: list[str], examples: list[dict]) -> dict[str, float]:
    return {
        "frac_with_steps": float(np.mean([arithmetic.has_steps(t) for t in texts])),
        "frac_process_correct": float(
            np.mean(
                [arithmetic.process_correct(t, ex) for t, ex in zip(texts, examples, strict=True)]
            )
        ),
    }


def _echo(msg: str) -> None:
    print(msg, flush=True)


def build_data(config) -> dict[str, Any]:
    """Task, held-out eval set, RL problem pool and pretraining corpus, all disjoint."""
    task = arithmetic.ArithmeticTask(_dataclass_from(arithmetic.ArithmeticConfig, config.task))
    d = config.data
    eval_set = task.eval_set(config.seed, d.eval_size)
    held_out = {task.key(p) for p in eval_set}
    rl_pool = task.eval_set(config.seed + 1, d.rl_pool_size, exclude_keys=held_out)
    held_out |= {task.key(p) for p in rl_pool}
    corpus = task.pretraining_corpus(
        config.seed,
        d.corpus_size,
        frac_worked=d.frac_worked,
        frac_template=d.frac_template,
        frac_template_worked=d.frac_template_worked,
        exclude_keys=held_out,
    )
    return {"task": task, "eval_set": eval_set, "rl_pool": rl_pool, "corpus": corpus}


def run(config) -> dict[str, Any]:
    """Both stages; returns the summary written to `workdir/summary.json`.

    Resumable: when `workdir/checkpoints` holds a GRPO checkpoint, stage 1 is skipped (the
    checkpoint holds the weights; the tokenizer is read back from the workdir) and stage 2
    continues from the newest readable step, repeating and skipping nothing. SIGTERM saves at
    the next step boundary and returns early (summary["preempted"] is then True).
    """
    t_start = time.perf_counter()
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    echo = _echo if is_main else (lambda msg: None)
    grpo_cfg = _dataclass_from(GRPOConfig, config.grpo)
    checkpointer = (
        Checkpointer(
            workdir / "checkpoints",
            save_every=grpo_cfg.checkpoint_every,
            max_to_keep=grpo_cfg.checkpoint_keep,
            best_metric="eval_accuracy" if grpo_cfg.eval_every else None,
        )
        if grpo_cfg.checkpoint_every
        else None
    )
    resuming = checkpointer is not None and checkpointer.latest_step() is not None

    data = build_data(config)
    task = data["task"]
    tokenizer_path = workdir / "tokenizer.model"
    if resuming and tokenizer_path.exists():
        tokenizer = Tokenizer.load(tokenizer_path)
    else:
        # Every process trains the same tokenizer (deterministic); process 0 keeps the file.
        out = tokenizer_path if is_main else Path(tempfile.mkdtemp()) / "tokenizer.model"
        tokenizer = train_sentencepiece(
            data["corpus"][: config.tokenizer.train_texts],
            out,
            vocab_size=config.tokenizer.vocab_size,
            user_defined_symbols=SPECIAL_TOKENS,
        )
    model_cfg = model_preset(
        config.model.preset, vocab_size=tokenizer.vocab_size, **dict(config.model.overrides)
    )
    mesh = sharding.make_mesh(_dataclass_from(sharding.MeshConfig, config.mesh))
    graphdef, params = sharding.create_model(model_cfg, mesh, seed=config.seed)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

    with PreemptionGuard() as guard:
        pre_cfg = _dataclass_from(pretrain.PretrainConfig, config.pretrain)
        pre_losses: list[float] = []
        if resuming:
            echo(f"[stage 1] skipped: resuming stage 2 from {checkpointer.directory}")
        else:
            echo(
                f"[stage 1] base model: {n_params / 1e6:.2f}M params, vocab "
                f"{tokenizer.vocab_size}, corpus {len(data['corpus'])} texts, mesh "
                f"{dict(mesh.shape)}"
            )
            every = max(pre_cfg.steps // 10, 1)

            def pre_log(step: int, loss: float, seconds: float) -> None:
                if step % every == 0 or step == pre_cfg.steps:
                    echo(
                        f"[stage 1] step {step}/{pre_cfg.steps} | loss {loss:.3f} | {seconds:.0f}s"
                    )

            params, pre_losses = pretrain.pretrain(
                graphdef,
                params,
                tokenizer,
                data["corpus"],
                pre_cfg,
                pre_log,
                mesh=mesh,
                should_stop=lambda step: guard.should_stop(step),
            )
            if guard.stop_step is not None:
                echo("[stage 1] interrupted: nothing saved yet, a rerun starts stage 1 again")
                return {"preempted": True, "stage": 1}
        t_pretrained = time.perf_counter()

        stops = (tokenizer.eos_id, tokenizer.piece_to_id("</answer>"))
        train_batches = data_lib.train_iterator(
            data["rl_pool"], global_batch_size=grpo_cfg.prompts_per_step, seed=config.seed
        )
        with (
            verifiers.VerifierPool(
                grpo_cfg.verifier_workers, timeout_s=grpo_cfg.verifier_timeout_s
            ) as pool,
            MetricsWriter(
                workdir,
                total_steps=grpo_cfg.steps,
                enabled=is_main,
                resume_step=checkpointer.latest_step() if resuming else None,
            ) as writer,
        ):
            trainer = GRPOTrainer(
                grpo_cfg,
                graphdef=graphdef,
                params=params,
                tokenizer=tokenizer,
                task=task,
                train_batches=train_batches,
                eval_examples=data["eval_set"],
                pool=pool,
                metrics=writer,
                checkpointer=checkpointer,
                stop_token_ids=stops,
                response_stats=_response_stats,
                mesh=mesh,
            )
            meta = trainer.resume() if resuming else None
            if meta is None:
                stage1 = {
                    "pretrain_steps": pre_cfg.steps,
                    "pretrain_final_loss": pre_losses[-1] if pre_losses else None,
                    "pretrain_seconds": t_pretrained - t_start,
                }
                initial = multihost_utils.process_allgather(trainer.params, tiled=True)
                before = trainer.evaluate()
            else:
                stage1, before, initial = meta["stage1"], meta["before"], None
                echo(f"[stage 2] resumed at step {trainer.step_count}/{grpo_cfg.steps}")
            echo("[stage 2] base model before RL: " + _fmt(before))
            trainer.train(preemption=guard, extra_meta={"before": before, "stage1": stage1})
            if trainer.preempted:
                echo(f"[stage 2] preempted: saved step {trainer.step_count}; rerun to continue")
                if checkpointer is not None:
                    checkpointer.close()
                return {"preempted": True, "stage": 2, "step": trainer.step_count}
            after = trainer.evaluate()
            echo("[stage 2] after RL:             " + _fmt(after))
            # How far RL moved the weights (not known to a resumed run: stage 1 is not rerun).
            change = None
            if initial is not None:
                final = multihost_utils.process_allgather(trainer.params, tiled=True)
                change = _l2_distance(final, initial)
            if checkpointer is not None:
                checkpointer.close()

    summary = {
        "preempted": False,
        "before": _summary_row(before),
        "after": _summary_row(after),
        "before_full": before,
        "after_full": after,
        "rl_steps": grpo_cfg.steps,
        "resumed": resuming,
        **stage1,
        "wall_seconds": time.perf_counter() - t_start,
        "num_params": n_params,
        "eval_size": len(data["eval_set"]),
        "rl_param_change_l2": change,
    }
    if is_main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_curves(
            workdir / "metrics.jsonl",
            workdir / "curves.png",
            CURVES,
            title="R1-Zero in miniature: GRPO on arithmetic chains",
        )
        echo(_table(summary))
        echo(f"wrote {workdir}/summary.json, metrics.jsonl, tb/, curves.png")
    return summary


def _l2_distance(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return float(np.sqrt(sum(np.sum((np.float64(x) - y) ** 2) for x, y in pairs)))


def _summary_row(ev: dict[str, float]) -> dict[str, float]:
    return {
        "accuracy": ev["accuracy"],
        "mean_response_tokens": ev["mean_response_tokens"],
        "frac_with_steps": ev["frac_with_steps"],
    }


def _fmt(ev: dict[str, float]) -> str:
    return " | ".join(f"{k} {v:.3f}" for k, v in ev.items())


def _table(summary: dict[str, Any]) -> str:
    rows = ["", "|                      | before RL | after RL |", "|---|---|---|"]
    for key in ("accuracy", "mean_response_tokens", "frac_with_steps"):
        b, a = summary["before"][key], summary["after"][key]
        rows.append(f"| {key:<20} | {b:9.3f} | {a:8.3f} |")
    rows.append(
        f"RL steps {summary['rl_steps']}, wall {summary['wall_seconds']:.0f}s "
        f"(stage 1: {summary['pretrain_seconds']:.0f}s"
        + (", resumed" if summary["resumed"] else "")
        + ")"
    )
    return "\n".join(rows)


def configure_logging() -> None:
    """Progress lines are printed; library INFO chatter (orbax saves) is hidden unless asked."""
    from absl import logging as absl_logging

    level = os.environ.get("RL_REASON_LOGLEVEL", "WARNING")
    absl_logging.set_verbosity(level.lower())
    logging.getLogger().setLevel(level)
