"""Sampler throughput: our jitted sampler vs transformers' `generate`, same weights, same run.

    python -m benchmarks.sampling [--json=PATH] [--preset=llama-20m] [--batch=32]
        [--prompt_len=64] [--new_tokens=128] [--dtype=float32] [--repeats=3] [--profile]

Both sides sample at temperature 1 with no truncation and no stop token, so every row generates
exactly `new_tokens`; throughput is generated tokens per second of the whole call (prefill
included, as a caller sees it). Ours is also run with `group_size=8` on batch/8 prompts (the
same number of rows): the GRPO layout, whose prompt is prefilled and cached once per group.

`--profile` adds where our time goes: the cost of one decode step (from the slope between two
generation lengths, which share one executable), the prefill, the lm-head matmul alone, decode
attention per layer with the KV cache in today's [B, S, K, H] layout vs [B, K, S, H], and the
costliest XLA op kinds per step from a profiler trace of one sampler call.

Before timing, the two models' logits on the prompts are compared, so that a wrong weight copy
cannot pass for a speed difference.

The project's target is ours >= 2x HF tokens/s. On a shared CPU machine, check the load
average recorded in the JSON before comparing figures across runs.
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

from benchmarks import common
from models import Transformer, get_config, hf
from rl_reason import sampling
from rl_reason.sampling import SamplingConfig

_JSON = flags.DEFINE_string("json", None, "Write the results to this JSON file.")
_PRESET = flags.DEFINE_string("preset", "llama-20m", "models.config preset (Llama or Qwen2).")
_BATCH = flags.DEFINE_integer("batch", 32, "Rows generated per call.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row (no padding).")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "Tokens generated per row.")
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype, on both sides."
)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement, after one warm-up.")
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


def _hf_model(model: Transformer, dtype: str):
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(**hf.hf_config(model.cfg))
    config.bos_token_id = config.eos_token_id = None
    config.pad_token_id = 0
    ref = transformers.AutoModelForCausalLM.from_config(config).eval()
    state = {
        k: torch.from_numpy(np.array(v, dtype=np.float32))
        for k, v in hf.to_hf_state_dict(model).items()
    }
    result = ref.load_state_dict(state, strict=False)
    allowed_missing = ["lm_head.weight"] if model.cfg.tie_embeddings else []
    if list(result.unexpected_keys) or list(result.missing_keys) != allowed_missing:
        raise AssertionError(f"weight copy into transformers failed: {result}")
    ref = ref.to(getattr(torch, dtype))
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    return ref


def _check_same_model(model: Transformer, ref, prompts: np.ndarray) -> float:
    """Max |logit difference| of the two models on a few prompts; raises when it is not tiny."""
    import torch

    ids = prompts[:4]
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)), np.float32)
    with torch.inference_mode():
        theirs = ref(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()
    diff = float(np.abs(ours - theirs).max())
    limit = 1e-3 if model.cfg.dtype == "float32" else 0.5
    if not diff <= limit:
        raise AssertionError(
            f"our logits and transformers' differ by {diff} (> {limit}): the "
            "weight copy or the config mapping is wrong"
        )
    return diff


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


def _attention_layer_step(layout: str, cfg, rows: int, prompt_len: int, slots: int) -> float:
    """Seconds per layer and step of decode attention (cache write, scores over the prompt and
    own keys, values), with the KV cache laid out as `layout`: "BSKH" (models/kv_cache.py
    today) or "BKSH" (heads before slots)."""
    k, h, steps = cfg.num_kv_heads, cfg.head_dim, 16
    if layout == "BSKH":
        seq_axis, scores, values = 1, "bkh,bskh->bks", "bks,bskh->bkh"
    else:
        seq_axis, scores, values = 2, "bkh,bksh->bks", "bks,bksh->bkh"

    @jax.jit
    def run(q0, pk, pv, ks, vs):
        def body(step, carry):
            ks, vs, acc = carry
            q = q0 + step.astype(q0.dtype)
            new = jnp.expand_dims(q, seq_axis)
            ks = jax.lax.dynamic_update_slice_in_dim(ks, new, step, axis=seq_axis)
            vs = jax.lax.dynamic_update_slice_in_dim(vs, new, step, axis=seq_axis)
            s = jnp.concatenate([jnp.einsum(scores, q, pk), jnp.einsum(scores, q, ks)], -1)
            p = jax.nn.softmax(s, -1)
            o = jnp.einsum(values, p[..., :prompt_len], pv) + jnp.einsum(
                values, p[..., prompt_len:], vs
            )
            return ks, vs, acc + o

        return jax.lax.fori_loop(0, steps, body, (ks, vs, jnp.zeros_like(q0)))[2]

    def shape(n):
        return (rows, n, k, h) if layout == "BSKH" else (rows, k, n, h)

    q0 = jax.random.normal(jax.random.key(0), (rows, k, h))
    caches = [
        jax.random.normal(jax.random.key(seed), shape(n))
        for seed, n in enumerate((prompt_len, prompt_len, slots, slots))
    ]
    return _timeit(lambda: run(q0, *caches), 5) / steps


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
    for layout in ("BSKH", "BKSH"):
        result[f"attention_layer_step_cache_{layout}_s"] = _attention_layer_step(
            layout, cfg, rows, prompts.shape[1], sampling.bucket(new_tokens)
        )
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
    for layout in ("BSKH", "BKSH"):
        seconds = profile[f"attention_layer_step_cache_{layout}_s"]
        print(f"  attention/layer, {layout} cache {seconds * 1e3:8.3f} ms")
    print("  XLA ops per step (one traced call):")
    for name, ms in profile["xla_ops_ms_per_step"].items():
        print(f"    {name:36s} {ms:8.2f} ms" if isinstance(ms, float) else f"    {name}: {ms}")


def main(argv: list[str]) -> None:
    del argv
    if _TORCH_THREADS.value:
        import torch

        torch.set_num_threads(_TORCH_THREADS.value)
    batch, prompt_len, new_tokens = _BATCH.value, _PROMPT_LEN.value, _NEW_TOKENS.value
    group = _GROUP.value
    if batch % group:
        raise app.UsageError(f"--batch ({batch}) must be a multiple of --group_size ({group})")
    cfg = get_config(
        _PRESET.value,
        param_dtype=_DTYPE.value,
        dtype=_DTYPE.value,
        max_seq_len=max(get_config(_PRESET.value).max_seq_len, prompt_len + new_tokens),
    )
    env = common.environment()
    print(
        f"preset {_PRESET.value}: {cfg.num_params() / 1e6:.1f}M params, batch {batch}, "
        f"prompt {prompt_len}, new {new_tokens}, {_DTYPE.value}; {env['cpu_count']} CPUs, "
        f"torch threads {env['torch_threads']}, load {env['load_average_1_5_15']}"
    )

    model = Transformer(cfg, rngs=nnx.Rngs(_SEED.value))
    prompts = (
        np.random.default_rng(_SEED.value)
        .integers(1, cfg.vocab_size, (batch, prompt_len))
        .astype(np.int32)
    )
    ref = _hf_model(model, _DTYPE.value)
    logit_diff = _check_same_model(model, ref, prompts)

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
    seconds = common.time_interleaved(runs, _REPEATS.value)
    results = {
        name: {**common.summarize(seconds[name], batch * new_tokens), **warm[name]} for name in runs
    }
    results["ours_group"].update(prompts=batch // group, group_size=group)
    results["hf"].update(
        attn_implementation=ref.config._attn_implementation, torch_threads=env["torch_threads"]
    )
    ours, shared, theirs = results["ours"], results["ours_group"], results["hf"]
    fastest_hf = max(r["best_per_s"] for name, r in results.items() if name.startswith("hf"))

    ratio = ours["best_per_s"] / theirs["best_per_s"]
    rows = [
        [
            "ours (group 1)",
            ours["best_per_s"],
            ours["median_per_s"],
            ours["best_s"],
            ours["compile_s"],
        ],
        [
            f"ours (group {group}, {batch // group} prompts)",
            shared["best_per_s"],
            shared["median_per_s"],
            shared["best_s"],
            shared["compile_s"],
        ],
        [
            f"transformers generate ({theirs['attn_implementation']}, "
            f"{env['torch_threads']} threads)",
            theirs["best_per_s"],
            theirs["median_per_s"],
            theirs["best_s"],
            "-",
        ],
    ]
    if "hf_1thread" in results:
        one = results["hf_1thread"]
        rows.append(
            [
                f"transformers generate ({theirs['attn_implementation']}, 1 thread)",
                one["best_per_s"],
                one["median_per_s"],
                one["best_s"],
                "-",
            ]
        )
    print()
    common.print_table(rows, ["", "tok/s best", "tok/s median", "s best", "s compile"])
    print(
        f"\nours / transformers (best tok/s): {ratio:.2f}x, against its faster thread "
        f"setting {ours['best_per_s'] / fastest_hf:.2f}x  (target >= 2x); "
        f"group {group} / group 1: {shared['best_per_s'] / ours['best_per_s']:.2f}x"
    )

    profile = None
    if _PROFILE.value:
        profile = _profile(model, prompts, new_tokens)
        print_profile(profile)

    env["load_average_1_5_15_end"] = list(os.getloadavg())
    record = {
        "benchmark": "sampling",
        "ours_tokens_per_s": ours["best_per_s"],
        "ours_tokens_per_s_median": ours["median_per_s"],
        "ours_group_tokens_per_s": shared["best_per_s"],
        "hf_tokens_per_s": theirs["best_per_s"],
        "hf_tokens_per_s_median": theirs["median_per_s"],
        "ratio": ratio,
        "hf_fastest_tokens_per_s": fastest_hf,
        "ratio_vs_fastest_hf": ours["best_per_s"] / fastest_hf,
        "target_ratio": 2.0,
        "compile_seconds": ours["compile_s"],
        "settings": {
            "preset": _PRESET.value,
            "batch": batch,
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "dtype": _DTYPE.value,
            "repeats": _REPEATS.value,
            "group_size": group,
            "seed": _SEED.value,
            "num_params": cfg.num_params(),
            "temperature": 1.0,
        },
        "max_logit_diff_vs_hf": logit_diff,
        "ours": ours,
        "ours_group": shared,
        "hf": theirs,
        "hf_1thread": results.get("hf_1thread"),
        "profile": profile,
        "environment": env,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if _JSON.value:
        common.write_json(_JSON.value, record)
        print(f"\nwrote {_JSON.value}")


if __name__ == "__main__":
    app.run(main)
