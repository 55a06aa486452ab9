"""Evaluate (or export) a recipe's policy: a GRPO checkpoint of its workdir or a Hugging Face dir.

    python -m experiments.evaluate --config=experiments/configs/NAME.py --checkpoint=latest
        --checkpoint=40 | latest | best | WORKDIR/checkpoints[/40] | an HF model directory
        [--split=test --samples=8 --num_examples=500 --out=FILE.json]
    python -m experiments.export --config=experiments/configs/NAME.py --checkpoint=latest

`evaluate` reports greedy accuracy and mean@k, unbiased pass@k and maj@k over k sampled answers
(k = `samples`, default the config's grpo.eval_samples) on the held-out split, computed by
the trainer's own `Evaluator` (no optimizer is built) with the config's prompts, stop tokens,
eval_temperature and seed: the final checkpoint of a run therefore reproduces the run's own
final evaluation, number for number. Only the params of a GRPO checkpoint are read, onto the
config's policy (its base weights read from config.model.path, as in the run); an HF
directory (e.g. WORKDIR/export) replaces the policy and needs no checkpoint. Checkpoints are
opened read-only, so a run still writing into the
same workdir is not disturbed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax

from models import partitioning
from rl_reason import verifiers
from rl_reason.infra import sharding
from rl_reason.infra.checkpoint import Checkpointer
from rl_reason.pipelines import grpo_stage as grpo_run
from rl_reason.pipelines import policy, recipe, recipe_data, recipe_options
from rl_reason.rollout.rounds import Rounds
from rl_reason.trainer import GRPOConfig
from rl_reason.trainer.evaluator import Evaluator

log = logging.getLogger(__name__)

# GRPOConfig fields that change what an evaluation measures; a checkpoint written with other
# values is evaluated with the config's, and the difference is logged.
_EVAL_FIELDS = (
    "max_prompt_len",
    "max_new_tokens",
    "sampling.temperature",
    "sampling.top_k",
    "sampling.top_p",
    "eval_temperature",
    "seed",
)
_MISSING = object()


def _field(tree, path: str):
    """A dotted field of a config dataclass or of its saved dict (_MISSING if absent)."""
    for part in path.split("."):
        tree = tree.get(part, _MISSING) if isinstance(tree, dict) else getattr(tree, part, _MISSING)
        if tree is _MISSING:
            break
    return tree


def check_supported(config, command: str) -> None:
    """Recipe configs only; the other pipelines say so in one line."""
    if config.get("pipeline") != "recipe":
        raise ValueError(
            f"{command} supports recipe configs (pipeline 'recipe': countdown_qwen2_5_3b, "
            "gsm8k_qwen2_5_0_5b, math_qwen2_5_math_1_5b, humaneval_r1_zero, mbpp_r1_zero); "
            f"config.pipeline is {config.get('pipeline')!r}, whose run evaluates before and "
            "after RL itself (WORKDIR/summary.json)"
        )


@dataclasses.dataclass(frozen=True)
class Source:
    """What to evaluate: an HF directory (`step` None), or `step` of a checkpoints directory."""

    path: Path
    step: int | None = None

    @property
    def is_hf(self) -> bool:
        return self.step is None

    @property
    def name(self) -> str:
        return self.path.name if self.is_hf else f"step_{self.step}"


def resolve(config, checkpoint: str) -> Source:
    """`checkpoint` (a step number, latest or best of config.workdir's checkpoints; a workdir,
    a checkpoints directory or one of its step directories; an HF model directory) as a
    Source, checked to exist."""
    checkpoint = str(checkpoint).strip()
    path = Path(checkpoint).expanduser()
    if (path / "config.json").is_file():
        return Source(path)
    default_dir = Path(config.workdir) / "checkpoints"
    if checkpoint.isdigit() or checkpoint in ("latest", "best"):
        directory, which = default_dir, checkpoint
    elif path.is_dir() and path.name.isdigit():
        directory, which = path.parent, path.name
    elif (path / "checkpoints").is_dir():
        directory, which = path / "checkpoints", "latest"
    elif path.is_dir():
        directory, which = path, "latest"
    else:
        raise FileNotFoundError(
            f"--checkpoint={checkpoint!r} is neither a step number, 'latest', 'best', a "
            "checkpoints directory (or one of its step directories) nor a Hugging Face model "
            "directory with a config.json"
        )
    ckpt = Checkpointer(directory, save_every=1, read_only=True, best_metric="eval_accuracy")
    try:
        steps = ckpt.all_steps()
        if which == "latest":
            step = ckpt.latest_step()
        elif which == "best":
            step = ckpt.best_step()
            if step is None:
                raise ValueError(
                    f"no checkpoint in {directory} carries eval_accuracy (the run had "
                    "grpo.eval_every = 0): ask for 'latest' or a step number"
                )
        else:
            step = int(which)
    finally:
        ckpt.close()
    if step is None or step not in steps:
        raise FileNotFoundError(
            f"no checkpoint {'step ' + str(step) if step is not None else ''} in {directory}; "
            f"saved steps: {steps}"
        )
    return Source(directory, step)


def restore(config, source: Source, mesh) -> tuple[policy.Policy, recipe.Setup, dict]:
    """The policy of `source` (params from the checkpoint: no optimizer is built or read), the
    recipe setup it was built from, and the checkpoint's meta ({} for an HF directory)."""
    s = recipe.setup(config, mesh, **({"path": source.path, "lora": False} if source.is_hf else {}))
    meta: dict[str, Any] = {}
    if source.is_hf:
        return s.policy, s, meta
    shardings = partitioning.state_shardings(s.policy.params, mesh)
    target = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
        s.policy.params,
        shardings,
    )
    ckpt = Checkpointer(source.path, save_every=1, read_only=True)
    try:
        params, meta = ckpt.restore_item("params", target, source.step)
    finally:
        ckpt.close()
    saved = meta.get("config", {})
    differs = {
        k: (_field(saved, k), _field(s.grpo, k))
        for k in _EVAL_FIELDS
        if _field(saved, k) is not _MISSING and _field(saved, k) != _field(s.grpo, k)
    }
    if differs:
        log.warning(
            "checkpoint %s/%d was trained with other settings than this config; evaluating "
            "with the config's (saved, now): %s",
            source.path,
            source.step,
            differs,
        )
    return dataclasses.replace(s.policy, params=params), s, meta


