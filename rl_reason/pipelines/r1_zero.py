"""R1-Zero in miniature: a small base model, then GRPO with an outcome reward only.

The base model is the one shipped in models/bases/ (`config.base="shipped"`, loaded like any
Hugging Face checkpoint), or, with `config.base="scratch"`, stage 1 runs first: it trains a
sentencepiece tokenizer and a small decoder from scratch on a synthetic corpus in which
arithmetic-chain problems appear sometimes with worked solutions and mostly with bare answers
(the analog of a web-pretrained base model that has seen some worked math); the shipped base is
exactly that stage's result (`python -m experiments.pretrain_base`). Stage 2 runs
GRPO on held-out problems (none in the corpus), rewarding only the final <answer>. The before /
after evaluation measures accuracy, response length and the fraction of responses that write
their steps.

`run(config)` is driven by an ml_collections config (experiments/configs/r1_zero_tiny.py).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from models import get_config as model_preset
from rl_reason.infra import data as data_lib
from rl_reason.infra import sharding
from rl_reason.infra.tokenizer import Tokenizer
from rl_reason.pipelines import base_model, pretrain
from rl_reason.pipelines import grpo_stage as grpo_run
from rl_reason.pipelines.context import RunContext
from rl_reason.tasks import arithmetic
from rl_reason.trainer import GRPOConfig

log = logging.getLogger(__name__)

CURVES = ("accuracy", "reward_mean", "response_length_mean", "eval_accuracy")


def build_data(config, *, with_corpus: bool = True) -> dict[str, Any]:
    """Task, held-out eval set, RL problem pool and pretraining corpus, all disjoint.

    `with_corpus=False` skips the corpus (seconds of generation) when stage 1 needs none; it
    is then None. The eval set and RL pool do not depend on it.
    """
    task = arithmetic.ArithmeticTask(grpo_run.config_from(arithmetic.ArithmeticConfig, config.task))
    d = config.data
    eval_set = task.eval_set(config.seed, d.eval_size)
    held_out = {task.key(p) for p in eval_set}
    rl_pool = task.eval_set(config.seed + 1, d.rl_pool_size, exclude_keys=held_out)
    held_out |= {task.key(p) for p in rl_pool}
    if not with_corpus:
        return {"task": task, "eval_set": eval_set, "rl_pool": rl_pool, "corpus": None}
    corpus = task.pretraining_corpus(
        config.seed,
        d.corpus_size,
        frac_worked=d.frac_worked,
        frac_template=d.frac_template,
        frac_template_worked=d.frac_template_worked,
        exclude_keys=held_out,
        # Only the self-correction experiment sets it; other configs keep their stage-1 hash.
        frac_retry=d.get("frac_retry", 0.0),
    )
    return {"task": task, "eval_set": eval_set, "rl_pool": rl_pool, "corpus": corpus}


def run(config) -> dict[str, Any]:
    """Both stages; returns the summary written to `workdir/summary.json`.

    Resumable: when `workdir/checkpoints` holds a GRPO checkpoint, stage 1 is skipped (the
    checkpoint holds the weights; a scratch base's tokenizer is read back from the workdir) and
    stage 2 continues from the newest readable step, repeating and skipping nothing. SIGTERM
    saves at the next step boundary and returns early (summary["preempted"] is then True).
    """
    ctx = RunContext.start(config)
    grpo_cfg = grpo_run.config_from(GRPOConfig, config.grpo)
    grpo_run.config_from(pretrain.PretrainConfig, config.pretrain)  # a bad field fails now
    checkpointer = ctx.make_checkpointer(grpo_cfg)
    echo, mesh = ctx.echo, ctx.mesh

    base_dir = base_model.resolve_base(config.base)
    data = build_data(config, with_corpus=base_dir is None)
    task = data["task"]

    with ctx.preemptible() as guard:
        stage1: dict[str, Any] = {"base": config.base}
        if base_dir is not None:
            tokenizer, graphdef, params, info = base_model.load_base(base_dir, mesh, config)
            echo(f"[stage 1] base model {base_dir} (vocab {tokenizer.vocab_size})")
            stage1["base_eval"] = info.get("eval")
        elif ctx.resuming:
            echo(f"[stage 1] skipped: resuming stage 2 from {checkpointer.directory}")
            tokenizer = Tokenizer.load(ctx.workdir / "tokenizer.model")
            graphdef, params = _skeleton(config, tokenizer, mesh)
        else:
            # Every process trains the same tokenizer (deterministic); process 0 keeps the file.
            tok_dir = ctx.workdir if ctx.is_main else Path(tempfile.mkdtemp())
            base = base_model.train_base(
                config, data["corpus"], mesh, tok_dir, echo, guard.should_stop
            )
            if base is None:
                echo("[stage 1] interrupted: nothing saved yet, a rerun starts stage 1 again")
                return {"preempted": True, "stage": 1}
            tokenizer, graphdef, params, facts = base
            stage1.update(facts)
            stage1["pretrain_seconds"] = ctx.elapsed()
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

        result = ctx.run_grpo(
            grpo_cfg,
            graphdef=graphdef,
            params=params,
            tokenizer=tokenizer,
            task=task,
            train_batches=data_lib.train_iterator(
                data["rl_pool"], global_batch_size=grpo_cfg.prompts_per_step, seed=config.seed
            ),
            eval_examples=data["eval_set"],
            stop_token_ids=base_model.stop_token_ids(tokenizer),
            response_stats=base_model.response_stats,
            carry={"stage1": stage1},
        )
    if result["preempted"]:
        return {"preempted": True, "stage": 2, "step": result["step"]}

    before, after = result["before"], result["after"]
    summary = {
        "preempted": False,
        "before": _summary_row(before),
        "after": _summary_row(after),
        "before_full": before,
        "after_full": after,
        "rl_steps": grpo_cfg.steps,
        "resumed": result["resumed"],
        **result["carry"]["stage1"],
        "wall_seconds": ctx.elapsed(),
        "num_params": n_params,
        "eval_size": len(data["eval_set"]),
        "rl_param_change_l2": result["rl_param_change_l2"],
    }
    ctx.write_summary(
        summary,
        curves=CURVES,
        title="R1-Zero in miniature: GRPO on arithmetic chains",
        table=_table(summary),
    )
    echo(f"wrote {ctx.workdir}/summary.json, metrics.jsonl, tb/, curves.png")
    return summary


def _skeleton(config, tokenizer, mesh):
    """The scratch base's (graphdef, params) before training: what a resumed run restores into."""
    model_cfg = model_preset(
        config.model.preset, vocab_size=tokenizer.vocab_size, **dict(config.model.overrides)
    )
    return sharding.create_model(model_cfg, mesh, seed=config.seed)


def _summary_row(ev: dict[str, float]) -> dict[str, Any]:
    return {
        "accuracy": ev["accuracy"],
        "mean_response_tokens": ev["mean_response_tokens"],
        "frac_with_steps": ev["frac_with_steps"],
        "frac_process_correct": ev["frac_process_correct"],
        "accuracy_by_ops": base_model.accuracy_by_ops(ev),
    }


def _table(summary: dict[str, Any]) -> str:
    rows = ["", "|                      | before RL | after RL |", "|---|---|---|"]
    before, after = summary["before"], summary["after"]
    for key in ("accuracy", "mean_response_tokens", "frac_with_steps", "frac_process_correct"):
        rows.append(f"| {key:<20} | {before[key]:9.3f} | {after[key]:8.3f} |")
    for k, b in before["accuracy_by_ops"].items():
        name = f"accuracy, {k} ops"
        rows.append(f"| {name:<20} | {b:9.3f} | {after['accuracy_by_ops'][k]:8.3f} |")
    stage1 = summary.get("pretrain_seconds")
    rows.append(
        f"RL steps {summary['rl_steps']}, wall {summary['wall_seconds']:.0f}s (base "
        + (f"pretrained here in {stage1:.0f}s" if stage1 is not None else summary["base"])
        + (", resumed" if summary["resumed"] else "")
        + ")"
    )
    return "\n".join(rows)
