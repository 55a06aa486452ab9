"""Where the tiny experiment's RL step goes: device compute, verification, and the rest.

    python -m benchmarks.rl_step [--json=PATH] [--steps=6] [--workers=2] [--off_policy] [--smoke]

The policy has the r1_zero_tiny model shape, randomly initialised, so every completion runs to
its budget (the worst case for sampling and verification volume, and the same work every step).
Two trainers run the same steps: one with the task's real verifier, one with a verifier that
does nothing ("noop"); their step-time ratio is the cost of verification that overlap with
device work does not hide.

The breakdown, two ways:
* each device call of a step timed alone and blocking, on the same shapes (the sampler on the
  step's prompts, the log-prob pass where the config needs one, the batch assembly and the
  update on a copy of the trainer's state); what remains of the median step time is work that
  is neither device compute nor hidden verification: waiting for verifiers, decoding and
  tokenising text, Python, dispatch;
* a profiler trace of a few more steps: the share of their wall time in which the device
  executed nothing (common.device_busy_seconds).

`--off_policy` also times the same steps with one-step-off-policy pipelining (the next round
sampled and verified while this one trains) and reports the step-time ratio.

Target (issue "Performance"): that remainder <= 10% of the step. `--smoke` runs the smoke
config for one step each; its figures mean nothing.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import common, noop_verifier  # noqa: F401  (registers "noop" here too)
from experiments.configs import r1_zero_tiny
from rl_reason import verifiers
from rl_reason.core.record import RolloutArrays
from rl_reason.infra import data as data_lib
from rl_reason.infra import sharding
from rl_reason.infra.tokenizer import train_sentencepiece
from rl_reason.pipelines import grpo_stage as grpo_run
from rl_reason.pipelines import r1_zero
from rl_reason.rollout import sampling
from rl_reason.tasks.templates import SPECIAL_TOKENS
from rl_reason.trainer import GRPOTrainer

_JSON = flags.DEFINE_string("json", None, "Write the results to this JSON file.")
_STEPS = flags.DEFINE_integer("steps", 6, "Timed RL steps per verifier (after one warm-up).")
_WORKERS = flags.DEFINE_integer("workers", 2, "Verifier pool worker processes.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per device phase.")
_SMOKE = flags.DEFINE_bool("smoke", False, "The smoke config, one step per verifier.")
_KL = flags.DEFINE_float(
    "kl_coef",
    None,
    "Override grpo.loss.kl_coef: > 0 adds the reference log-prob pass, which runs on the device "
    "while the verifiers work (the overlap this measures); None keeps the config's.",
)

_OFF_POLICY = flags.DEFINE_bool(
    "off_policy",
    False,
    "Also time the real-verifier steps with one-step-off-policy pipelining "
    "(grpo.off_policy_steps=1) and report the on-policy / off-policy step-time ratio.",
)

TARGET_OUTSIDE_FRACTION = 0.10
_STEP_KEYS = ("time_step", "time_sample_verify", "time_train", "time_verify", "time_verify_hidden")


def _trainer(config, data, tokenizer, verifier: str, pool) -> GRPOTrainer:
    from models import get_config as model_preset

    grpo = grpo_run.config_from(r1_zero.GRPOConfig, config.grpo)
    model_cfg = model_preset(
        config.model.preset, vocab_size=tokenizer.vocab_size, **dict(config.model.overrides)
    )
    graphdef, params = sharding.create_model(model_cfg, sharding.make_mesh(), seed=0)
    pool_examples = [dict(p, verifier=verifier) for p in data["rl_pool"]]
    return GRPOTrainer(
        grpo,
        graphdef=graphdef,
        params=params,
        tokenizer=tokenizer,
        task=data["task"],
        train_batches=data_lib.train_iterator(
            pool_examples, global_batch_size=grpo.prompts_per_step, seed=0
        ),
        pool=pool,
        stop_token_ids=(tokenizer.eos_id,),
    )


def _timed_steps(trainer: GRPOTrainer, steps: int) -> dict[str, list[float]]:
    trainer.step()  # compiles
    records = [trainer.step() for _ in range(steps)]
    return {k: [r[k] for r in records] for k in _STEP_KEYS if k in records[0]}


def _traced_steps(trainer: GRPOTrainer, steps: int) -> dict[str, float]:
    """Wall time of `steps` steps and the time the device was busy during them (a trace)."""
    wall, busy = common.device_busy_seconds(lambda: [trainer.step() for _ in range(steps)])
    return {"wall_s": wall, "device_busy_s": busy, "idle_fraction": 1.0 - busy / wall}


def _device_phases(trainer: GRPOTrainer, examples: list[dict], repeats: int) -> dict[str, Any]:
    """Seconds of each device call of one step, alone and blocking (median of `repeats`)."""
    cfg = trainer.cfg
    state = (trainer.graphdef, trainer.params, *trainer.frozen)
    prompts = trainer.rounds.encode_prompts(examples)

    key = jax.random.key(0)

    def run_sampler():
        return jax.block_until_ready(
            sampling.sample(
                state,
                prompts,
                key,
                group_size=cfg.group_size,
                max_new_tokens=cfg.max_new_tokens,
                config=trainer.rounds.sampling,
                pad_id=trainer.rounds.tokenizer.pad_id,
                buffer_len=trainer.rounds.buffer_len,
                prompt_width=cfg.max_prompt_len,
                mesh=trainer.mesh,
            )
        )

    out = run_sampler()
    generated = int(np.asarray(out.lengths).sum())
    args = (out.prompt_ids, out.prompt_mask, out.tokens, out.mask)
    rollout = RolloutArrays.from_sample(out)
    advantages = np.where(np.arange(cfg.rows) % 2, 1.0, -1.0).astype(np.float32)

    def run_logprobs():
        return jax.block_until_ready(trainer.fns.logprobs(trainer.params, *args))

    def run_batch():
        return jax.block_until_ready(trainer.fns.make_batch([rollout], None, advantages))

    batch = run_batch()
    # The update donates its inputs: it runs on copies, the trainer's state stays intact.
    holder = {}

    def fresh_state():
        holder["state"] = jax.block_until_ready(
            jax.tree.map(jnp.copy, (trainer.params, trainer.opt_state))
        )

    def run_update():
        params, opt_state = holder.pop("state")
        return jax.device_get(trainer.fns.update(params, opt_state, batch)[2])

    phases: dict[str, list[float]] = {"sample": [], "logprobs": [], "batch": [], "update": []}
    fresh_state()
    run_update()  # compiled already by the trainer's steps; this warms the copies' path
    for _ in range(repeats):
        phases["sample"] += common.time_calls(run_sampler, 1)
        phases["logprobs"] += common.time_calls(run_logprobs, 1)
        phases["batch"] += common.time_calls(run_batch, 1)
        fresh_state()
        phases["update"] += common.time_calls(run_update, 1)
    # Medians, as for the step times they are compared with (a best-of against a median would
    # book the machine's noise as host overhead).
    best = {k: statistics.median(v) for k, v in phases.items()}
    uses_logprobs = cfg.loss.kl_coef > 0 or cfg.loss.recompute_old_logprobs
    passes = (
        (2 if cfg.loss.kl_coef > 0 and cfg.loss.recompute_old_logprobs else 1)
        if uses_logprobs
        else 0
    )
    updates = cfg.optim.inner_iterations * cfg.optim.minibatches
    return {
        "median_s": best,
        "runs_s": phases,
        "generated_tokens": generated,
        "logprob_passes": passes,
        "updates": updates,
        "device_s": best["sample"]
        + passes * best["logprobs"]
        + best["batch"]
        + updates * best["update"],
    }


def main(argv):
    del argv
    config = r1_zero_tiny.get_config("smoke" if _SMOKE.value else None)
    if _KL.value is not None:
        config.grpo.loss.kl_coef = _KL.value
    steps = 1 if _SMOKE.value else _STEPS.value
    repeats = 1 if _SMOKE.value else _REPEATS.value
    env = common.environment()
    data = r1_zero.build_data(config)
    tokenizer = train_sentencepiece(
        data["corpus"][:2000],
        f"/tmp/rl_step_bench_tok_{os.getpid()}.model",
        vocab_size=config.tokenizer.vocab_size,
        user_defined_symbols=SPECIAL_TOKENS,
    )
    times, phases = {}, None
    with verifiers.VerifierPool(_WORKERS.value, imports=["benchmarks.noop_verifier"]) as pool:
        for name in ("noop", "arithmetic"):
            trainer = _trainer(config, data, tokenizer, name, pool)
            times[name] = _timed_steps(trainer, steps)
            if name == "arithmetic":
                traced = _traced_steps(trainer, max(1, min(steps, 3)))
                examples = [
                    dict(p, verifier=name) for p in data["rl_pool"][: trainer.cfg.prompts_per_step]
                ]
                phases = _device_phases(trainer, examples, repeats)
        if _OFF_POLICY.value:
            pipelined = config.copy_and_resolve_references()
            with pipelined.unlocked():
                pipelined.grpo.off_policy_steps = 1
            trainer = _trainer(pipelined, data, tokenizer, "arithmetic", pool)
            # The first pipelined step also samples the round after it: one more warm-up step.
            trainer.step()
            times["arithmetic_off_policy"] = _timed_steps(trainer, steps)
    med = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    real = med["arithmetic"]
    step_s = real["time_step"]
    device_s = phases["device_s"]
    verify_hidden = real.get("time_verify_hidden", 0.0)
    verify_waited = max(real.get("time_verify", 0.0) - verify_hidden, 0.0)
    outside_s = max(step_s - device_s, 0.0)
    breakdown = {
        "step_s": step_s,
        "sample_device_s": phases["median_s"]["sample"],
        "logprobs_device_s": phases["logprob_passes"] * phases["median_s"]["logprobs"],
        "train_device_s": phases["median_s"]["batch"]
        + phases["updates"] * phases["median_s"]["update"],
        "verify_s": real.get("time_verify", 0.0),
        "verify_hidden_s": verify_hidden,
        "verify_waited_s": verify_waited,
        "outside_s": outside_s,
        "outside_fraction": outside_s / step_s,
        "host_other_s": max(outside_s - verify_waited, 0.0),
    }
    ratio = real["time_step"] / med["noop"]["time_step"]
    record = {
        "benchmark": "rl_step",
        "smoke": _SMOKE.value,
        "breakdown": breakdown,
        "outside_fraction": breakdown["outside_fraction"],
        "device_idle_fraction_traced": traced["idle_fraction"],
        "traced_steps": traced,
        "target_outside_fraction": TARGET_OUTSIDE_FRACTION,
        "met_target": max(breakdown["outside_fraction"], traced["idle_fraction"])
        <= TARGET_OUTSIDE_FRACTION,
        "step_seconds_noop": med["noop"]["time_step"],
        "step_seconds_real": real["time_step"],
        "verifier_ratio": ratio,
        "device_phases": phases,
        "step_metrics_median": med,
        "step_metrics": times,
        "steps": steps,
        "workers": _WORKERS.value,
        "rows_per_step": config.grpo.prompts_per_step * config.grpo.group_size,
        "max_new_tokens": config.grpo.max_new_tokens,
        "kl_coef": config.grpo.loss.kl_coef,
        "off_policy_speedup": (
            real["time_step"] / med["arithmetic_off_policy"]["time_step"]
            if _OFF_POLICY.value
            else None
        ),
        "environment": {**env, "load_average_1_5_15_end": list(os.getloadavg())},
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    rows = [
        ["step (wall, median)", step_s, "100%"],
        ["  sample (device)", breakdown["sample_device_s"], None],
        ["  log-probs (device)", breakdown["logprobs_device_s"], None],
        ["  batch + update (device)", breakdown["train_device_s"], None],
        ["  outside device compute", outside_s, None],
        ["    of which waiting for verifiers", verify_waited, None],
        ["    of which other host work", breakdown["host_other_s"], None],
        ["verification (hidden behind device work)", verify_hidden, None],
        ["step with the noop verifier", med["noop"]["time_step"], None],
    ]
    for row in rows:
        row[2] = row[2] or f"{row[1] / step_s:.1%}"
    common.print_table(rows, ["", "seconds", "of step"])
    print(
        f"\noutside device compute and hidden verification: {breakdown['outside_fraction']:.1%} "
        f"of the step from the phases timed alone, {traced['idle_fraction']:.1%} device idle "
        f"in a trace of the steps (target <= {TARGET_OUTSIDE_FRACTION:.0%}); real / noop "
        f"verifier step time {ratio:.3f}"
    )
    if _OFF_POLICY.value:
        off = med["arithmetic_off_policy"]["time_step"]
        print(
            f"one-step-off-policy pipelining: step {off:.3f} s vs {real['time_step']:.3f} s "
            f"on-policy (speed-up {record['off_policy_speedup']:.3f}x)"
        )
    if _JSON.value:
        common.write_json(_JSON.value, record)
        print(f"wrote {_JSON.value}")


if __name__ == "__main__":
    app.run(main)
