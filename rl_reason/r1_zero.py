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

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from models import get_config as model_preset
from rl_reason import data as data_lib
from rl_reason import grpo_run, pretrain, sharding
from rl_reason.metrics import plot_curves
from rl_reason.preemption import PreemptionGuard
from rl_reason.tasks import arithmetic
from rl_reason.tasks.templates import SPECIAL_TOKENS
from rl_reason.tokenizer import Tokenizer, train_sentencepiece
from rl_reason.trainer import GRPOConfig

log = logging.getLogger(__name__)

CURVES = ("accuracy", "reward_mean", "response_length_mean", "eval_accuracy")


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
    grpo_cfg = grpo_run.config_from(GRPOConfig, config.grpo)
    pre_cfg = grpo_run.config_from(pretrain.PretrainConfig, config.pretrain)
    mesh_cfg = grpo_run.config_from(sharding.MeshConfig, config.mesh)
    checkpointer = grpo_run.make_checkpointer(workdir, grpo_cfg)
    resuming = grpo_run.is_resuming(checkpointer)

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
    mesh = sharding.make_mesh(mesh_cfg)
    graphdef, params = sharding.create_model(model_cfg, mesh, seed=config.seed)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

    with PreemptionGuard() as guard:
        stage1: dict[str, Any] = {}
        if resuming:
            echo(f"[stage 1] skipped: resuming stage 2 from {checkpointer.directory}")
        else:
            echo(
                f"[stage 1] base model: {n_params / 1e6:.2f}M params, vocab "
                f"{tokenizer.vocab_size}, corpus {len(data['corpus'])} texts, mesh "
                f"{dict(mesh.shape)}"
            )
            params, pre_losses = _stage1(
                graphdef, params, tokenizer, data, pre_cfg, mesh, guard, echo
            )
            if guard.stop_step is not None:
                echo("[stage 1] interrupted: nothing saved yet, a rerun starts stage 1 again")
                return {"preempted": True, "stage": 1}
            stage1 = {
                "pretrain_steps": pre_cfg.steps,
                "pretrain_final_loss": pre_losses[-1] if pre_losses else None,
                "pretrain_seconds": time.perf_counter() - t_start,
            }

        result = grpo_run.run_grpo(
            grpo_cfg,
            workdir=workdir,
            graphdef=graphdef,
            params=params,
            tokenizer=tokenizer,
            task=task,
            train_batches=data_lib.train_iterator(
                data["rl_pool"], global_batch_size=grpo_cfg.prompts_per_step, seed=config.seed
            ),
            eval_examples=data["eval_set"],
            mesh=mesh,
            checkpointer=checkpointer,
            guard=guard,
            stop_token_ids=(tokenizer.eos_id, tokenizer.piece_to_id("</answer>")),
            response_stats=_response_stats,
            carry={"stage1": stage1},
            echo=echo,
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
        "wall_seconds": time.perf_counter() - t_start,
        "num_params": n_params,
        "eval_size": len(data["eval_set"]),
        "rl_param_change_l2": result["rl_param_change_l2"],
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


def _stage1(graphdef, params, tokenizer, data, pre_cfg, mesh, guard, echo):
    every = max(pre_cfg.steps // 10, 1)

    def pre_log(step: int, loss: float, seconds: float) -> None:
        if step % every == 0 or step == pre_cfg.steps:
            echo(f"[stage 1] step {step}/{pre_cfg.steps} | loss {loss:.3f} | {seconds:.0f}s")

    return pretrain.pretrain(
        graphdef,
        params,
        tokenizer,
        data["corpus"],
        pre_cfg,
        pre_log,
        mesh=mesh,
        should_stop=guard.should_stop,
    )


def _summary_row(ev: dict[str, float]) -> dict[str, float]:
    return {
        "accuracy": ev["accuracy"],
        "mean_response_tokens": ev["mean_response_tokens"],
        "frac_with_steps": ev["frac_with_steps"],
    }


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
