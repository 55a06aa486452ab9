"""The "research" pipeline: one arm of an experiment on the R1-Zero-in-miniature setting.

Like `rl_reason.pipelines.r1_zero` (same task, data and base model),
with what the experiments vary and
measure:

  stage 1     the base model, from the per-seed cache (`rl_reason.pipelines.research.base_cache`)
  cold start  optional SFT on `cold_start.examples` worked solutions in the RL template
  reward      `reward.mode`: "outcome" (the `arithmetic` verifier), "process" (the fraction of
              right steps, `arithmetic_process`, one scalar per sequence), "both" (their
              weighted sum); "process_steps" and "both_steps" are process supervision per
              step: each step's verdict is credited to that step's own tokens
              (`loss.process_weight`, `losses.process_advantages`), alone or beside the outcome
  RL          `rl_reason.pipelines.grpo_stage.run_grpo` with every `grpo.*` option
  measures    held-out greedy completions before and after RL (`research.measures`:
              process correctness, readability, wrong-step share of correct answers, length of
              wrong answers, the deviation rate and its chance baseline, has-answer and
              truncation rates, accuracy by op count), the same on every step's training
              rollouts (``rollout_*`` in metrics.jsonl), and the reasoning bridge before and
              after RL (`research.bridge`); every evaluation's completions are kept in
              held_out/ (`research.held_out`)

`run(config)` writes summary.json, metrics.jsonl, tb/, curves.png and checkpoints into the
run's workdir (`rl_reason.pipelines.research.runs.workdir_for`) and resumes from its checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from rl_reason.infra import data as data_lib
from rl_reason.pipelines import base_model, pretrain, r1_zero
from rl_reason.pipelines import grpo_stage as grpo_run
from rl_reason.pipelines.context import RunContext
from rl_reason.pipelines.research import base_cache, bridge, held_out, injection, measures, runs
from rl_reason.rollout import sampling
from rl_reason.tasks import arithmetic
from rl_reason.trainer import GRPOConfig

REWARD_MODES = ("outcome", "process", "both", "process_steps", "both_steps")
CURVES = (
    "accuracy",
    "reward_mean",
    "response_length_mean",
    "rollout_frac_process_correct",
    "rollout_wrong_step_given_correct",
    "rollout_frac_well_formed",
)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    mode: str = "outcome"
    process_weight: float = 0.5  # w in (1 - w) * outcome + w * process, for mode "both"

    def __post_init__(self) -> None:
        if self.mode not in REWARD_MODES:
            raise ValueError(f"reward.mode={self.mode!r}; valid: {list(REWARD_MODES)}")
        if not 0.0 < self.process_weight < 1.0:
            raise ValueError(
                f"reward.process_weight={self.process_weight} must be in (0, 1) (mode 'both' "
                "mixes the two; use mode 'outcome' or 'process' for one alone)"
            )

    def label(self, example: Mapping[str, Any]) -> dict[str, Any]:
        """`example` with the verifier (and weight) that gives this reward."""
        if self.mode == "outcome":
            return {**example, "verifier": "arithmetic"}
        if self.mode.endswith("_steps"):
            # The scalar reward is the outcome; the steps' verdicts come with it per step.
            return {**example, "verifier": "arithmetic_process", "process_weight": 0.0}
        w = 1.0 if self.mode == "process" else self.process_weight
        return {**example, "verifier": "arithmetic_process", "process_weight": w}

    def grpo_config(self, cfg: GRPOConfig) -> GRPOConfig:
        """`cfg` with the per-step process advantages' weight of this mode (the others keep
        `cfg.loss.process_weight`, 0 unless set)."""
        if not self.mode.endswith("_steps"):
            return cfg
        w = 1.0 if self.mode == "process_steps" else self.process_weight
        return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, process_weight=w))


@dataclasses.dataclass(frozen=True)
class ColdStartConfig:
    """SFT before RL on `examples` worked solutions (0: none, the R1-Zero setting).

    `source` "corpus" spends the same SFT steps on `examples` texts of the pretraining corpus
    instead: the compute-matched zero arm, which gets the extra updates but no new solutions.
    The worked problems (or corpus texts) are drawn by `seed`, the RL seed in the sweeps, so
    each seed fine-tunes on its own set.
    """

    examples: int = 0
    source: str = "worked"
    steps: int = 40
    batch_size: int = 16
    seq_len: int = 256
    learning_rate: float = 1e-3
    warmup_steps: int = 5
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in ("worked", "corpus"):
            raise ValueError(f"cold_start.source={self.source!r}; valid: 'worked', 'corpus'")
        if self.examples < 0 or self.steps < 1:
            raise ValueError(
                f"cold_start needs examples >= 0 and steps >= 1, got {self.examples}, {self.steps}"
            )
        try:
            self.pretrain_config()  # the SFT options have the pretraining options' bounds
        except ValueError as e:
            raise ValueError(f"config.cold_start: {e}") from None

    def pretrain_config(self) -> pretrain.PretrainConfig:
        fields = {f.name for f in dataclasses.fields(pretrain.PretrainConfig)}
        return pretrain.PretrainConfig(
            **{k: v for k, v in dataclasses.asdict(self).items() if k in fields}
        )


def build_data(config) -> dict[str, Any]:
    """r1_zero's task, eval set and RL pool (the corpus is made only if stage 1 runs), plus
    the cold-start texts: worked solutions of problems disjoint from the eval set and the RL
    pool, or corpus texts (see `ColdStartConfig`)."""
    cold = config.cold_start
    source = cold.get("source", "worked")
    data = r1_zero.build_data(config, with_corpus=bool(cold.examples) and source == "corpus")
    task = data["task"]
    held_out = {task.key(p) for p in data["eval_set"] + data["rl_pool"]}
    n = cold.examples
    data["sft_texts"] = []
    if n and source == "corpus":
        pick = np.random.default_rng([cold.seed, 17]).choice(len(data["corpus"]), n, replace=False)
        data["sft_texts"] = [data["corpus"][i] for i in pick]
    elif n:
        # Seed 0 keeps the set the experiments had before the SFT set varied with the seed.
        stream = config.seed + 2 + 1000 * cold.seed
        data["sft_texts"] = sft_texts(task.eval_set(stream, n, exclude_keys=held_out))
    return data


def sft_texts(problems: Sequence[Mapping[str, Any]]) -> list[str]:
    """Prompt + worked completion, as the RL policy should write it."""
    return [
        arithmetic.make_prompt(p["question"]) + arithmetic.target_completion(p, worked=True)
        for p in problems
    ]


def greedy_completions(
    graphdef,
    params,
    tokenizer,
    problems: Sequence[Mapping[str, Any]],
    grpo_cfg: GRPOConfig,
    stop_token_ids: Sequence[int],
    mesh,
    batch_size: int = 64,
) -> list[str]:
    """The policy's greedy completion of each problem's prompt, as text."""
    prompts = [arithmetic.make_prompt(p["question"]) for p in problems]
    return greedy_continuations(
        graphdef, params, tokenizer, prompts, grpo_cfg, stop_token_ids, mesh, batch_size
    )


def greedy_continuations(
    graphdef,
    params,
    tokenizer,
    prompts: Sequence[str],
    grpo_cfg: GRPOConfig,
    stop_token_ids: Sequence[int],
    mesh,
    batch_size: int = 64,
) -> list[str]:
    """The policy's greedy continuation of each prompt text (up to `max_new_tokens`)."""
    cfg = sampling.SamplingConfig(temperature=0.0, stop_token_ids=tuple(stop_token_ids))
    encoded = tokenizer.encode_batch(list(prompts), add_bos=True)
    # Prefilled contexts (error injection) outgrow the RL prompts: one width for all.
    width = max(grpo_cfg.max_prompt_len, -(-max(map(len, encoded), default=1) // 16) * 16)
    texts: list[str] = []
    for lo in range(0, len(encoded), batch_size):
        chunk = encoded[lo : lo + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape
        out = sampling.sample(
            (graphdef, params),
            padded,
            jax.random.key(0),
            max_new_tokens=grpo_cfg.max_new_tokens,
            config=cfg,
            pad_id=tokenizer.pad_id,
            buffer_len=-(-grpo_cfg.max_new_tokens // 8) * 8,
            prompt_width=width,
            mesh=mesh,
        )
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        rows = [tokens[i, : lengths[i]] for i in range(len(chunk))]
        texts += tokenizer.decode_batch(rows)
    return texts


def measure_injection(graphdef, params, tokenizer, problems, grpo_cfg, stops, mesh, max_value):
    def generate(prompts):
        return greedy_continuations(graphdef, params, tokenizer, prompts, grpo_cfg, stops, mesh)

    return injection.measure(generate, problems, seed=0, max_value=max_value)


def measure_bridge(graphdef, params, tokenizer, problems, grpo_cfg, stops, mesh, max_value) -> dict:
    own = greedy_completions(graphdef, params, tokenizer, problems, grpo_cfg, stops, mesh)
    return bridge.measure(graphdef, params, tokenizer, problems, own, max_value=max_value)


def with_ratios(ev: Mapping[str, float], answer_chance: float) -> dict[str, Any]:
    """An evaluation dict with the conditional figures of `measures.ratios`, the chance
    baseline they are read against and the accuracy per op count added."""
    return {
        **ev,
        **measures.ratios(ev),
        "answer_chance": answer_chance,
        "accuracy_by_ops": base_model.accuracy_by_ops(ev),
    }


def run(config) -> dict[str, Any]:
    """One arm; returns the summary written to `workdir/summary.json`."""
    ctx = RunContext.start(
        config,
        workdir=runs.workdir_for,
        one_process="the research pipeline runs in one process (tiny models, one host)",
    )
    workdir, echo, mesh = ctx.workdir, ctx.echo, ctx.mesh
    grpo_cfg = grpo_run.config_from(GRPOConfig, config.grpo)
    reward_cfg = grpo_run.config_from(RewardConfig, config.reward)
    grpo_cfg = reward_cfg.grpo_config(grpo_cfg)
    cold_cfg = grpo_run.config_from(ColdStartConfig, config.cold_start)
    ctx.make_checkpointer(grpo_cfg)
    resuming = ctx.resuming
    (workdir / "config.json").write_text(json.dumps(runs.run_settings(config), indent=2))
    echo(f"[research] {workdir} | reward {reward_cfg.mode} | cold start {cold_cfg.examples}")

    data = build_data(config)
    max_ops, max_value = data["task"].cfg.max_ops, data["task"].cfg.max_value
    with ctx.preemptible() as guard:
        base_dir = base_model.resolve_base(config.base)
        if base_dir is not None:
            tokenizer, graphdef, params, info = base_model.load_base(base_dir, mesh, config)
            base = tokenizer, graphdef, params, {"base_eval": info.get("eval")}
            echo(f"[stage 1] base model {base_dir}")
        else:
            base = base_cache.load_or_train(
                config,
                lambda: r1_zero.build_data(config)["corpus"],
                mesh,
                runs.base_cache_for(config),
                echo,
                should_stop=guard.should_stop,
            )
        if base is None:
            echo("[stage 1] interrupted: nothing cached, a rerun starts stage 1 again")
            return {"preempted": True, "stage": 1}
        tokenizer, graphdef, params, stage1 = base
        stage1 = {"base": config.base, **stage1}
        stops = base_model.stop_token_ids(tokenizer)
        carry: dict[str, Any] = {"stage1": stage1}
        if not resuming:
            if cold_cfg.examples:
                params, sft_losses = pretrain.pretrain(
                    graphdef,
                    params,
                    tokenizer,
                    data["sft_texts"],
                    cold_cfg.pretrain_config(),
                    mesh=mesh,
                )
                carry["cold_start"] = {"steps": len(sft_losses), "final_loss": sft_losses[-1]}
                echo(f"[cold start] {cold_cfg.steps} SFT steps, loss {sft_losses[-1]:.3f}")
            if config.measure.bridge:
                carry["bridge_before"] = measure_bridge(
                    graphdef, params, tokenizer, data["eval_set"], grpo_cfg, stops, mesh, max_value
                )
                echo("[bridge] before RL: " + grpo_run.fmt(carry["bridge_before"]))
            if config.measure.get("injection", False):
                carry["injection_before"] = measure_injection(
                    graphdef, params, tokenizer, data["eval_set"], grpo_cfg, stops, mesh, max_value
                )
                echo("[injection] before RL: " + grpo_run.fmt(carry["injection_before"]))

        def count_tokens(text: str) -> int:
            return len(tokenizer.encode(text))

        completions_log = held_out.HeldOutLog(workdir, data["eval_set"])

        def eval_stats(texts: list[str], examples: list[dict]) -> dict[str, float]:
            completions_log(texts, examples)
            return measures.completion_stats(texts, examples, count_tokens, max_ops)

        def watch_steps(trainer) -> None:
            completions_log.step = lambda: trainer.step_count

        result = ctx.run_grpo(
            grpo_cfg,
            graphdef=graphdef,
            params=params,
            tokenizer=tokenizer,
            task=data["task"],
            train_batches=data_lib.train_iterator(
                [reward_cfg.label(p) for p in data["rl_pool"]],
                global_batch_size=grpo_cfg.prompts_per_step,
                seed=grpo_cfg.seed,  # the RL seed: problem order varies with it
            ),
            eval_examples=data["eval_set"],
            stop_token_ids=stops,
            response_stats=eval_stats,
            carry=carry,
            trainer_kwargs={"rollout_stats": measures.stats_with_ratios(count_tokens)},
            on_trainer=watch_steps,
        )
    if result["preempted"]:
        return {"preempted": True, "stage": 2, "step": result["step"]}
    carry = result["carry"]
    trainer = result["trainer"]
    chance = measures.answer_chance(data["eval_set"])
    summary: dict[str, Any] = {
        "preempted": False,
        "workdir": str(workdir),
        "settings": runs.run_settings(config),
        "before": with_ratios(result["before"], chance),
        "after": with_ratios(result["after"], chance),
        "answer_chance": chance,
        "held_out_completions": {
            "before": str(completions_log.path(0).relative_to(workdir)),
            "after": str(completions_log.path(trainer.step_count).relative_to(workdir)),
        },
        "rl_steps": grpo_cfg.steps,
        "resumed": result["resumed"],
        "stage1": carry["stage1"],
        "cold_start": carry.get("cold_start"),
        "rl_param_change_l2": result["rl_param_change_l2"],
        "eval_size": len(data["eval_set"]),
    }
    if config.measure.bridge:
        summary["bridge_before"] = carry["bridge_before"]
        summary["bridge_after"] = measure_bridge(
            graphdef, trainer.params, tokenizer, data["eval_set"], grpo_cfg, stops, mesh, max_value
        )
        echo("[bridge] after RL:  " + grpo_run.fmt(summary["bridge_after"]))
    if config.measure.get("injection", False):
        summary["injection_before"] = carry["injection_before"]
        summary["injection_after"] = measure_injection(
            graphdef, trainer.params, tokenizer, data["eval_set"], grpo_cfg, stops, mesh, max_value
        )
        echo("[injection] after RL:  " + grpo_run.fmt(summary["injection_after"]))
    summary["wall_seconds"] = ctx.elapsed()
    ctx.write_summary(
        summary,
        curves=CURVES,
        title=f"research arm: reward {reward_cfg.mode}, {grpo_cfg.loss.advantage_estimator}",
    )
    echo(f"[research] wrote {workdir}/summary.json ({summary['wall_seconds']:.0f}s)")
    return summary
