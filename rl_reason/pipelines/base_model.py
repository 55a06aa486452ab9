"""The default experiment's base model: stage 1 (pretraining) and the shipped result.

R1-Zero starts from a base model that someone else pretrained. Ours is committed to the
repository as a Hugging Face directory (`SHIPPED_BASE`) and loaded with the public
`models.from_pretrained` and `rl_reason.infra.tokenizer.load_tokenizer`, the path a Qwen checkpoint
takes. `python -m experiments.pretrain_base` rebuilds it (`run`); the default experiment with
`--config.base=scratch` runs the same stage 1 inline (`train_base`).

The directory holds config.json, model.safetensors, tokenizer.model, tokenizer_config.json,
`base_info.json` (the stage-1 settings, the pretraining log and the held-out greedy evaluation)
and a README.md written from it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from models import from_pretrained, save_pretrained
from models import get_config as model_preset
from rl_reason import verifiers
from rl_reason.infra import sharding
from rl_reason.infra.checkpoint import Checkpointer
from rl_reason.infra.progress import Progress
from rl_reason.infra.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from rl_reason.pipelines import pretrain
from rl_reason.pipelines.context import RunContext
from rl_reason.pipelines.grpo_stage import config_from
from rl_reason.tasks import arithmetic
from rl_reason.tasks.templates import ANSWER_CLOSE, SPECIAL_TOKENS
from rl_reason.trainer import GRPOConfig, GRPOTrainer

_REPO = Path(__file__).resolve().parents[2]  # rl_reason/pipelines/ -> the repository
SHIPPED_BASE = _REPO / "models" / "bases" / "arithmetic_chains_tiny"
INFO_FILE = "base_info.json"
# The config sections stage 1 depends on (top-level `seed` too).
STAGE1_SECTIONS = ("task", "data", "tokenizer", "model", "pretrain")
# data fields that size the held-out splits: a base may serve a run whose splits are no larger
# (a smaller split draws a subset of problems the corpus already excluded), never a larger one.
_SPLIT_SIZES = ("eval_size", "rl_pool_size")


def stage1_settings(config) -> dict[str, Any]:
    """The JSON-able part of `config` that determines the base model."""
    settings = {"seed": config.seed}
    for name in STAGE1_SECTIONS:
        settings[name] = config[name].to_dict()
    return settings


def resolve_base(name: str) -> Path | None:
    """`config.base` as a directory: "shipped" is `SHIPPED_BASE`, "scratch" is None (run stage
    1), anything else a path to a Hugging Face directory written by `save_base`."""
    if name == "scratch":
        return None
    if name == "shipped":
        return SHIPPED_BASE
    return Path(name).expanduser()


# ----------------------------------------------------------------------------- evaluation


def stop_token_ids(tokenizer) -> tuple[int, int]:
    """A response ends at eos or at the closing answer tag (nothing after it is read)."""
    return (tokenizer.eos_id, tokenizer.piece_to_id(ANSWER_CLOSE))


def response_stats(texts: list[str], examples: list[dict]) -> dict[str, float]:
    """Means over the responses: steps written, every step right, and for each number of
    operations k the share of problems with k operations (`frac_ops{k}`) and of those answered
    right (`frac_correct_ops{k}`); `accuracy_by_ops` divides them."""
    check = verifiers.get(arithmetic.VERIFIER)
    n_ops = [len(ex["steps"]) for ex in examples]
    correct = [check(t, ex).correct for t, ex in zip(texts, examples, strict=True)]
    stats = {
        "frac_with_steps": float(np.mean([arithmetic.has_steps(t) for t in texts])),
        "frac_process_correct": float(
            np.mean(
                [arithmetic.process_correct(t, ex) for t, ex in zip(texts, examples, strict=True)]
            )
        ),
    }
    # Every op count up to the largest any task draws, so that every process and chunk reports
    # the same names (the trainer sums them across chunks).
    for k in range(1, max(n_ops) + 1):
        stats[f"frac_ops{k}"] = float(np.mean([n == k for n in n_ops]))
        stats[f"frac_correct_ops{k}"] = float(
            np.mean([c and n == k for c, n in zip(correct, n_ops, strict=True)])
        )
    return stats


def accuracy_by_ops(ev: Mapping[str, float]) -> dict[str, float]:
    """{"2": accuracy on 2-operation problems, ...} from an evaluation with `response_stats`."""
    out = {}
    for name, share in ev.items():
        if name.startswith("frac_ops") and share > 0:
            k = name.removeprefix("frac_ops")
            out[k] = ev[f"frac_correct_ops{k}"] / share
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def evaluate(
    graphdef, params, tokenizer, task, examples: Sequence[dict], grpo_cfg: GRPOConfig, mesh
) -> dict[str, float]:
    """The default experiment's greedy evaluation ("before RL"), without RL: same prompts,
    stops, budget and batching, so its numbers are the ones a run starting here reports."""
    with verifiers.VerifierPool(1, timeout_s=grpo_cfg.verifier_timeout_s) as pool:
        trainer = GRPOTrainer(
            grpo_cfg,
            graphdef=graphdef,
            params=params,
            tokenizer=tokenizer,
            task=task,
            train_batches=iter(()),
            eval_examples=examples,
            pool=pool,
            stop_token_ids=stop_token_ids(tokenizer),
            response_stats=response_stats,
            mesh=mesh,
        )
        return trainer.evaluate(samples=0)


# ----------------------------------------------------------------------------- stage 1


def train_base(
    config,
    corpus: Sequence[str],
    mesh,
    tokenizer_dir: str | os.PathLike,
    echo: Callable[[str], None] = print,
    should_stop: Callable[[int], bool] | None = None,
    symbols: Sequence[str] = SPECIAL_TOKENS,
    checkpoint_dir: str | os.PathLike | None = None,
) -> tuple[Tokenizer, Any, nnx.State, dict[str, Any]] | None:
    """Stage 1: a sentencepiece tokenizer (written to `tokenizer_dir`/tokenizer.model, with
    `symbols` single tokens) and a decoder pretrained on `corpus`. Returns (tokenizer,
    graphdef, params, facts), or None when `should_stop` interrupted it.

    With `checkpoint_dir`, pretraining saves there every twentieth of its steps (and when
    stopped) and a later call with the same directory and config continues from the newest
    checkpoint, bit for bit the straight run (an hour-long base model survives a kill)."""
    pre_cfg = config_from(pretrain.PretrainConfig, config.pretrain)
    checkpointer, resumed_from, elapsed = None, None, [0.0]
    if checkpoint_dir is not None:
        every = max(1, pre_cfg.steps // 20)
        checkpointer = Checkpointer(
            checkpoint_dir, save_every=every, max_to_keep=1, async_save=False
        )
        resumed_from = checkpointer.latest_step()
    tokenizer_path = Path(tokenizer_dir) / "tokenizer.model"
    if resumed_from is not None and tokenizer_path.exists():
        # The checkpoint's embeddings index this tokenizer's pieces: keep it, never retrain it.
        tokenizer = Tokenizer.load(tokenizer_path)
        echo(f"[stage 1] continuing from the checkpoint of step {resumed_from}")
    else:
        tokenizer = train_sentencepiece(
            corpus[: config.tokenizer.train_texts],
            tokenizer_path,
            vocab_size=config.tokenizer.vocab_size,
            user_defined_symbols=symbols,
        )
    model_cfg = model_preset(
        config.model.preset, vocab_size=tokenizer.vocab_size, **dict(config.model.overrides)
    )
    graphdef, params = sharding.create_model(model_cfg, mesh, seed=config.seed)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    echo(
        f"[stage 1] base model: {n_params / 1e6:.2f}M params, vocab {tokenizer.vocab_size}, "
        f"corpus {len(corpus)} texts, {pre_cfg.steps} steps, mesh {dict(mesh.shape)}"
    )
    progress = Progress("stage 1", pre_cfg.steps, echo, unit="steps")
    t0 = time.perf_counter()

    def log(step: int, loss: float, seconds: float) -> None:
        elapsed[0] = seconds
        progress.update(step, loss=loss)

    try:
        params, losses = pretrain.pretrain(
            graphdef,
            params,
            tokenizer,
            corpus,
            pre_cfg,
            log,
            mesh=mesh,
            should_stop=should_stop,
            checkpointer=checkpointer,
        )
    finally:
        if checkpointer is not None:
            checkpointer.close()
    if len(losses) < pre_cfg.steps:
        return None
    facts = {
        "pretrain_steps": pre_cfg.steps,
        "pretrain_final_loss": losses[-1] if losses else None,
        "pretrain_seconds": time.perf_counter() - t0,
        "num_params": n_params,
        **plateau(losses),
    }
    if resumed_from is not None:
        # The loop's time over every process that ran it (this one's setup is not counted).
        facts.update(pretrain_resumed_from=resumed_from, pretrain_seconds=elapsed[0])
    return tokenizer, graphdef, params, facts


def plateau(losses) -> dict[str, float]:
    """Whether pretraining had levelled off: the mean loss of the last tenth of the steps, of
    the tenth before it, and their relative drop (near 0 on a plateau)."""
    k = len(losses) // 10
    if k < 1:
        return {}
    last, prev = float(np.mean(losses[-k:])), float(np.mean(losses[-2 * k : -k]))
    return {
        "pretrain_loss_last_tenth": last,
        "pretrain_loss_prev_tenth": prev,
        "pretrain_plateau_drop": (prev - last) / prev if prev else 0.0,
    }


# ----------------------------------------------------------------------------- files


def save_base(
    out_dir: str | os.PathLike,
    graphdef,
    params,
    tokenizer: Tokenizer,
    info: Mapping[str, Any],
    readme_text: str | None = None,
) -> Path:
    """The base as a Hugging Face directory plus `base_info.json` and a README (`readme_text`,
    or the arithmetic-chains base's from `info`); written beside and renamed into place, so
    an interrupted save leaves the old directory (if any) whole."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    ids["pad_token_id"] = tokenizer.pad_id
    save_pretrained(nnx.merge(graphdef, params), tmp, extra_config=ids)
    shutil.copy2(tokenizer.source, tmp / "tokenizer.model")
    pieces = {i: tokenizer.id_to_piece(i) for i in (tokenizer.bos_id, tokenizer.eos_id)}
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": pieces[tokenizer.bos_id],
        "eos_token": pieces[tokenizer.eos_id],
        "pad_token": tokenizer.id_to_piece(tokenizer.pad_id),
        "add_bos_token": True,
        "add_eos_token": False,
    }
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    (tmp / "README.md").write_text(readme(info) if readme_text is None else readme_text)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)
    return out_dir


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / INFO_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def check_compatible(info: Mapping[str, Any], config, path: Path) -> None:
    """A base pretrained with other problems (task, seed) or smaller held-out splits may have
    seen this run's held-out problems in its corpus: refuse it, saying what differs."""
    settings = info.get("settings")
    if not settings:
        return  # a Hugging Face model of other provenance: the user answers for its corpus
    want = stage1_settings(config)
    diffs = [k for k in ("seed", "task") if settings[k] != want[k]]
    diffs += [
        f"data.{k} ({want['data'][k]} > {settings['data'][k]})"
        for k in _SPLIT_SIZES
        if want["data"][k] > settings["data"][k]
    ]
    if diffs:
        raise ValueError(
            f"the base model at {path} was pretrained for other splits: {', '.join(diffs)} "
            f"differ from this config (base: seed {settings['seed']}, task {settings['task']}); "
            "its corpus may hold this run's held-out problems. Use --config.base=scratch to "
            "pretrain a matching base, or restore those fields"
        )


