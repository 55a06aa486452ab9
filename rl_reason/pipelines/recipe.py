"""Published zero-RL recipes on a real pretrained model: GRPO from a local Hugging Face checkpoint.

    python -m experiments.train --config=experiments/configs/gsm8k_qwen2_5_0_5b.py \\
        --config.model.path=/ckpt/Qwen2.5-0.5B --config.data.manual_dir=~/data/gsm8k

`run(config)` (pipeline "recipe") does, in order:

  policy     `models.from_pretrained(config.model.path, dtype=, param_dtype=, mesh=)`. With
             config.lora.rank > 0 LoRA adapters are added and only they train; the frozen base is
             also the KL reference. A resumed run reads the base from the path again and the
             adapters (or, without LoRA, all weights) from the checkpoint.
  tokenizer  `load_tokenizer(path)`, checked against the embedding rows.
  prompts    config.prompt.format "r1_zero": the task's plain R1-Zero template (`task.prompt`),
             encoded after the tokenizer's bos (if it has one). "chat": the tokenizer's chat
             template around [system] + user(question + suffix), encoded exactly as the template
             wrote it (a template that writes bos has it once; nothing is added).
  stop       eos, plus the template's end: `</answer>` when it is a single token (r1_zero), or
             the end-of-turn token that the chat template closes an assistant reply with (chat).
  data       the task's tfds builder: the train split through `data.train_iterator`, and the
             first data.eval_size examples of the held-out split (which may come from another
             manual_dir, e.g. MATH-500, built under its own data_dir).
  stage      `grpo_run.run_grpo`: evaluate, train, evaluate, with checkpoints and preemption.
  outputs    workdir/summary.json, metrics.jsonl, tb/, curves.png, and workdir/export/: the final
             policy (LoRA merged) in Hugging Face layout with the tokenizer files beside it.

Smoke runs set config.model.tiny to a family name instead of a path: a tiny random model of
that family (our `save_pretrained` of a random `Transformer`) and a byte-level BPE tokenizer
trained on the task's own rows are written to workdir/tiny_model and used as the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from models import LoRAConfig, Transformer, add_lora, from_pretrained, merge_lora, save_pretrained
from models.lora import TARGETS
from rl_reason import plugins
from rl_reason.infra import data as data_lib
from rl_reason.infra import sharding
from rl_reason.infra.metrics import MetricsConfig, plot_curves
from rl_reason.infra.preemption import PreemptionGuard
from rl_reason.infra.tokenizer import TextTokenizer, load_tokenizer
from rl_reason.pipelines import grpo_stage as grpo_run
from rl_reason.pipelines.tiny_model import TINY_FAMILIES, build_tiny_model
from rl_reason.tasks.templates import ANSWER_CLOSE, SPECIAL_TOKENS
from rl_reason.trainer import GRPOConfig

log = logging.getLogger(__name__)

PROMPT_FORMATS = ("r1_zero", "chat")
CURVES = ("accuracy", "reward_mean", "response_length_mean", "eval_accuracy")
EXPORT_DIR = "export"
TINY_DIR = "tiny_model"
# Files that make an export directory a complete Hugging Face model with its tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
# config.json keys of the source checkpoint carried into the export (not architecture keys).
_CARRIED_CONFIG_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")

AnyTokenizer = TextTokenizer


# -- config sections --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """config.model: which checkpoint, and its numerics ("" / 0: as the checkpoint says)."""

    path: str = ""  # a local Hugging Face model directory
    tiny: str = ""  # smoke runs: a family (llama, qwen2, qwen3, gemma2) built into the workdir
    dtype: str = ""  # compute dtype
    param_dtype: str = ""  # storage dtype of the weights (full fine-tuning keeps float32 here)
    max_seq_len: int = 0

    def __post_init__(self) -> None:
        if bool(self.path) == bool(self.tiny):
            raise ValueError(
                "config.model: set exactly one of path (a local Hugging Face model directory) "
                f"and tiny (a family for smoke runs: {sorted(TINY_FAMILIES)}); got "
                f"path={self.path!r}, tiny={self.tiny!r}"
            )
        if self.tiny and self.tiny not in TINY_FAMILIES:
            raise ValueError(
                f"config.model.tiny={self.tiny!r} is not one of {sorted(TINY_FAMILIES)}"
            )


@dataclasses.dataclass(frozen=True)
class PromptOptions:
    """config.prompt: how a question becomes the prompt text."""

    format: str = "r1_zero"  # one of PROMPT_FORMATS
    system: str = ""  # chat: a system message ("" = none: the template's own default, if any)
    suffix: str = ""  # chat: text appended to the question in the user message

    def __post_init__(self) -> None:
        if self.format not in PROMPT_FORMATS:
            raise ValueError(f"config.prompt.format={self.format!r}; valid: {PROMPT_FORMATS}")
        if self.format == "r1_zero" and (self.system or self.suffix):
            raise ValueError(
                "config.prompt.system / suffix apply to the chat format only; the r1_zero "
                "format is the task's own template (set prompt.format='chat' to use them)"
            )


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """config.data: where the task's tfds dataset is built and which splits are used.

    Directories may start with ``~`` and contain ``{workdir}`` (replaced by config.workdir).
    """

    data_dir: str = "~/tensorflow_datasets"
    manual_dir: str = ""  # the downloaded files (gsm8k, math); "" for generated tasks
    train_split: str = "train"
    eval_split: str = "test"
    eval_data_dir: str = ""  # "" = data_dir
    eval_manual_dir: str = ""  # "" = manual_dir
    eval_size: int = 0  # the first N held-out examples; 0 = all

    def __post_init__(self) -> None:
        if self.eval_size < 0:
            raise ValueError(f"config.data.eval_size must be >= 0 (0 = all), got {self.eval_size}")
        if (
            self.eval_manual_dir
            and self.eval_manual_dir != self.manual_dir
            and self.eval_dir == self.data_dir
        ):
            # tfds keeps one prepared dataset per data_dir and reuses it for any files offered.
            raise ValueError(
                f"config.data.eval_manual_dir={self.eval_manual_dir!r} differs from manual_dir "
                f"{self.manual_dir!r}, so the held-out dataset needs its own eval_data_dir "
                "(tfds would reuse the training dataset built in data_dir)"
            )

    def in_workdir(self, workdir: str | Path) -> DataOptions:
        """These options with ``{workdir}`` replaced in every directory."""
        sub = {
            f.name: getattr(self, f.name).replace("{workdir}", str(workdir))
            for f in dataclasses.fields(self)
            if f.name.endswith("_dir")
        }
        return dataclasses.replace(self, **sub)

    @property
    def eval_dir(self) -> str:
        return self.eval_data_dir or self.data_dir

    @property
    def eval_files(self) -> str:
        return self.eval_manual_dir or self.manual_dir


@dataclasses.dataclass(frozen=True)
class LoraOptions:
    """config.lora: rank 0 trains every weight; rank > 0 trains LoRA adapters only."""

    rank: int = 0
    alpha: float = 32.0
    targets: str = ",".join(TARGETS)  # comma-separated names from models.lora.TARGETS

    def lora_config(self) -> LoRAConfig | None:
        if self.rank < 0:
            raise ValueError(f"config.lora.rank must be >= 0 (0 = no LoRA), got {self.rank}")
        if self.rank == 0:
            return None
        targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        return LoRAConfig(rank=self.rank, alpha=self.alpha, targets=targets)


def sections(config) -> tuple[ModelOptions, PromptOptions, DataOptions, LoraOptions]:
    """The recipe's config sections as checked dataclasses (unknown fields are errors)."""
    return (
        grpo_run.config_from(ModelOptions, config.model),
        grpo_run.config_from(PromptOptions, config.prompt),
        grpo_run.config_from(DataOptions, config.data).in_workdir(config.workdir),
        grpo_run.config_from(LoraOptions, config.lora),
    )


