"""Sampler speed: our jitted sampler vs transformers' `generate`, same weights, same run.

    python -m benchmarks.sampling [--json=PATH] [--preset=llama-20m] [--batch=32]
        [--prompt_len=64] [--new_tokens=128] [--dtype=float32] [--repeats=5] [--profile]
        [--smoke]

Both sides sample at temperature 1 with no truncation and no stop token, so every row generates
exactly `new_tokens`; throughput is generated tokens per second of the whole call (prefill
included, as a caller sees it). Ours is also run with `group_size=8` on batch/8 prompts (the
same number of rows): the GRPO layout, whose prompt is prefilled and cached once per group.
The prefill alone (the prompt pass that yields the first token's logits and the cache) is
timed on both sides too.

The machine's roofline (benchmarks/roofline.py: matmul FLOP/s, memory bytes/s) is measured in
the same run, before and after the timed calls (the better figure of the two is the limit), and
every throughput is also given as a fraction of it: the useful FLOPs of the call
(benchmarks/flops.py) per second over the matmul peak.

`--profile` adds where our time goes: the cost of one decode step (from the slope between two
generation lengths, which share one executable), the prefill, the lm-head matmul and the
token choice alone, and the costliest XLA op kinds per step from a profiler trace of one call.

Before timing, the two models' logits on the prompts are compared, so that a wrong weight copy
cannot pass for a speed difference. `--smoke` runs the tiny preset at toy sizes in seconds (a
test runs it so that this file cannot rot); its figures mean nothing.

Targets (issue "Performance"): ours >= 3x transformers' tokens/s and >= 50% of the compute
roofline, llama-20m, batch 32, prompt 64, 128 new tokens, float32. On a shared CPU machine,
check the load average recorded in the JSON before comparing figures across runs.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from benchmarks import common, flops, hf_reference, roofline
from models import Transformer, get_config, kv_cache
from rl_reason.rollout import sampling
from rl_reason.rollout.sampling import SamplingConfig

_JSON = flags.DEFINE_string("json", None, "Write the results to this JSON file.")
_PRESET = flags.DEFINE_string("preset", "llama-20m", "models.config preset (Llama or Qwen2).")
_BATCH = flags.DEFINE_integer("batch", 32, "Rows generated per call.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row (no padding).")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "Tokens generated per row.")
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype, on both sides."
)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per measurement, after one warm-up.")
_GROUP = flags.DEFINE_integer("group_size", 8, "Group size of the shared-prefill measurement.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and prompts.")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 0, "torch.set_num_threads for transformers; 0 leaves torch's default."
)
_HF_ONE_THREAD = flags.DEFINE_bool(
    "hf_one_thread",
    True,
    "Also time transformers with torch.set_num_threads(1). On a loaded machine torch's default "
    "threads can collapse (OpenMP threads waiting on each other); the ratio against the faster "
    "of the two keeps such a collapse from flattering ours.",
)
_PROFILE = flags.DEFINE_bool("profile", False, "Also show where our decode step's time goes.")
_CPUS = flags.DEFINE_integer(
    "cpus", 0, "Confine both sides to this many CPUs (common.limit_cpus); 0: all of them."
)
_SMOKE = flags.DEFINE_bool(
    "smoke", False, "Tiny preset, batch 4, prompt 16, 8 new tokens, 1 repeat: checks it runs."
)

TARGET_RATIO = 3.0
TARGET_ROOFLINE_FRACTION = 0.5


def _ours_runner(model: Transformer, prompts: np.ndarray, group_size: int, new_tokens: int):
    """A zero-argument call that samples and blocks; each call draws with a fresh key."""
    graph_params = nnx.split(model)
    prompt_list = prompts.tolist()
    config = SamplingConfig(temperature=1.0)
    calls = iter(range(1 << 30))

    def run(max_new_tokens: int = new_tokens):
        out = sampling.sample(
            graph_params,
            prompt_list,
            jax.random.key(next(calls)),
            group_size=group_size,
            max_new_tokens=max_new_tokens,
            config=config,
            prompt_width=prompts.shape[1],
            buffer_len=sampling.bucket(new_tokens),
        )
        return jax.block_until_ready(out)

    return run


def _check_ours(out: sampling.SampleOutput, rows: int, new_tokens: int) -> None:
    lengths = np.asarray(out.lengths)
    if lengths.shape != (rows,) or not np.all(lengths == new_tokens):
        raise AssertionError(
            f"expected {rows} rows of {new_tokens} tokens, got lengths "
            f"{sorted(set(lengths.tolist()))} over {lengths.shape}"
        )


def _warm_up_ours(run, rows: int, new_tokens: int) -> dict[str, float]:
    compiled_before, start = common.compile_seconds(), time.perf_counter()
    _check_ours(run(), rows, new_tokens)
    return {
        "first_call_s": time.perf_counter() - start,
        "compile_s": common.compile_seconds() - compiled_before,
    }


def _hf_runner(ref, prompts: np.ndarray, new_tokens: int, threads: int | None = None):
    """A zero-argument call of `generate` that checks every row ran to `new_tokens`, with
    torch's intra-op threads set to `threads` for the call (None: as they are)."""
    import torch

    ids = torch.as_tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)
    want = (ids.shape[0], ids.shape[1] + new_tokens)

    def run():
        previous = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                out = ref.generate(
                    ids,
                    attention_mask=mask,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                )
        finally:
            torch.set_num_threads(previous)
        if tuple(out.shape) != want:
            raise AssertionError(f"transformers generated {tuple(out.shape)}, expected {want}")
        return out

    return run