def load_base(
    path: str | os.PathLike, mesh, config=None
) -> tuple[Tokenizer, Any, nnx.State, dict[str, Any]]:
    """(tokenizer, graphdef, params, info) of the base at `path`, placed on `mesh`; with
    `config`, first checked to have been pretrained for this config's splits."""
    path = Path(path)
    info = read_info(path)
    if config is not None:
        check_compatible(info, config, path)
    model = from_pretrained(path, mesh=mesh)
    tokenizer = load_tokenizer(path)
    tokenizer.assert_fits(model.cfg.vocab_size)
    graphdef, params = nnx.split(model)
    return tokenizer, graphdef, params, info


def readme(info: Mapping[str, Any]) -> str:
    ev = info["eval"]
    by_ops = ", ".join(f"{k} ops {v:.3f}" for k, v in ev["accuracy_by_ops"].items())
    s = info["settings"]
    facts = info["pretrain"]
    size = facts["num_params"]
    return f"""# Base model of the default experiment

The model R1-Zero in miniature starts from (`python -m experiments.r1_zero_tiny`): a
{size / 1e6:.2f}M-parameter Llama-layout decoder and a {s["tokenizer"]["vocab_size"]}-piece
sentencepiece tokenizer (split digits), pretrained from scratch on {s["data"]["corpus_size"]:,}
synthetic texts about arithmetic chains (task {s["task"]}). Half of the texts show worked
steps, mostly outside the R1 prompt template; inside it the model has mostly seen bare answers.
None of the held-out or RL problems is in the corpus.

Made by (on the 2-core CPU machine, {facts["pretrain_seconds"]:.0f} s of pretraining):

    {info["command"]}

Corpus and model seed {s["seed"]}; pretraining {facts["pretrain_steps"]} steps, final loss
{facts["pretrain_final_loss"]:.4f}. The full config is `settings` in `{INFO_FILE}`.

Held-out greedy evaluation ({ev["num_examples"]} problems, the default experiment's
"before RL" figures; prompt budget {info["eval_settings"]["max_prompt_len"]}, response
budget {info["eval_settings"]["max_new_tokens"]} tokens):

| | value |
|---|---|
| correct | {ev["correct"]} / {ev["num_examples"]} (accuracy {ev["accuracy"]:.4f}) |
| mean response tokens | {ev["mean_response_tokens"]:.4f} |
| responses that write steps | {ev["frac_with_steps"]:.3f} |
| accuracy by number of operations | {by_ops} |

`tests/test_shipped_base.py` loads this directory and checks these counts exactly.

Files: `config.json` + `model.safetensors` (float32; `transformers` loads them as
`LlamaForCausalLM`), `tokenizer.model` + `tokenizer_config.json`, `{INFO_FILE}`.

```python
from models import from_pretrained
from rl_reason.infra.tokenizer import load_tokenizer
model = from_pretrained("models/bases/arithmetic_chains_tiny")
tokenizer = load_tokenizer("models/bases/arithmetic_chains_tiny")
```
"""