# -- task, prompts, stop tokens -----------------------------------------------------------------


def make_task(config):
    """The dataset task of config.task (name and builder parameters)."""
    from rl_reason.tasks import get_task

    return get_task(config.task.name, **dict(config.task.params))


@dataclasses.dataclass(frozen=True)
class ChatTask:
    """A task whose prompts are the tokenizer's chat template around the question.

    The template writes the bos it wants (or none), so the trainer must add none.
    """

    prompt_add_bos: ClassVar[bool] = False
    task: Any
    tokenizer: Any
    system: str = ""
    suffix: str = ""

    @property
    def verifier_name(self) -> str:
        return self.task.verifier_name

    def messages(self, question: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": "user", "content": question + self.suffix}]

    def prompt(self, example: Mapping[str, Any]) -> str:
        return self.tokenizer.apply_chat_template(self.messages(example["question"]))


_REPLY_SENTINEL = "\u2063reply\u2063"


def chat_end_token(tokenizer: AnyTokenizer) -> int | None:
    """The special token a chat template closes an assistant reply with (<|im_end|>,
    <|eot_id|>, <end_of_turn>), or None if what follows a reply is not a special token."""
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "?"}, {"role": "assistant", "content": _REPLY_SENTINEL}],
            add_generation_prompt=False,
        )
    except Exception as e:  # a template may refuse this conversation; then eos alone stops
        log.warning(
            "%s: cannot find the end-of-turn token (%s); stopping at eos only", tokenizer.source, e
        )
        return None
    at = rendered.rfind(_REPLY_SENTINEL)
    if at < 0:
        return None
    tail = tokenizer.encode(rendered[at + len(_REPLY_SENTINEL) :])
    return tail[0] if tail and tail[0] in set(tokenizer.special_ids.values()) else None