def _timeit(fn, repeats: int = 20) -> float:
    """Median seconds of a blocking call, after one warm-up call (which compiles)."""
    jax.block_until_ready(fn())
    return statistics.median(common.time_calls(lambda: jax.block_until_ready(fn()), repeats))


def _xla_op_times(run, steps: int, top: int = 8) -> dict[str, float]:
    """Milliseconds per decode step of the costliest XLA op kinds in one sampler call.

    From a JAX profiler trace: ops are grouped by their fusion kind (`transpose_copy_fusion.7`
    counts as `transpose_copy_fusion`), so that a layout copy or a slow reduction that XLA
    repeats every step shows up as one line.
    """
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            run()
        (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals: collections.Counter[str] = collections.Counter()
    for e in events:
        name = e.get("name", "")
        # Python frames ($...), runtime spans (C++ names) and the loop op enclose the ops.
        host_span = name.startswith("$") or "::" in name or "(" in name
        if e.get("ph") != "X" or host_span or "Thunk" in name or "while" in name:
            continue
        totals[re.sub(r"\.\d+$", "", name)] += e.get("dur", 0)
    return {name: us / 1e3 / steps for name, us in totals.most_common(top)}


def _profile(model: Transformer, prompts: np.ndarray, new_tokens: int) -> dict[str, Any]:
    """Where one decode step of ours goes, for the group_size=1 layout."""
    cfg, rows = model.cfg, prompts.shape[0]
    run = _ours_runner(model, prompts, 1, new_tokens)
    half = max(1, new_tokens // 2)
    # max_new_tokens is traced, so both lengths run the same executable: the difference is
    # pure decode steps (prefill and fixed costs cancel).
    full = _timeit(run, 5)
    short = _timeit(lambda: run(half), 5)
    step = (full - short) / (new_tokens - half)

    hidden = jax.random.normal(jax.random.key(0), (rows, 1, cfg.embed_dim), cfg.jnp_dtype)
    head = model.unembed_matrix()
    lm_head = jax.jit(
        lambda h, w: jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
    )
    graphdef, params = nnx.split(model)
    ids, mask = jnp.asarray(prompts), jnp.ones(prompts.shape, bool)
    prefill = jax.jit(
        lambda params, ids, mask: nnx.merge(graphdef, params)(
            ids, mask_BT=mask, return_hidden=True, return_kv=True
        )
    )
    result: dict[str, Any] = {
        "ours_step_s": step,
        "ours_prefill_s": _timeit(lambda: prefill(params, ids, mask), 5),
        "lm_head_matmul_s": _timeit(lambda: lm_head(hidden, head)),
        "lm_head_gflop": 2 * rows * cfg.embed_dim * cfg.vocab_size / 1e9,
    }
    logits = jax.random.normal(jax.random.key(1), (rows, cfg.vocab_size), jnp.float32)
    choose = jax.jit(lambda x, k: sampling._choose(x, k, SamplingConfig(temperature=1.0)))
    u = jax.random.uniform(jax.random.key(2), (rows,), jnp.float32)
    result["choose_token_s"] = _timeit(lambda: choose(logits, u))
    try:
        result["xla_ops_ms_per_step"] = _xla_op_times(run, new_tokens)
    except Exception as e:  # the trace format is the profiler's, not a stable API
        result["xla_ops_ms_per_step"] = {"unavailable": repr(e)}
    return result


def print_profile(profile: dict[str, Any]) -> None:
    step = profile["ours_step_s"]
    print(f"\nour decode step: {step * 1e3:.2f} ms (slope between two lengths)")
    print(f"  prefill (whole batch)       {profile['ours_prefill_s'] * 1e3:8.2f} ms")
    gflops = profile["lm_head_gflop"] / profile["lm_head_matmul_s"]
    print(
        f"  lm-head matmul alone        {profile['lm_head_matmul_s'] * 1e3:8.2f} ms "
        f"({profile['lm_head_gflop']:.3f} GFLOP at {gflops:.0f} GFLOP/s, "
        f"{profile['lm_head_matmul_s'] / step:.0%} of a step)"
    )
    choose = profile["choose_token_s"]
    print(f"  token choice alone          {choose * 1e3:8.2f} ms ({choose / step:.0%} of a step)")
    print("  XLA ops per step (one traced call):")
    for name, ms in profile["xla_ops_ms_per_step"].items():
        print(f"    {name:36s} {ms:8.2f} ms" if isinstance(ms, float) else f"    {name}: {ms}")


def _ours_prefill(model: Transformer, prompts: np.ndarray):
    """The sampler's prompt pass alone: hidden states and per-layer keys/values, logits of the
    last position, the cache built from them."""
    graphdef, params = nnx.split(model)
    ids, mask = jnp.asarray(prompts), jnp.ones(prompts.shape, bool)

    @jax.jit
    def prefill(params, ids, mask):
        m = nnx.merge(graphdef, params)
        hidden, kvs = m(ids, mask_BT=mask, return_hidden=True, return_kv=True)
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        cache = kv_cache.from_prefill(kvs, mask, positions, 1, 1)
        return m.logits(hidden[:, -1:]), cache

    return lambda: jax.block_until_ready(prefill(params, ids, mask))


def _hf_prefill(ref, prompts: np.ndarray):
    """transformers' prompt pass as `generate` runs it: cache on, logits of the last token."""
    import torch

    ids = torch.as_tensor(prompts, dtype=torch.long)

    def run():
        with torch.inference_mode():
            return ref(ids, use_cache=True, logits_to_keep=1).logits

    return run


def _settings() -> dict[str, Any]:
    if _SMOKE.value:
        # Prompts of 16: the rollout benchmark's smoke samples the same group-1 program.
        return dict(preset="tiny", batch=4, prompt_len=16, new_tokens=8, repeats=1, group=2)
    return dict(
        preset=_PRESET.value,
        batch=_BATCH.value,
        prompt_len=_PROMPT_LEN.value,
        new_tokens=_NEW_TOKENS.value,
        repeats=_REPEATS.value,
        group=_GROUP.value,
    )


def _peak(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The better of two roofline measurements (a limit is what the machine can reach)."""
    return {
        k: max(before[k], after[k]) if isinstance(before[k], float) else before[k] for k in before
    }


def main(argv: list[str]) -> None:
    del argv
    if _CPUS.value:
        common.limit_cpus(_CPUS.value)
    if _TORCH_THREADS.value:
        import torch

        torch.set_num_threads(_TORCH_THREADS.value)
    st = _settings()
    batch, prompt_len, new_tokens = st["batch"], st["prompt_len"], st["new_tokens"]
    group = st["group"]
    if batch % group:
        raise app.UsageError(f"--batch ({batch}) must be a multiple of --group_size ({group})")
    cfg = get_config(
        st["preset"],
        param_dtype=_DTYPE.value,
        dtype=_DTYPE.value,
        max_seq_len=max(get_config(st["preset"]).max_seq_len, prompt_len + new_tokens),
    )
    env = common.environment()
    print(
        f"preset {st['preset']}: {cfg.num_params() / 1e6:.1f}M params, batch {batch}, "
        f"prompt {prompt_len}, new {new_tokens}, {_DTYPE.value}; {env['cpu_count']} CPUs, "
        f"torch threads {env['torch_threads']}, load {env['load_average_1_5_15']}"
    )
    roof_before = roofline.measure(_SMOKE.value)

    model = Transformer(cfg, rngs=nnx.Rngs(_SEED.value))
    prompts = (
        np.random.default_rng(_SEED.value)
        .integers(1, cfg.vocab_size, (batch, prompt_len))
        .astype(np.int32)
    )
    ref = hf_reference.torch_model(model, _DTYPE.value)
    logit_diff = hf_reference.check_same_logits(model, ref, prompts)

    runs = {
        "ours": _ours_runner(model, prompts, 1, new_tokens),
        "ours_group": _ours_runner(model, prompts[: batch // group], group, new_tokens),
        "hf": _hf_runner(ref, prompts, new_tokens),
    }
    if _HF_ONE_THREAD.value:
        runs["hf_1thread"] = _hf_runner(ref, prompts, new_tokens, threads=1)
    warm = {
        "ours": _warm_up_ours(runs["ours"], batch, new_tokens),
        "ours_group": _warm_up_ours(runs["ours_group"], batch, new_tokens),
    }
    for name in runs:
        if name.startswith("hf"):
            start = time.perf_counter()
            runs[name]()
            warm[name] = {"first_call_s": time.perf_counter() - start}
    prefills = {
        "ours_prefill": _ours_prefill(model, prompts),
        "hf_prefill": _hf_prefill(ref, prompts),
    }
    for fn in prefills.values():
        fn()
    seconds = common.time_interleaved({**runs, **prefills}, st["repeats"])
    roof = _peak(roof_before, roofline.measure(_SMOKE.value))

    work = {
        "prefill_flops": flops.prefill_flops(cfg, batch, prompt_len),
        "decode_flops": flops.decode_flops(cfg, batch, prompt_len, new_tokens),
    }
    work["call_flops"] = work["prefill_flops"] + work["decode_flops"]
    group_work = flops.prefill_flops(cfg, batch // group, prompt_len) + work["decode_flops"]
    peak_key = "matmul_bf16_flops_per_s" if _DTYPE.value == "bfloat16" else "matmul_f32_flops_per_s"
    peak = roof[peak_key]
    results: dict[str, Any] = {}
    for name in runs:
        r = {**common.summarize(seconds[name], batch * new_tokens), **warm[name]}
        call_flops = group_work if name == "ours_group" else work["call_flops"]
        r["flops_per_s"] = call_flops / r["best_s"]
        r["roofline_fraction"] = r["flops_per_s"] / peak
        results[name] = r
    for name in prefills:
        r = common.summarize(seconds[name], batch * prompt_len)
        r["roofline_fraction"] = work["prefill_flops"] / r["best_s"] / peak
        results[name] = r
    results["ours_group"].update(prompts=batch // group, group_size=group)
    results["hf"].update(
        attn_implementation=ref.config._attn_implementation, torch_threads=env["torch_threads"]
    )
    ours, shared, theirs = results["ours"], results["ours_group"], results["hf"]
    hf_names = [n for n in runs if n.startswith("hf")]
    fastest_hf = max(results[n]["best_per_s"] for n in hf_names)
    ratio = ours["best_per_s"] / fastest_hf
    # Decode steps alone: the call minus its prefill, over the new_tokens - 1 fed-back tokens.
    for name, pre in (("ours", "ours_prefill"), ("hf", "hf_prefill")):
        step = (results[name]["best_s"] - results[pre]["best_s"]) / max(new_tokens - 1, 1)
        results[name]["decode_step_s"] = step
        results[name]["decode_roofline_fraction"] = (
            work["decode_flops"] / max(new_tokens - 1, 1) / max(step, 1e-12) / peak
        )
    own_keys = (new_tokens - 1) / 2
    step_bound = roofline.bound_seconds(
        work["decode_flops"] / max(new_tokens - 1, 1),
        flops.decode_step_bytes(cfg, batch, batch, prompt_len, own_keys),
        roof,
        _DTYPE.value,
    )

    def row(label, r, compile_s="-"):
        return [
            label,
            r["best_per_s"],
            r["median_per_s"],
            r["best_s"],
            f"{r['roofline_fraction']:.0%}",
            compile_s,
        ]

    rows = [
        row("ours (group 1)", ours, f"{ours['compile_s']:.2f}"),
        row(
            f"ours (group {group}, {batch // group} prompts)", shared, f"{shared['compile_s']:.2f}"
        ),
        row(
            f"transformers generate ({theirs['attn_implementation']}, "
            f"{env['torch_threads']} threads)",
            theirs,
        ),
    ]
    if "hf_1thread" in results:
        rows.append(row("transformers generate (1 thread)", results["hf_1thread"]))
    print()
    print(roofline.describe(roof))
    common.print_table(
        rows, ["", "tok/s best", "tok/s median", "s best", "of roofline", "s compile"]
    )
    print(
        f"\nprefill: ours {results['ours_prefill']['best_s'] * 1e3:.1f} ms, transformers "
        f"{results['hf_prefill']['best_s'] * 1e3:.1f} ms; decode step: ours "
        f"{ours['decode_step_s'] * 1e3:.2f} ms ({ours['decode_roofline_fraction']:.0%} of the "
        f"compute roofline; bound {step_bound['bound_s'] * 1e3:.2f} ms by "
        f"{step_bound['bound_by']}), transformers {theirs['decode_step_s'] * 1e3:.2f} ms"
    )
    print(
        f"ours / faster transformers (best tok/s): {ratio:.2f}x (target >= {TARGET_RATIO:g}x); "
        f"ours at {ours['roofline_fraction']:.0%} of the compute roofline (target >= "
        f"{TARGET_ROOFLINE_FRACTION:.0%}); group {group} / group 1: "
        f"{shared['best_per_s'] / ours['best_per_s']:.2f}x"
    )

    profile = None
    if _PROFILE.value:
        profile = _profile(model, prompts, new_tokens)
        print_profile(profile)

    env["load_average_1_5_15_end"] = list(os.getloadavg())
    record = {
        "benchmark": "sampling",
        "smoke": _SMOKE.value,
        "ours_tokens_per_s": ours["best_per_s"],
        "ours_tokens_per_s_median": ours["median_per_s"],
        "ours_group_tokens_per_s": shared["best_per_s"],
        "hf_tokens_per_s": theirs["best_per_s"],
        "hf_tokens_per_s_median": theirs["median_per_s"],
        "hf_fastest_tokens_per_s": fastest_hf,
        "ratio": ratio,
        "ratio_vs_hf_default_threads": ours["best_per_s"] / theirs["best_per_s"],
        "ratio_median": ours["median_per_s"] / max(results[n]["median_per_s"] for n in hf_names),
        "roofline_fraction": ours["roofline_fraction"],
        "decode_step_roofline_fraction": ours["decode_roofline_fraction"],
        "decode_step_bound": step_bound,
        "target_ratio": TARGET_RATIO,
        "target_roofline_fraction": TARGET_ROOFLINE_FRACTION,
        "met_targets": ratio >= TARGET_RATIO
        and ours["roofline_fraction"] >= TARGET_ROOFLINE_FRACTION,
        "prefill_seconds_ours": results["ours_prefill"]["best_s"],
        "prefill_seconds_hf": results["hf_prefill"]["best_s"],
        "compile_seconds": ours["compile_s"],
        "work": work,
        "roofline": roof,
        "roofline_before": roof_before,
        "settings": {
            **st,
            "dtype": _DTYPE.value,
            "cpus": _CPUS.value or None,
            "seed": _SEED.value,
            "num_params": cfg.num_params(),
            "temperature": 1.0,
        },
        "max_logit_diff_vs_hf": logit_diff,
        "results": results,
        "profile": profile,
        "environment": env,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if _JSON.value:
        common.write_json(_JSON.value, record)
        print(f"\nwrote {_JSON.value}")


if __name__ == "__main__":
    app.run(main)
