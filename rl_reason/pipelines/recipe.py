"""Published zero-RL recipes on a real pretrained model: GRPO from a local Hugging Face checkpoint.

    python -m experiments.train --config=experiments/configs/gsm8k_qwen2_5_0_5b.py \\
        --config.model.path=/ckpt/Qwen2.5-0.5B --config.data.manual_dir=~/data/gsm8k

`run(config)` (pipeline "recipe") does, in order:

  policy     `models.from_pretrained(config.model.path, dtype=, param_dtype=, mesh=)`. With
             config.lora.rank > 0 LoRA adapters are added and only they train; the frozen base is
             also the KL reference. A resumed run reads the base from the path again and the
             adapters (or, without LoRA, all weights) from the checkpoint (`policy.py`).
  tokenizer  `load_tokenizer(path)`, checked against the embedding rows.
  prompts    config.prompt.format "r1_zero": the task's plain R1-Zero template (`task.prompt`),
             encoded after the tokenizer's bos (if it has one). "chat": the tokenizer's chat
             template around [system] + user(question + suffix), encoded exactly as the template
             wrote it (a template that writes bos has it once; nothing is added) (`chat_task.py`).
  stop       eos, plus the template's end: `</answer>` when it is a single token (r1_zero), or
             the end-of-turn token that the chat template closes an assistant reply with (chat).
  data       the task's tfds builder: the train split through `data.train_iterator`, and the
             first data.eval_size examples of the held-out split (which may come from another
             manual_dir, e.g. MATH-500, built under its own data_dir) (`recipe_data.py`).
  stage      `grpo_stage.run_grpo`: evaluate, train, evaluate, with checkpoints and preemption.
  outputs    workdir/summary.json, metrics.jsonl, tb/, curves.png, and workdir/export/: the final
             policy (LoRA merged) in Hugging Face layout with the tokenizer files beside it.

Smoke runs set config.model.tiny to a family name instead of a path: a tiny random model of
that family is built into workdir/tiny_model and used as the checkpoint (`model_path.py`). The
config sections are checked by `recipe_options.py`; the modules named are in this package.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from rl_reason.infra import data as data_lib
from rl_reason.infra.tokenizer import load_tokenizer
from rl_reason.pipelines import grpo_stage as grpo_run
from rl_reason.pipelines.chat_task import prompting, stop_token_ids
from rl_reason.pipelines.context import RunContext
from rl_reason.pipelines.model_path import model_path
from rl_reason.pipelines.policy import Policy, export_policy, load_policy
from rl_reason.pipelines.recipe_data import held_out_examples, make_task, train_source
from rl_reason.pipelines.recipe_options import sections
from rl_reason.rollout import envs
from rl_reason.trainer import GRPOConfig

CURVES = ("accuracy", "reward_mean", "response_length_mean", "eval_accuracy")
EXPORT_DIR = "export"


@dataclasses.dataclass
class Setup:
    """Everything a recipe run (or an evaluation of one) is built from."""

    path: Path
    tokenizer: Any  # encodes prompts (with bos unless the task says prompt_add_bos=False)
    task: Any  # gives the prompts (see ChatTask)
    dataset_task: Any  # reads and checks the rows
    stop_token_ids: tuple[int, ...]
    policy: Policy
    grpo: GRPOConfig


def setup(config, mesh, *, path: str | Path | None = None, lora: bool = True) -> Setup:
    """Task, tokenizer, prompts, stop tokens and policy of a recipe config.

    `path` replaces the config's checkpoint (e.g. an exported policy); `lora=False` loads it
    without adapters.
    """
    model, prompt, data, lora_opts = sections(config)
    grpo_cfg = grpo_run.config_from(GRPOConfig, config.grpo)
    dataset_task = make_task(config)
    source_path = model_path(config, dataset_task, model, prompt, data)
    path = source_path if path is None else Path(path)
    tokenizer = load_tokenizer(path if _has_tokenizer(path) else source_path)
    lora_cfg = lora_opts.lora_config() if lora else None
    policy = load_policy(path, model, lora_cfg, mesh, seed=config.seed)
    tokenizer.assert_fits(policy.model_cfg.vocab_size)
    needed = grpo_cfg.max_prompt_len + grpo_cfg.max_new_tokens
    if needed > policy.model_cfg.max_seq_len:
        raise ValueError(
            f"grpo.max_prompt_len + max_new_tokens = {needed} exceeds the model's max_seq_len "
            f"{policy.model_cfg.max_seq_len} ({path}): shorten them, or raise "
            "config.model.max_seq_len if the model's RoPE extends that far"
        )
    tools = envs.CHAT_TOOLS.get(grpo_cfg.multi_turn.env, ())
    encoder, task = prompting(tokenizer, dataset_task, prompt, tools)
    stops = stop_token_ids(tokenizer, prompt.format)
    return Setup(path, encoder, task, dataset_task, stops, policy, grpo_cfg)


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()


def run(config) -> dict[str, Any]:
    """The recipe's GRPO stage and export; returns the summary written to workdir/summary.json.

    Resumable: a workdir whose checkpoints hold a step continues from the newest readable one
    (the base weights are read from the checkpoint path again). SIGTERM saves at the next step
    boundary and returns early (summary["preempted"] is then True; nothing is exported).
    """
    ctx = RunContext.start(config)
    _, _, data, _ = sections(config)
    s = setup(config, ctx.mesh)
    cfg = s.grpo
    ctx.make_checkpointer(cfg)
    eval_set = held_out_examples(s.dataset_task, data)
    train_batches = data_lib.train_iterator(
        train_source(s.dataset_task, data),
        global_batch_size=cfg.prompts_per_step,
        seed=config.seed,
        task=s.dataset_task,
    )
    n_total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(s.policy.model())))
    n_trained = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s.policy.params))
    ctx.echo(
        f"[recipe] {s.path}: {n_total / 1e6:.1f}M params ({n_trained / 1e6:.2f}M trained), "
        f"task {s.dataset_task.name}: {train_batches.num_examples} train / {len(eval_set)} "
        f"held-out examples, stop ids {list(s.stop_token_ids)}, mesh {dict(ctx.mesh.shape)}"
    )
    with ctx.preemptible():
        result = ctx.run_grpo(
            cfg,
            graphdef=s.policy.graphdef,
            params=s.policy.params,
            tokenizer=s.tokenizer,
            task=s.task,
            train_batches=train_batches,
            eval_examples=eval_set,
            stop_token_ids=s.stop_token_ids,
            trainer_kwargs=s.policy.trainer_kwargs,
        )
    if result["preempted"]:
        return {"preempted": True, "step": result["step"]}
    trainer = result["trainer"]
    export = export_policy(
        trainer.graphdef,
        trainer.params,
        trainer.frozen[0] if trainer.frozen else None,
        ctx.workdir / EXPORT_DIR,
        source_dir=s.path,
    )
    summary = {
        "preempted": False,
        "before": result["before"],
        "after": result["after"],
        "rl_steps": cfg.steps,
        "resumed": result["resumed"],
        "wall_seconds": ctx.elapsed(),
        "model_path": str(s.path),
        "num_params": n_total,
        "num_trained_params": n_trained,
        "lora": dataclasses.asdict(s.policy.lora) if s.policy.lora else None,
        "task": s.dataset_task.name,
        "eval_size": len(eval_set),
        "stop_token_ids": list(s.stop_token_ids),
        "rl_param_change_l2": result["rl_param_change_l2"],
        "export": str(export),
    }
    ctx.write_summary(
        summary,
        curves=CURVES,
        title=f"GRPO on {s.dataset_task.name} from {s.path.name}",
        table=results_table({"before RL": result["before"], "after RL": result["after"]}),
    )
    ctx.echo(f"wrote {ctx.workdir}/summary.json, metrics.jsonl, tb/, curves.png, {EXPORT_DIR}/")
    return summary


def results_table(columns: Mapping[str, Mapping[str, float]]) -> str:
    """A markdown table: one row per metric, one column per evaluation."""
    names = list(columns)
    keys = list(dict.fromkeys(k for ev in columns.values() for k in ev))
    rows = ["", "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in keys:
        cells = [f"{columns[n][key]:.4f}" if key in columns[n] else "" for n in names]
        rows.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