def stop_token_ids(tokenizer: AnyTokenizer, prompt_format: str) -> tuple[int, ...]:
    """eos and the template's end (see the module docstring), without duplicates."""
    stops = [tokenizer.eos_id]
    if prompt_format == "r1_zero":
        ids = tokenizer.encode(ANSWER_CLOSE)
        if len(ids) == 1:
            stops.append(ids[0])
    else:
        end = chat_end_token(tokenizer)
        if end is not None:
            stops.append(end)
    return tuple(dict.fromkeys(stops))


def prompting(tokenizer: AnyTokenizer, task, prompt: PromptOptions):
    """(the tokenizer the trainer encodes prompts with, the task it takes prompts from)."""
    if prompt.format == "r1_zero":
        return tokenizer, task
    if tokenizer.chat_template is None:
        raise ValueError(
            f"config.prompt.format='chat', but {tokenizer.source} has no chat template: use "
            "prompt.format='r1_zero' or a tokenizer with one"
        )
    return tokenizer, ChatTask(task, tokenizer, prompt.system, prompt.suffix)


# -- data ---------------------------------------------------------------------------------------


def _expand(path: str) -> Path | None:
    return Path(path).expanduser() if path else None


def data_source(task, split: str, data_dir: str, manual_dir: str) -> Sequence[Any]:
    """A split of the task's dataset; with several processes, process 0 builds it first."""

    def open_split():
        return task.data_source(split, data_dir=_expand(data_dir), manual_dir=_expand(manual_dir))

    if jax.process_count() == 1:
        return open_split()
    # Builders write to temporary names and rename: one process builds, the others then find it
    # prepared (a shared disk) or build their own copy (local disks), never concurrently.
    if jax.process_index() == 0:
        source = open_split()
    multihost_utils.sync_global_devices(f"rl_reason.pipelines.recipe.data:{split}")
    return source if jax.process_index() == 0 else open_split()


def train_source(task, data: DataOptions) -> Sequence[Any]:
    return data_source(task, data.train_split, data.data_dir, data.manual_dir)