# ----------------------------------------------------------------------------- the pipeline


def run(config) -> dict[str, Any]:
    """`python -m experiments.pretrain_base`: stage 1, the held-out evaluation, the directory.

    Writes `config.out_dir` (default: the shipped base); returns its `base_info.json`.
    """
    from rl_reason.pipelines import r1_zero  # the default experiment's splits

    # No workdir: config.workdir is the default experiment's, and nothing is written there.
    ctx = RunContext.start(config, workdir=None)
    echo, mesh = ctx.echo, ctx.mesh
    grpo_cfg = config_from(GRPOConfig, config.grpo)
    data = r1_zero.build_data(config)
    with ctx.preemptible() as guard, tempfile.TemporaryDirectory() as tmp:
        base = train_base(config, data["corpus"], mesh, tmp, echo, guard.should_stop)
        if base is None:
            echo("[stage 1] interrupted: nothing saved, a rerun starts again")
            return {"preempted": True}
        tokenizer, graphdef, params, facts = base
        ev = evaluate(graphdef, params, tokenizer, data["task"], data["eval_set"], grpo_cfg, mesh)
        n = len(data["eval_set"])
        info = {
            "command": " ".join(["python -m experiments.pretrain_base", *sys.argv[1:]]),
            "settings": stage1_settings(config),
            "pretrain": facts,
            "eval_settings": {
                "max_prompt_len": grpo_cfg.max_prompt_len,
                "max_new_tokens": grpo_cfg.max_new_tokens,
            },
            "eval": {
                "num_examples": n,
                "correct": int(round(ev["accuracy"] * n)),
                "accuracy": ev["accuracy"],
                "mean_response_tokens": ev["mean_response_tokens"],
                "frac_with_steps": ev["frac_with_steps"],
                "frac_process_correct": ev["frac_process_correct"],
                "accuracy_by_ops": accuracy_by_ops(ev),
            },
        }
        if ctx.is_main:
            out = save_base(config.out_dir, graphdef, params, tokenizer, info)
            echo(
                f"[base] held-out greedy: {info['eval']['correct']}/{n} correct, mean "
                f"{ev['mean_response_tokens']:.2f} tokens; by ops {info['eval']['accuracy_by_ops']}"
            )
            echo(f"wrote {out}")
    return info
