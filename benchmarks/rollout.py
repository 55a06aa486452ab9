"""Rollout speed: the continuous-batching engine against the static sampler, same weights, same run.

    python -m benchmarks.rollout [--json=PATH] [--preset=llama-20m] [--prompts=8]
        [--group_size=8] [--prompt_len=64] [--max_new_tokens=1024] [--mean_tokens=128]
        [--uniform_tokens=256] [--slots=0] [--min_slots=0] [--repeats=3] [--partial_steps=3]
        [--partial_slots=0] [--partial_timed_steps=6] [--smoke]
    python -m benchmarks.rollout --multi_turn [--json=PATH] [--mt_turn_tokens=48]
        [--mt_observation_tokens=24] [--mt_turns=4] [--mt_max_new_tokens=512] [--smoke]

Two cases, each timed for both samplers in turns (a, b, a, b, ...), every call of a repeat with
the same key for both, so both produce the same completions:

* long-tailed: a stop token whose logit gets a bias that makes its probability about
  1 / `mean_tokens` at every step of the random model, so completion lengths are geometric
  (p99 / median about 6.6) within a budget of `max_new_tokens`;
* uniform: no stop token, every completion exactly `uniform_tokens` long.

Throughput counts useful tokens only (completion tokens, pad excluded) per second of the whole
call (prefill included), the best call of each. Before timing, each sampler's log-probs of its
own completions are checked against a full forward pass, so a sampler that computed something
else cannot pass for a fast one; `identical_rows` is the share of rows the two drew alike for
one key (see `same_tokens` for why a random model's rows drift apart). `slot_occupancy` is the
engine's mean fraction of decoded slots that held a live sample (the static sampler's is the
same fraction of its rows).

`--smoke` runs the tiny preset at toy sizes (a test runs it so that this file cannot rot); its
figures mean nothing.

A third measurement runs partial rollouts (`rl_reason.rollout.partial`, `--partial_steps`
batches ahead) on the long-tailed case: steps with fixed weights, each adding a batch of the
same prompts with a new key and returning the oldest once finished; its useful tokens per
second (of the returned batches, over the timed steps) against the static sampler's figure of
the same run, and the slot occupancy of those steps' calls; once with each way a carried
sample's cache resumes (kept as the last call left it, the default, or rebuilt).

`--multi_turn` measures multi-turn rollouts instead (benchmarks/multi_turn.py): observations
appended through the engine's cache against re-prefilling the whole context at every turn.

Targets (issue "continuous batching"): on the 2-core CPU, long-tailed with p99/median >= 4:
ratio >= 2.0 and slot occupancy >= 0.7 (>= 0.9 with partial rollouts); uniform: ratio >= 0.9.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from benchmarks import common, multi_turn
from models import Transformer, get_config
from rl_reason.infra import sharding
from rl_reason.rollout import engine, partial, sampling
from rl_reason.rollout.sampling import SamplingConfig

_JSON = flags.DEFINE_string("json", None, "Write the results to this JSON file.")
_PRESET = flags.DEFINE_string("preset", "llama-20m", "models.config preset.")
_PROMPTS = flags.DEFINE_integer("prompts", 8, "Prompts per call.")
_GROUP = flags.DEFINE_integer("group_size", 8, "Samples per prompt.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Tokens per prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 1024, "Budget of the long-tailed case.")
_MEAN = flags.DEFINE_integer("mean_tokens", 128, "Mean completion length of the long tail.")
_UNIFORM = flags.DEFINE_integer("uniform_tokens", 256, "Length of every uniform completion.")
_SLOTS = flags.DEFINE_integer("slots", 0, "Engine slots (0: one per sample, the default).")
_MIN_SLOTS = flags.DEFINE_integer("min_slots", 0, "Fewest slots of the tail (0: default).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per sampler, after one warm-up.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and prompts.")
_PARTIAL = flags.DEFINE_integer(
    "partial_steps", 3, "Partial rollouts' steps ahead in the long-tailed case (0: skip them)."
)
_PARTIAL_SLOTS = flags.DEFINE_integer(
    "partial_slots", 0, "Engine slots with partial rollouts (0: half the samples of a step)."
)
_PARTIAL_STEPS = flags.DEFINE_integer("partial_timed_steps", 6, "Timed steps of partial rollouts.")
_MULTI = flags.DEFINE_bool("multi_turn", False, "Multi-turn: cached against re-prefilled turns.")
_MT_TURN = flags.DEFINE_integer("mt_turn_tokens", 48, "Mean tokens of a multi-turn model turn.")
_MT_OBS = flags.DEFINE_integer("mt_observation_tokens", 24, "Tokens of each observation.")
_MT_TURNS = flags.DEFINE_integer("mt_turns", 4, "Tool calls after which a trajectory ends.")
_MT_MAX_NEW = flags.DEFINE_integer("mt_max_new_tokens", 512, "Multi-turn trajectory budget.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny preset, toy sizes, 1 repeat: checks it runs.")

TARGET_RATIO, TARGET_OCCUPANCY, TARGET_UNIFORM_RATIO = 2.0, 0.7, 0.9
TARGET_PARTIAL_OCCUPANCY = 0.9
STOP = 2  # the stop token of the long-tailed case (any id the random model can emit)


def stop_bias(vocab_size: int, mean_tokens: int) -> float:
    """Bias that gives the stop token probability 1 / mean_tokens when the other logits are
    equal: e^b / (e^b + V - 1) = 1 / m. A random model's logits are near zero, so lengths are
    close to geometric with that mean."""
    return math.log((vocab_size - 1) / (mean_tokens - 1))


def _runners(params, prompts, case: dict[str, Any], eng: engine.EngineConfig):
    kw = dict(
        group_size=case["group_size"],
        max_new_tokens=case["max_new_tokens"],
        config=case["config"],
        buffer_len=case["max_new_tokens"],
        prompt_width=len(prompts[0]),
    )
    keys = {"static": iter(range(1 << 30)), "engine": iter(range(1 << 30))}
    last: dict[str, Any] = {}

    def static(seed=None):
        seed = next(keys["static"]) if seed is None else seed
        last["static"] = jax.block_until_ready(
            sampling.sample(params, prompts, jax.random.key(seed), **kw)
        )
        return last["static"]

    def continuous(seed=None):
        seed = next(keys["engine"]) if seed is None else seed
        last["engine"] = jax.block_until_ready(
            engine.sample(params, prompts, jax.random.key(seed), engine=eng, **kw)
        )
        return last["engine"]

    return static, continuous, last


def forward_logprob_gap(model: Transformer, prompts, out: sampling.SampleOutput, rows=2) -> float:
    """Max |policy log-prob the sampler returned - log-prob of a full forward pass| over the
    completion tokens of the `rows` longest rows: the completions are the model's own (this
    holds for any key, where comparing the two samplers' tokens would not: see below)."""
    lengths = np.asarray(out.lengths)
    tokens, lp = np.asarray(out.tokens), np.asarray(out.policy_logprobs)
    group = lengths.size // len(prompts)
    gap = 0.0
    for r in np.argsort(-lengths)[:rows]:
        n, prompt = int(lengths[r]), prompts[r // group]
        ids = jnp.asarray([list(prompt) + tokens[r, :n].tolist()], jnp.int32)
        logits = model(ids)[0, len(prompt) - 1 : -1]
        ref = jax.nn.log_softmax(logits.astype(jnp.float32))[jnp.arange(n), ids[0, len(prompt) :]]
        gap = max(gap, float(np.max(np.abs(np.asarray(ref) - lp[r, :n]))))
    return gap


def same_tokens(st: sampling.SampleOutput, en: engine.EngineOutput) -> float:
    """Share of rows whose completions are identical. The engine draws token t of sample i with
    the static sampler's number, but its matmuls batch other rows, so logits differ in the last
    float32 bits; near-uniform distributions over a large vocabulary (a random model) put a
    draw within that rounding of a CDF boundary every few hundred tokens, and the row then
    continues differently. Peaked distributions (trained models, tests/test_engine.py) agree."""
    a, b = np.asarray(st.tokens), np.asarray(en.sample.tokens)
    return float(np.mean(np.all(a == b, axis=1)))


def run_case(model, prompts, case: dict[str, Any], eng, repeats: int) -> dict[str, Any]:
    params = nnx.split(model)
    static, continuous, last = _runners(params, prompts, case, eng)
    compiled = common.compile_seconds()
    t = time.perf_counter()
    st = static(10_000)
    static_first = time.perf_counter() - t
    static_compile, compiled = common.compile_seconds() - compiled, common.compile_seconds()
    t = time.perf_counter()
    en = continuous(10_000)
    engine_first = time.perf_counter() - t
    engine_compile = common.compile_seconds() - compiled
    identical = same_tokens(st, en)
    gaps = {"static": forward_logprob_gap(model, prompts, st)}
    gaps["engine"] = forward_logprob_gap(model, prompts, en.sample)
    if max(gaps.values()) > 1e-3:
        raise AssertionError(f"a sampler's log-probs disagree with a forward pass: {gaps}")
    useful = {"static": [], "engine": []}

    def counted(name, fn):
        def call():
            out = fn()
            out = out.sample if name == "engine" else out
            useful[name].append(int(np.asarray(out.lengths).sum()))

        return call

    seconds = common.time_interleaved(
        {"static": counted("static", static), "engine": counted("engine", continuous)}, repeats
    )
    rate = {n: max(u / s for u, s in zip(useful[n], seconds[n], strict=True)) for n in useful}
    lengths = np.asarray(last["static"].lengths)
    rows = lengths.size
    static_steps = int(lengths.max())
    result = {
        "samples": rows,
        "useful_tokens": {n: useful[n] for n in useful},
        "median_tokens": float(np.median(lengths)),
        "p99_tokens": float(np.percentile(lengths, 99)),
        "max_tokens": int(lengths.max()),
        "p99_over_median": float(np.percentile(lengths, 99) / max(np.median(lengths), 1.0)),
        "static_tokens_per_s": rate["static"],
        "engine_tokens_per_s": rate["engine"],
        "static_seconds": seconds["static"],
        "engine_seconds": seconds["engine"],
        "slot_occupancy": last["engine"].slot_occupancy,
        "static_row_occupancy": float(lengths.sum()) / (rows * static_steps),
        "engine_decode_steps": int(last["engine"].decode_steps),
        "static_decode_steps": static_steps,
        "static_first_call_s": static_first,
        "engine_first_call_s": engine_first,
        "static_compile_s": static_compile,
        "engine_compile_s": engine_compile,
        "identical_rows": identical,
        "max_logprob_gap_vs_forward": gaps,
    }
    result["ratio"] = result["engine_tokens_per_s"] / result["static_tokens_per_s"]
    return result


def run_partial(
    model, prompts, case: dict[str, Any], slots: int, steps_ahead: int, timed: int, cache: str
):
    """Partial rollouts on the long-tailed case: steps of `rollout.partial` with fixed weights,
    each adding a batch of the same prompts with a new key and returning the oldest once it
    has finished. Two warm-up steps (most compiles; the first step also has no batch ahead of
    it), then `timed` steps: useful tokens (of the returned batches) per second, and the slot
    occupancy of those steps' calls."""
    params = nnx.split(model)
    m = partial.PartialRollouts(
        steps_ahead=steps_ahead,
        group_size=case["group_size"],
        max_new_tokens=case["max_new_tokens"],
        buffer_len=case["max_new_tokens"],
        config=case["config"],
        engine_config=engine.EngineConfig(slots=slots),
        pad_id=0,
        prompt_width=len(prompts[0]),
        mesh=sharding.mesh_of(params[1]),
        cache=cache,
    )
    seeds = iter(range(20_000, 1 << 30))
    warmup, stats = 2, []
    compiled = common.compile_seconds()
    t_start = None
    for step in range(warmup + timed):
        if step == warmup:
            compiled, t_start = common.compile_seconds(), time.perf_counter()
        while m.wanted:
            m.add(prompts, jax.random.key(next(seeds)))
        got = m.step(params, version=step)
        if step >= warmup:
            useful = int(np.asarray(got.sample.lengths).sum())
            stats.append((useful, got.slot_steps, got.live_slot_steps, got.decode_steps))
    seconds = time.perf_counter() - t_start
    useful, slot_steps, live, _ = (sum(x) for x in zip(*stats, strict=True))
    return {
        "cache": cache,
        "steps_ahead": steps_ahead,
        "slots": slots,
        "timed_steps": timed,
        "seconds": seconds,
        "compile_s_while_timed": common.compile_seconds() - compiled,
        "useful_tokens": useful,
        "tokens_per_s": useful / seconds,
        "slot_occupancy": live / max(slot_steps, 1),
        # None: the step's batch had finished in earlier calls, so the step decoded nothing.
        "slot_occupancy_per_step": [s[2] / s[1] if s[1] else None for s in stats],
        "decode_steps_per_step": [s[3] for s in stats],
    }


def main(argv) -> None:
    del argv
    smoke = _SMOKE.value
    preset = "tiny" if smoke else _PRESET.value
    # Smoke sizes that share compiled programs between the smoke runs (a test suite's
    # persistent compilation cache): the uniform case's static sampler is the sampling
    # benchmark's smoke call (4 prompts of 16 tokens, group 1, plain sampling, a 16-token
    # buffer), and the long-tailed case's engine call (the same shapes, stop token 2 at mean 2)
    # is every turn of the multi-turn smoke's re-prefill path: its 4 rows of 8-token prompts
    # stay within a 16-token context (budget 8), its marker is token 2 with mean 2, and with
    # one-token observations nearly every row goes on to the second turn (4 rows again).
    prompts_n, group = (4, 1) if smoke else (_PROMPTS.value, _GROUP.value)
    prompt_len = (8 if _MULTI.value else 16) if smoke else _PROMPT_LEN.value
    max_new, mean = (16, 2) if smoke else (_MAX_NEW.value, _MEAN.value)
    uniform = 16 if smoke else _UNIFORM.value
    repeats = 1 if smoke else _REPEATS.value
    cfg = get_config(preset)
    model = Transformer(cfg, rngs=nnx.Rngs(_SEED.value))
    rng = np.random.default_rng(_SEED.value)
    prompts = rng.integers(3, cfg.vocab_size, size=(prompts_n, prompt_len)).tolist()
    if _MULTI.value:
        return _multi_turn(model, prompts, group, repeats, smoke, preset)
    eng = engine.EngineConfig(slots=_SLOTS.value, min_slots=_MIN_SLOTS.value)
    bias = stop_bias(cfg.vocab_size, mean)
    cases = {
        "long_tail": dict(
            group_size=group,
            max_new_tokens=max_new,
            config=SamplingConfig(stop_token_ids=(STOP,), logit_bias=((STOP, bias),)),
        ),
        "uniform": dict(group_size=group, max_new_tokens=uniform, config=SamplingConfig()),
    }
    results = {name: run_case(model, prompts, case, eng, repeats) for name, case in cases.items()}
    tail, flat = results["long_tail"], results["uniform"]
    part = rebuilt = None
    if _PARTIAL.value:
        slots = _PARTIAL_SLOTS.value or max(prompts_n * group // 2, 1)
        timed = 2 if smoke else _PARTIAL_STEPS.value
        args = (model, prompts, cases["long_tail"], slots, _PARTIAL.value, timed)
        part = run_partial(*args, "keep")
        part["ratio"] = part["tokens_per_s"] / tail["static_tokens_per_s"]
        if not smoke:  # the smoke test's time goes to the kept-cache path only
            rebuilt = run_partial(*args, "rebuild")
            rebuilt["ratio"] = rebuilt["tokens_per_s"] / tail["static_tokens_per_s"]
    record = {
        "benchmark": "rollout",
        "smoke": smoke,
        "preset": preset,
        "num_params": cfg.num_params(),
        "prompts": prompts_n,
        "group_size": group,
        "prompt_len": prompt_len,
        "max_new_tokens": max_new,
        "mean_tokens": mean,
        "stop_logit_bias": bias,
        "uniform_tokens": uniform,
        "engine_slots": eng.slots or prompts_n * group,
        "engine_slot_levels": list(
            engine.slot_levels(
                eng.slots or prompts_n * group,
                eng.min_slots or engine.default_min_slots(eng.slots or prompts_n * group, 1),
                1,
            )
        ),
        "repeats": repeats,
        # The field names, for the long-tailed case; `uniform_*` for the other.
        "engine_tokens_per_s": tail["engine_tokens_per_s"],
        "static_tokens_per_s": tail["static_tokens_per_s"],
        "ratio": tail["ratio"],
        "p99_over_median": tail["p99_over_median"],
        "slot_occupancy": tail["slot_occupancy"],
        "uniform_engine_tokens_per_s": flat["engine_tokens_per_s"],
        "uniform_static_tokens_per_s": flat["static_tokens_per_s"],
        "uniform_ratio": flat["ratio"],
        "uniform_slot_occupancy": flat["slot_occupancy"],
        # Partial rollouts on the long-tailed case, against the same static sampler figure.
        "partial_tokens_per_s": part and part["tokens_per_s"],
        "partial_ratio": part and part["ratio"],
        "partial_slot_occupancy": part and part["slot_occupancy"],
        "partial": part,
        "partial_rebuild": part and rebuilt,
        "targets": {
            "ratio": TARGET_RATIO,
            "slot_occupancy": TARGET_OCCUPANCY,
            "uniform_ratio": TARGET_UNIFORM_RATIO,
            "partial_slot_occupancy": TARGET_PARTIAL_OCCUPANCY,
        },
        "cases": results,
        "environment": common.environment(),
    }
    common.print_table(
        [
            [
                name,
                r["p99_over_median"],
                r["static_tokens_per_s"],
                r["engine_tokens_per_s"],
                r["ratio"],
                r["static_row_occupancy"],
                r["slot_occupancy"],
            ]
            for name, r in results.items()
        ]
        + (
            [
                [
                    f"long_tail partial ({r['cache']})",
                    tail["p99_over_median"],
                    tail["static_tokens_per_s"],
                    r["tokens_per_s"],
                    r["ratio"],
                    tail["static_row_occupancy"],
                    r["slot_occupancy"],
                ]
                for r in (part, rebuilt)
                if r
            ]
            if part
            else []
        ),
        [
            "case",
            "p99/median",
            "static tok/s",
            "engine tok/s",
            "ratio",
            "static occ.",
            "engine occ.",
        ],
    )
    if _JSON.value:
        common.write_json(_JSON.value, record)


def _multi_turn(model, prompts, group, repeats, smoke, preset) -> None:
    got = multi_turn.run(
        model,
        prompts,
        group_size=group,
        max_new_tokens=8 if smoke else _MT_MAX_NEW.value,
        turn_tokens=2 if smoke else _MT_TURN.value,
        observation_tokens=1 if smoke else _MT_OBS.value,
        turns=2 if smoke else _MT_TURNS.value,
        repeats=repeats,
    )
    record = {
        "benchmark": "rollout_multi_turn",
        "smoke": smoke,
        "preset": preset,
        "num_params": model.cfg.num_params(),
        "prompts": len(prompts),
        "group_size": group,
        "prompt_len": len(prompts[0]),
        "max_new_tokens": 8 if smoke else _MT_MAX_NEW.value,
        "repeats": repeats,
        **got,
        "environment": common.environment(),
    }
    common.print_table(
        [
            [
                got["cached_tokens_per_s"],
                got["reprefill_tokens_per_s"],
                got["ratio"],
                got["tool_calls_mean"],
                got["policy_logprob_gap_vs_forward"],
            ]
        ],
        ["cached tok/s", "re-prefill tok/s", "ratio", "calls/traj.", "logprob gap"],
    )
    if _JSON.value:
        common.write_json(_JSON.value, record)


if __name__ == "__main__":
    app.run(main)