def held_out_examples(
    task, data: DataOptions, *, split: str | None = None, n: int | None = None
) -> list[dict]:
    """The first n (default data.eval_size; 0 = all) usable examples of the held-out split."""
    source = data_source(task, split or data.eval_split, data.eval_dir, data.eval_files)
    n = data.eval_size if n is None else n
    return data_lib.eval_examples(source, n or None, task=task)


# -- the policy -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Policy:
    """`nnx.split` of the policy: params are what trains (all weights, or the LoRA adapters),
    frozen the base weights under LoRA (else None)."""

    graphdef: Any
    params: Any
    frozen: Any
    model_cfg: Any
    lora: LoRAConfig | None

    def model(self) -> Transformer:
        states = (self.params,) if self.frozen is None else (self.params, self.frozen)
        return nnx.merge(self.graphdef, *states)

    @property
    def trainer_kwargs(self) -> dict[str, Any]:
        return {} if self.frozen is None else {"frozen": self.frozen}


def load_policy(
    path: str | Path,
    model: ModelOptions,
    lora: LoRAConfig | None,
    mesh,
    *,
    seed: int = 0,
) -> Policy:
    """The checkpoint at `path` on `mesh`, with fresh LoRA adapters when `lora` is set."""
    overrides = {"max_seq_len": model.max_seq_len} if model.max_seq_len else {}
    transformer = from_pretrained(
        path,
        dtype=model.dtype or None,
        param_dtype=model.param_dtype or None,
        mesh=mesh,
        **overrides,
    )
    if lora is None:
        graphdef, params = nnx.split(transformer)
        return Policy(graphdef, params, None, transformer.cfg, None)
    add_lora(transformer, lora, nnx.Rngs(seed))
    graphdef, adapters, base = nnx.split(transformer, nnx.LoRAParam, nnx.Param)
    return Policy(graphdef, adapters, base, transformer.cfg, lora)


def export_policy(
    graphdef, params, frozen, out_dir: str | Path, *, source_dir: str | Path | None = None
) -> Path:
    """The policy (LoRA merged) as a Hugging Face directory, with the source's tokenizer files
    and bos/eos/pad ids; every process must call it, process 0 writes."""
    states = (params,) if frozen is None else (params, frozen)
    if jax.process_count() > 1:
        # Weights sharded over hosts: every process takes part in gathering them to the host;
        # process 0 then holds each one whole (on its first device) and writes.
        states = tuple(multihost_utils.process_allgather(s, tiled=True) for s in states)
    out_dir = Path(out_dir)
    if jax.process_index() == 0:
        if jax.process_count() > 1:
            states = tuple(jax.tree.map(jnp.asarray, s) for s in states)
        model = nnx.merge(graphdef, *states)
        if nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
            model = merge_lora(model)
        extra = {}
        if source_dir is not None:
            source = json.loads((Path(source_dir) / "config.json").read_text())
            extra = {k: source[k] for k in _CARRIED_CONFIG_KEYS if source.get(k) is not None}
            out_dir.mkdir(parents=True, exist_ok=True)
            for name in TOKENIZER_FILES:
                if (Path(source_dir) / name).is_file():
                    shutil.copy2(Path(source_dir) / name, out_dir / name)
        save_pretrained(model, out_dir, extra_config=extra)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("rl_reason.pipelines.recipe.export")
    return out_dir


def _tiny_corpus(task, examples: Sequence[Mapping[str, Any]], prompt: PromptOptions) -> list[str]:
    texts = ["system\nuser\nassistant\n", prompt.system, prompt.suffix, *SPECIAL_TOKENS]
    for ex in examples:
        texts += [task.prompt(ex), str(ex.get("answer", "")), str(ex.get("solution", ""))]
    return [t for t in texts if t]


