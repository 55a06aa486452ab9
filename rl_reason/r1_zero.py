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
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from models import get_config as model_preset
from rl_reason import pretrain, sharding, verifiers
from rl_reason.checkpoint import Checkpointer
from rl_reason.metrics import MetricsWriter, plot_curves
from rl_reason.tasks import arithmetic
from rl_reason.tasks.templates import SPECIAL_TOKENS
from rl_reason.tokenizer import train_sentencepiece
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


def _cycle_batches(problems: list[dict], batch_size: int, seed: int):
    """Endless shuffled epochs over a fixed pool of RL problems."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(problems))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [problems[j] for j in order[i : i + batch_size]]


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
    """Both stages; returns the summary written to `workdir/summary.json`."""
    t_start = time.perf_counter()
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0

    data = build_data(config)
    task = data["task"]
    tokenizer = train_sentencepiece(
        data["corpus"][: config.tokenizer.train_texts],
        workdir / "tokenizer.model",
        vocab_size=config.tokenizer.vocab_size,
        user_defined_symbols=SPECIAL_TOKENS,
    )
    model_cfg = model_preset(
        config.model.preset, vocab_size=tokenizer.vocab_size, **dict(config.model.overrides)
    )
    mesh = sharding.make_mesh(_dataclass_from(sharding.MeshConfig, config.mesh))
    graphdef, params = sharding.create_model(model_cfg, mesh, seed=config.seed)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    _echo(
        f"[stage 1] base model: {n_params / 1e6:.2f}M params, vocab {tokenizer.vocab_size}, "
        f"corpus {len(data['corpus'])} texts, mesh {dict(mesh.shape)}"
    )

    pre_cfg = _dataclass_from(pretrain.PretrainConfig, config.pretrain)
    every = max(pre_cfg.steps // 10, 1)

    def pre_log(step: int, loss: float, seconds: float) -> None:
        if step % every == 0 or step == pre_cfg.steps:
            _echo(f"[stage 1] step {step}/{pre_cfg.steps} | loss {loss:.3f} | {seconds:.0f}s")

    params, pre_losses = pretrain.pretrain(
        graphdef, params, tokenizer, data["corpus"], pre_cfg, pre_log
    )
    t_pretrained = time.perf_counter()

    grpo_cfg = _dataclass_from(GRPOConfig, config.grpo)
    stops = (tokenizer.eos_id, tokenizer.piece_to_id("</answer>"))
    with (
        verifiers.VerifierPool(
            grpo_cfg.verifier_workers, timeout_s=grpo_cfg.verifier_timeout_s
        ) as pool,
        MetricsWriter(workdir, total_steps=grpo_cfg.steps, enabled=is_main) as writer,
    ):
        checkpointer = (
            Checkpointer(
                workdir / "checkpoints",
                save_every=grpo_cfg.checkpoint_every,
                max_to_keep=grpo_cfg.checkpoint_keep,
            )
            if grpo_cfg.checkpoint_every
            else None
        )
        trainer = GRPOTrainer(
            grpo_cfg,
            graphdef=graphdef,
            params=params,
            tokenizer=tokenizer,
            task=task,
            train_batches=_cycle_batches(data["rl_pool"], grpo_cfg.prompts_per_step, config.seed),
            eval_examples=data["eval_set"],
            pool=pool,
            metrics=writer,
            checkpointer=checkpointer,
            stop_token_ids=stops,
            response_stats=_response_stats,
        )
        initial = jax.tree.map(np.asarray, params)
        before = trainer.evaluate()
        _echo("[stage 2] base model before RL: " + _fmt(before))
        trainer.train()
        after = trainer.evaluate()
        delta = [
            np.asarray(a, np.float64) - b
            for a, b in zip(jax.tree.leaves(trainer.params), jax.tree.leaves(initial), strict=True)
        ]
        rl_param_change = float(np.sqrt(sum(np.sum(d * d) for d in delta)))
        _echo("[stage 2] after RL:             " + _fmt(after))
        if checkpointer is not None:
            checkpointer.close()

    summary = {
        "before": _summary_row(before),
        "after": _summary_row(after),
        "before_full": before,
        "after_full": after,
        "rl_steps": grpo_cfg.steps,
        "pretrain_steps": pre_cfg.steps,
        "pretrain_final_loss": pre_losses[-1] if pre_losses else None,
        "pretrain_seconds": t_pretrained - t_start,
        "wall_seconds": time.perf_counter() - t_start,
        "num_params": n_params,
        "eval_size": len(data["eval_set"]),
        "rl_param_change_l2": rl_param_change,
    }
    if is_main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_curves(
            workdir / "metrics.jsonl",
            workdir / "curves.png",
            CURVES,
            title="R1-Zero in miniature: GRPO on arithmetic chains",
        )
        _echo(_table(summary))
        _echo(f"wrote {workdir}/summary.json, metrics.jsonl, tb/, curves.png")
    return summary


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
        f"(stage 1: {summary['pretrain_seconds']:.0f}s)"
    )
    return "\n".join(rows)


def configure_logging() -> None:
    """Progress lines are printed; library INFO chatter (orbax saves) is hidden unless asked."""
    from absl import logging as absl_logging

    level = os.environ.get("RL_REASON_LOGLEVEL", "WARNING")
    absl_logging.set_verbosity(level.lower())
    logging.getLogger().setLevel(level)