def evaluate(
    config,
    checkpoint: str,
    *,
    split: str | None = None,
    samples: int | None = None,
    num_examples: int | None = None,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate `checkpoint` (see `resolve`) on the held-out split; writes the result JSON
    (default WORKDIR/eval/<checkpoint>_<split>.json) and returns it.

    `split` defaults to config.data.eval_split, `num_examples` to config.data.eval_size (0:
    all), `samples` (k) to config.grpo.eval_samples.
    """
    check_supported(config, "experiments.evaluate")
    if samples is not None and samples < 1:
        raise ValueError(f"samples must be >= 1 (k for mean@k / pass@k / maj@k), got {samples}")
    if num_examples is not None and num_examples < 0:
        raise ValueError(f"num_examples must be >= 0 (0 = the whole split), got {num_examples}")
    _, _, data, _ = recipe_options.sections(config)
    source = resolve(config, checkpoint)
    mesh = sharding.make_mesh(grpo_run.config_from(sharding.MeshConfig, config.mesh))
    cfg = grpo_run.config_from(GRPOConfig, config.grpo)
    split = split or data.eval_split
    pol, s, meta = restore(config, source, mesh)
    examples = recipe_data.held_out_examples(s.dataset_task, data, split=split, n=num_examples)
    with verifiers.VerifierPool(cfg.verifier_workers, timeout_s=cfg.verifier_timeout_s) as pool:
        rounds = Rounds(
            s.grpo,
            tokenizer=s.tokenizer,
            task=s.task,
            pool=pool,
            mesh=mesh,
            stop_token_ids=s.stop_token_ids,
        )
        frozen = () if pol.frozen is None else (pol.frozen,)
        metrics = Evaluator(rounds).evaluate(
            (pol.graphdef, pol.params, *frozen), examples, samples=samples
        )
    result = {
        "checkpoint": str(source.path) if source.is_hf else f"{source.path}/{source.step}",
        "step": source.step if not source.is_hf else None,
        "trained_steps": meta.get("trainer", {}).get("step"),
        "task": s.dataset_task.name,
        "split": split,
        "num_examples": len(examples),
        "samples": samples or cfg.eval_samples,
        "eval_temperature": cfg.eval_temperature,
        "metrics": metrics,
    }
    if jax.process_index() == 0:
        path = Path(out) if out else Path(config.workdir) / "eval" / f"{source.name}_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        result["written_to"] = str(path)
    return result


def markdown(result: dict[str, Any]) -> str:
    """The evaluation as a markdown table with a one-line header."""
    head = (
        f"{result['task']} {result['split']} ({result['num_examples']} problems, "
        f"k={result['samples']}, T={result['eval_temperature']}): {result['checkpoint']}"
    )
    return head + "\n" + recipe.results_table({"value": result["metrics"]})


def export(config, checkpoint: str, out: str | Path | None = None) -> Path:
    """`checkpoint`'s policy (LoRA merged) as a Hugging Face directory with the tokenizer files
    (default WORKDIR/export_step_<N>)."""
    check_supported(config, "experiments.export")
    source = resolve(config, checkpoint)
    if source.is_hf:
        raise ValueError(f"{source.path} is already a Hugging Face directory; nothing to export")
    mesh = sharding.make_mesh(grpo_run.config_from(sharding.MeshConfig, config.mesh))
    pol, s, _ = restore(config, source, mesh)
    out = Path(out) if out else Path(config.workdir) / f"export_step_{source.step}"
    return policy.export_policy(pol.graphdef, pol.params, pol.frozen, out, source_dir=s.path)