def model_path(config, task, model: ModelOptions, prompt: PromptOptions, data: DataOptions) -> Path:
    """config.model.path, or the tiny model of config.model.tiny (built on first use)."""
    if model.path:
        path = Path(model.path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"config.model.path={model.path!r} is not a Hugging Face model directory (no "
                "config.json): download the checkpoint and point the path at its directory"
            )
        return path
    path = Path(config.workdir) / TINY_DIR
    if (path / "config.json").is_file():
        return path
    if jax.process_index() == 0:
        rows = data_lib.eval_examples(train_source(task, data), None, task=task)
        rows += held_out_examples(task, data)
        build_tiny_model(path, model.tiny, _tiny_corpus(task, rows, prompt), seed=config.seed)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("rl_reason.pipelines.recipe.tiny_model")
    return path


# -- the pipeline -------------------------------------------------------------------------------


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
    encoder, task = prompting(tokenizer, dataset_task, prompt)
    stops = stop_token_ids(tokenizer, prompt.format)
    return Setup(path, encoder, task, dataset_task, stops, policy, grpo_cfg)


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()


def _echo(msg: str) -> None:
    print(msg, flush=True)


def run(config) -> dict[str, Any]:
    """The recipe's GRPO stage and export; returns the summary written to workdir/summary.json.

    Resumable: a workdir whose checkpoints hold a step continues from the newest readable one
    (the base weights are read from the checkpoint path again). SIGTERM saves at the next step
    boundary and returns early (summary["preempted"] is then True; nothing is exported).
    """
    plugins.load_from(config)  # before anything checks a registered name
    t_start = time.perf_counter()
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    echo = _echo if is_main else (lambda msg: None)
    _, _, data, _ = sections(config)
    metrics_cfg = grpo_run.config_from(MetricsConfig, config.metrics)
    mesh = sharding.make_mesh(grpo_run.config_from(sharding.MeshConfig, config.mesh))
    s = setup(config, mesh)
    cfg = s.grpo
    checkpointer = grpo_run.make_checkpointer(workdir, cfg)
    eval_set = held_out_examples(s.dataset_task, data)
    train_batches = data_lib.train_iterator(
        train_source(s.dataset_task, data),
        global_batch_size=cfg.prompts_per_step,
        seed=config.seed,
        task=s.dataset_task,
    )
    n_total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(s.policy.model())))
    n_trained = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s.policy.params))
    echo(
        f"[recipe] {s.path}: {n_total / 1e6:.1f}M params ({n_trained / 1e6:.2f}M trained), "
        f"task {s.dataset_task.name}: {train_batches.num_examples} train / {len(eval_set)} "
        f"held-out examples, stop ids {list(s.stop_token_ids)}, mesh {dict(mesh.shape)}"
    )
    with PreemptionGuard() as guard:
        result = grpo_run.run_grpo(
            cfg,
            metrics_cfg=metrics_cfg,
            run_config=config.to_dict(),
            workdir=workdir,
            graphdef=s.policy.graphdef,
            params=s.policy.params,
            tokenizer=s.tokenizer,
            task=s.task,
            train_batches=train_batches,
            eval_examples=eval_set,
            mesh=mesh,
            checkpointer=checkpointer,
            guard=guard,
            stop_token_ids=s.stop_token_ids,
            echo=echo,
            trainer_kwargs=s.policy.trainer_kwargs,
        )
    if result["preempted"]:
        return {"preempted": True, "step": result["step"]}
    trainer = result["trainer"]
    export = export_policy(
        trainer.graphdef,
        trainer.params,
        trainer.frozen[0] if trainer.frozen else None,
        workdir / EXPORT_DIR,
        source_dir=s.path,
    )
    summary = {
        "preempted": False,
        "before": result["before"],
        "after": result["after"],
        "rl_steps": cfg.steps,
        "resumed": result["resumed"],
        "wall_seconds": time.perf_counter() - t_start,
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
    if is_main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_curves(
            workdir / "metrics.jsonl",
            workdir / "curves.png",
            CURVES,
            title=f"GRPO on {s.dataset_task.name} from {s.path.name}",
        )
        echo(results_table({"before RL": result["before"], "after RL": result["after"]}))
        echo(f"wrote {workdir}/summary.json, metrics.jsonl, tb/, curves.png, {EXPORT_DIR}/")
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
