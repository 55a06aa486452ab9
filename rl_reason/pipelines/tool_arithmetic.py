"""The tool demo: products a tiny model cannot compute in its head, GRPO with and without a
Python tool (rl_reason/tasks/tool_arithmetic.py).

Stage 1 pretrains a tokenizer (the tool tags single tokens) and a small decoder on a corpus in
which a share of the solutions call the tool; the base is saved under `config.base_dir` per
seed and reused by every arm of that seed. Stage 2 runs GRPO on the outcome only, with the
arm's `grpo.multi_turn.env`: "python_tool" (decoding stops at `</code>`, the sandbox's output
is appended and masked out of the loss) or "" (the policy writes the output block itself).
The before / after evaluation is greedy on held-out problems: accuracy, `tool_call_rate`
(responses that call the tool; without the tool, that write a call) and response length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rl_reason.infra import data as data_lib
from rl_reason.pipelines import base_model, pretrain
from rl_reason.pipelines import grpo_stage as grpo_run
from rl_reason.pipelines.context import RunContext
from rl_reason.tasks import tool_arithmetic as ta
from rl_reason.tasks.templates import SPECIAL_TOKENS
from rl_reason.trainer import GRPOConfig

CURVES = (
    "accuracy",
    "mt_tool_call_frac",
    "response_length_mean",
    "eval_accuracy",
    "eval_tool_call_rate",
    "eval_writes_tool_call",
)
SUMMARY_KEYS = ("accuracy", "tool_call_rate", "mean_response_tokens", "truncated_frac")


def build_data(config) -> dict[str, Any]:
    """Task, held-out eval set, RL problem pool and pretraining corpus, all disjoint."""
    task = ta.ToolArithmeticTask(grpo_run.config_from(ta.ToolArithmeticConfig, config.task))
    d = config.data
    eval_set = task.eval_set(config.data_seed, d.eval_size)
    held_out = {task.key(p) for p in eval_set}
    rl_pool = task.eval_set(config.data_seed + 1, d.rl_pool_size, exclude_keys=held_out)
    held_out |= {task.key(p) for p in rl_pool}
    corpus = task.pretraining_corpus(
        config.seed, d.corpus_size, frac_tool=d.frac_tool, exclude_keys=held_out
    )
    return {"task": task, "eval_set": eval_set, "rl_pool": rl_pool, "corpus": corpus}


def _settings(config) -> dict[str, Any]:
    sections = ("task", "data", "tokenizer", "model", "pretrain")
    return {"seed": config.seed, **{s: config[s].to_dict() for s in sections}}


def _base(config, ctx, corpus) -> tuple[Any, Any, Any, dict[str, Any]]:
    """This seed's base: loaded from `base_dir` when pretrained with these settings, else
    pretrained now and saved there."""
    path = Path(config.base_dir).expanduser() / f"seed{config.seed}"
    settings = _settings(config)
    if base_model.read_info(path).get("settings") == settings:
        tokenizer, graphdef, params, info = base_model.load_base(path, ctx.mesh)
        ctx.echo(f"[stage 1] base model {path} (pretrained earlier)")
        return tokenizer, graphdef, params, info["facts"]
    got = base_model.train_base(
        config,
        corpus,
        ctx.mesh,
        ctx.workdir,
        ctx.echo,
        symbols=(*SPECIAL_TOKENS, *ta.TOOL_SYMBOLS),
    )
    assert got is not None  # no stop callback: stage 1 runs to its end
    tokenizer, graphdef, params, facts = got
    if jax.process_index() == 0:
        text = f"# Tool-arithmetic base, seed {config.seed}\n\nStage 1 of {__name__}.\n"
        info = {"settings": settings, "facts": facts}
        base_model.save_base(path, graphdef, params, tokenizer, info, readme_text=text)
    return tokenizer, graphdef, params, facts


def response_stats(texts: list[str], examples: list[dict]) -> dict[str, float]:
    """The share of responses that write a tool call (the no-tool arm's `tool_call_rate`)."""
    del examples
    return {"writes_tool_call": float(np.mean([ta.calls_tool(t) for t in texts]))}


def _row(ev: dict[str, float], with_tool: bool) -> dict[str, float]:
    row = {k: float(ev[k]) for k in SUMMARY_KEYS if k in ev}
    if not with_tool:
        row["tool_call_rate"] = float(ev["writes_tool_call"])
    return row


def run(config) -> dict[str, Any]:
    ctx = RunContext.start(config)
    grpo_cfg = grpo_run.config_from(GRPOConfig, config.grpo)
    grpo_run.config_from(pretrain.PretrainConfig, config.pretrain)  # a bad field fails now
    with_tool = bool(grpo_cfg.multi_turn.env)
    data = build_data(config)
    with ctx.preemptible():
        tokenizer, graphdef, params, facts = _base(config, ctx, data["corpus"])
        ctx.make_checkpointer(grpo_cfg)
        result = ctx.run_grpo(
            grpo_cfg,
            graphdef=graphdef,
            params=params,
            tokenizer=tokenizer,
            task=data["task"],
            train_batches=data_lib.train_iterator(
                data["rl_pool"], global_batch_size=grpo_cfg.prompts_per_step, seed=config.seed
            ),
            eval_examples=data["eval_set"],
            stop_token_ids=base_model.stop_token_ids(tokenizer),
            # With the tool the evaluator counts the calls itself; the verifier's text is the
            # final turn, after the tool's output, so it holds no call to count.
            response_stats=None if with_tool else response_stats,
        )
    if result["preempted"]:
        return {"preempted": True, "step": result["step"]}
    summary = {
        "preempted": False,
        "arm": "tool" if with_tool else "no_tool",
        "seed": config.seed,
        "before": _row(result["before"], with_tool),
        "after": _row(result["after"], with_tool),
        "before_full": result["before"],
        "after_full": result["after"],
        "rl_steps": grpo_cfg.steps,
        "stage1": facts,
        "wall_seconds": ctx.elapsed(),
        "eval_size": len(data["eval_set"]),
        "workdir": str(ctx.workdir),
    }
    title = f"Tool arithmetic, {summary['arm']} arm, seed {config.seed}"
    ctx.write_summary(summary, curves=CURVES, title=title)
    ctx.echo(f"wrote {ctx.workdir}/summary.json: {json.dumps(summary['after'])}")
    return summary


def run_arms(
    make_config, seeds, out_dir, *, runs_dir=None, arms=("tool", "no_tool"), echo=print
) -> dict:
    """Every (seed, arm) of the demo (`make_config(arm)` the arm's config), each in its own
    workdir under `runs_dir` (default: `out_dir`; a finished one is read back, not rerun),
    then the aggregate into `out_dir`: summary.json (per arm, each seed's before / after and
    their mean ± s.d., each seed's curves, and the difference of the arms' held-out accuracy
    after RL, seed by seed: the arms of a seed share its base) and curves.png."""
    out_dir = Path(out_dir)
    runs_dir = out_dir if runs_dir is None else Path(runs_dir)
    runs: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
    for seed in seeds:
        for arm in arms:
            config = make_config(arm)
            with config.unlocked():
                config.seed = seed
                config.workdir = str(runs_dir / f"{arm}_seed{seed}")
                config.base_dir = str(runs_dir / "bases")
            done = Path(config.workdir) / "summary.json"
            if done.is_file():
                runs[arm][seed] = json.loads(done.read_text())
                echo(f"[tool_arithmetic] {arm} seed {seed}: done earlier")
                continue
            runs[arm][seed] = run(config)
            if runs[arm][seed].get("preempted"):
                # SIGTERM: that run saved at a step boundary; a rerun continues it.
                echo(f"[tool_arithmetic] {arm} seed {seed} preempted: stopping")
                return {"preempted": True}
    summary = aggregate(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_arms(summary, out_dir / "curves.png")
    return summary


def _mean_sd(values) -> dict[str, float]:
    x = np.asarray(values, np.float64)
    return {"mean": float(x.mean()), "sd": float(x.std(ddof=1)) if len(x) > 1 else 0.0, "n": len(x)}


def aggregate(runs: dict[str, dict[int, dict]]) -> dict[str, Any]:
    out: dict[str, Any] = {"arms": {}}
    for arm, by_seed in runs.items():
        seeds = sorted(by_seed)
        arm_out = {"seeds": seeds, "per_seed": {str(s): by_seed[s] for s in seeds}}
        for when in ("before", "after"):
            arm_out[when] = {
                k: _mean_sd([by_seed[s][when][k] for s in seeds]) for k in by_seed[seeds[0]][when]
            }
        arm_out["after_minus_before"] = {
            k: _mean_sd([by_seed[s]["after"][k] - by_seed[s]["before"][k] for s in seeds])
            for k in by_seed[seeds[0]]["after"]
        }
        arm_out["curves"] = {str(s): _curve(by_seed[s]) for s in seeds}
        out["arms"][arm] = arm_out
    if {"tool", "no_tool"} <= set(runs):
        common = sorted(set(runs["tool"]) & set(runs["no_tool"]))
        diff = [
            runs["tool"][s]["after"]["accuracy"] - runs["no_tool"][s]["after"]["accuracy"]
            for s in common
        ]
        out["accuracy_after_tool_minus_no_tool"] = {**_mean_sd(diff), "per_seed": diff}
    return out


def _curve(run_summary: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Each curve's steps and values; the evaluation before RL is the eval_* curves' step 0."""
    lines = (Path(run_summary["workdir"]) / "metrics.jsonl").read_text().splitlines()
    before = {f"eval_{k}": v for k, v in run_summary["before_full"].items()}
    rows = [{"step": 0, **before}, *(json.loads(x) for x in lines if x)]
    return {
        k: {"step": [r["step"] for r in rows if k in r], "value": [r[k] for r in rows if k in r]}
        for k in CURVES
    }


def plot_arms(summary: dict[str, Any], path: Path) -> None:
    """One panel per curve: each seed a thin line, the seeds' mean a thick one, per arm."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    arms = summary["arms"].values()
    keys = [k for k in CURVES if any(c[k]["step"] for a in arms for c in a["curves"].values())]
    fig = Figure(figsize=(7.0, 1.0 + 2.0 * len(keys)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys, strict=True):
        for i, (arm, got) in enumerate(summary["arms"].items()):
            series = [c[key] for c in got["curves"].values() if c[key]["step"]]
            for s in series:
                ax.plot(s["step"], s["value"], color=f"C{i}", alpha=0.3, linewidth=0.8)
            n = min((len(s["step"]) for s in series), default=0)
            if n:
                mean = np.mean([s["value"][:n] for s in series], axis=0)
                label = f"{arm} (mean of {len(series)} seeds)"
                ax.plot(series[0]["step"][:n], mean, color=f"C{i}", linewidth=1.8, label=label)
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[-1].set_xlabel("RL step (eval_*: greedy held-out; step 0 is the base model)")
    fig.suptitle("Tool arithmetic: GRPO with and without the Python tool")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
