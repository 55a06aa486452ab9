"""Sampler throughput: our jitted sampler vs transformers' `generate`, same weights, same run.

    python -m benchmarks.sampling [--json=PATH] [--preset=llama-20m] [--batch=32]
        [--prompt_len=64] [--new_tokens=128] [--dtype=float32] [--repeats=3] [--profile]

Both sides sample at temperature 1 with no truncation and no stop token, so every row generates
exactly `new_tokens`; throughput is generated tokens per second of the whole call (prefill
included, as a caller sees it). Ours is also run with `group_size=8` on batch/8 prompts (the
same number of rows): the GRPO layout, whose prompt is prefilled and cached once per group.

`--profile` adds where our time goes: the cost of one decode step (from the slope between two
generation lengths, which share one executable), the model's decode step alone, the lm-head
matmul alone and the per-token sampling math alone.

The project's target is ours >= 2x HF tokens/s. On a shared CPU machine, check the load
average recorded in the JSON before comparing figures across runs.
"""

from __future__ import annotations

import os
import statistics
import time

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
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Parameter and compute dtype, on both sides.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement, after one warm-up.")
_GROUP = flags.DEFINE_integer("group_size", 8, "Group size of the shared-prefill measurement.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and prompts.")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 0, "torch.set_num_threads for transformers; 0 leaves torch's default.")
_PROFILE = flags.DEFINE_bool("profile", False, "Also time the parts of our decode step.")


def _ours_runner(model: Transformer, prompts: np.ndarray, group_size: int, new_tokens: int):
    """A zero-argument call that samples and blocks; each call draws with a fresh key."""
    graph_params = nnx.split(model)
    prompt_list = prompts.tolist()
    config = SamplingConfig(temperature=1.0)
    calls = iter(range(1 << 30))

    def run(max_new_tokens: int = new_tokens):
        out = sampling.sample(graph_params, prompt_list, jax.random.key(next(calls)),
                              group_size=group_size, max_new_tokens=max_new_tokens,
                              config=config, prompt_width=prompts.shape[1],
                              buffer_len=sampling.bucket(new_tokens))
        return jax.block_until_ready(out)

    return run


def _check_ours(out: sampling.SampleOutput, rows: int, new_tokens: int) -> None:
    lengths = np.asarray(out.lengths)
    if lengths.shape != (rows,) or not np.all(lengths == new_tokens):
        raise AssertionError(f"expected {rows} rows of {new_tokens} tokens, got lengths "
                             f"{sorted(set(lengths.tolist()))} over {lengths.shape}")


def _warm_up_ours(run, rows: int, new_tokens: int) -> dict[str, float]:
    compiled_before, start = common.compile_seconds(), time.perf_counter()
    _check_ours(run(), rows, new_tokens)
    return {"first_call_s": time.perf_counter() - start,
            "compile_s": common.compile_seconds() - compiled_before}


def _hf_model(model: Transformer, dtype: str):
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(**hf.hf_config(model.cfg))
    config.bos_token_id = config.eos_token_id = None
    config.pad_token_id = 0
    ref = transformers.AutoModelForCausalLM.from_config(config).eval()
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32))
             for k, v in hf.to_hf_state_dict(model).items()}
    result = ref.load_state_dict(state, strict=False)
    allowed_missing = ["lm_head.weight"] if model.cfg.tie_embeddings else []
    if list(result.unexpected_keys) or list(result.missing_keys) != allowed_missing:
        raise AssertionError(f"weight copy into transformers failed: {result}")
    ref = ref.to(getattr(torch, dtype))
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    return ref


def _hf_runner(ref, prompts: np.ndarray, new_tokens: int):
    """A zero-argument call of `generate` that checks every row ran to `new_tokens`."""
    import torch

    ids = torch.as_tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)
    want = (ids.shape[0], ids.shape[1] + new_tokens)

    def run():
        with torch.inference_mode():
            out = ref.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0,
                               top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens)
        if tuple(out.shape) != want:
            raise AssertionError(f"transformers generated {tuple(out.shape)}, expected {want}")
        return out

    return run


def _timeit(fn, repeats: int = 20) -> float:
    """Median seconds of a blocking call, after one warm-up call (which compiles)."""
    jax.block_until_ready(fn())
    return statistics.median(common.time_calls(lambda: jax.block_until_ready(fn()), repeats))


def _profile(model: Transformer, prompts: np.ndarray, new_tokens: int) -> dict[str, float]:
    """Seconds per decode step and of its parts, for the group_size=1 layout."""
    cfg, rows = model.cfg, prompts.shape[0]
    run = _ours_runner(model, prompts, 1, new_tokens)
    half = max(1, new_tokens // 2)
    # max_new_tokens is traced, so both lengths run the same executable: the difference is
    # pure decode steps (prefill and fixed costs cancel).
    full = _timeit(run, 5)
    short = _timeit(lambda: run(half), 5)
    step = (full - short) / (new_tokens - half)

    graphdef, params = nnx.split(model)
    cache_len = sampling.bucket(new_tokens)
    ids = jnp.asarray(prompts)
    mask = jnp.ones(ids.shape, bool)

    @jax.jit
    def prefill(params, ids, mask):
        m = nnx.merge(graphdef, params)
        positions = jnp.cumsum(mask, axis=-1) - 1
        _, kvs = m(ids, mask_BT=mask, positions_BT=positions, return_hidden=True,
                   return_kv=True)
        from models import kv_cache

        return kv_cache.from_prefill(kvs, mask, positions, 1, cache_len)

    cache = prefill(params, ids, mask)
    tokens = jnp.ones((rows,), jnp.int32)
    positions = jnp.full((rows,), prompts.shape[1], jnp.int32)

    @jax.jit
    def decode(params, tokens, positions, cache):
        return nnx.merge(graphdef, params).decode(tokens, positions, cache)

    hidden = jax.random.normal(jax.random.key(0), (rows, 1, cfg.embed_dim), cfg.jnp_dtype)
    head = model.unembed_matrix()

    @jax.jit
    def lm_head(h, w):
        return jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)

    logits = jax.random.normal(jax.random.key(1), (rows, cfg.vocab_size), jnp.float32)
    sample_cfg = SamplingConfig(temperature=1.0)

    @jax.jit
    def choose(logits, key):
        return sampling._choose(logits, key, sample_cfg)

    gumbel = jax.jit(lambda key: jax.random.gumbel(key, logits.shape, jnp.float32))
    log_softmax = jax.jit(jax.nn.log_softmax)

    return {
        "ours_step_s": step,
        "ours_prefill_s": _timeit(lambda: prefill(params, ids, mask)),
        "model_decode_step_s": _timeit(lambda: decode(params, tokens, positions, cache)),
        "lm_head_matmul_s": _timeit(lambda: lm_head(hidden, head)),
        "lm_head_gflop": 2 * rows * cfg.embed_dim * cfg.vocab_size / 1e9,
        "sampling_math_s": _timeit(lambda: choose(logits, jax.random.key(2))),
        # The two halves of the sampling math: the noise of the Gumbel-max draw (one random
        # number per vocabulary entry and row) and one log-softmax over the vocabulary.
        "gumbel_noise_s": _timeit(lambda: gumbel(jax.random.key(3))),
        "log_softmax_s": _timeit(lambda: log_softmax(logits)),
    }


def main(argv: list[str]) -> None:
    del argv
    if _TORCH_THREADS.value:
        import torch

        torch.set_num_threads(_TORCH_THREADS.value)
    batch, prompt_len, new_tokens = _BATCH.value, _PROMPT_LEN.value, _NEW_TOKENS.value
    group = _GROUP.value
    if batch % group:
        raise app.UsageError(f"--batch ({batch}) must be a multiple of --group_size ({group})")
    cfg = get_config(_PRESET.value, param_dtype=_DTYPE.value, dtype=_DTYPE.value,
                     max_seq_len=max(get_config(_PRESET.value).max_seq_len,
                                     prompt_len + new_tokens))
    env = common.environment()
    print(f"preset {_PRESET.value}: {cfg.num_params() / 1e6:.1f}M params, batch {batch}, "
          f"prompt {prompt_len}, new {new_tokens}, {_DTYPE.value}; {env['cpu_count']} CPUs, "
          f"torch threads {env['torch_threads']}, load {env['load_average_1_5_15']}")

    model = Transformer(cfg, rngs=nnx.Rngs(_SEED.value))
    prompts = np.random.default_rng(_SEED.value).integers(
        1, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
    ref = _hf_model(model, _DTYPE.value)

    runs = {
        "ours": _ours_runner(model, prompts, 1, new_tokens),
        "ours_group": _ours_runner(model, prompts[:batch // group], group, new_tokens),
        "hf": _hf_runner(ref, prompts, new_tokens),
    }
    warm = {"ours": _warm_up_ours(runs["ours"], batch, new_tokens),
            "ours_group": _warm_up_ours(runs["ours_group"], batch, new_tokens)}
    start = time.perf_counter()
    runs["hf"]()
    warm["hf"] = {"first_call_s": time.perf_counter() - start}
    seconds = common.time_interleaved(runs, _REPEATS.value)
    results = {name: {**common.summarize(seconds[name], batch * new_tokens), **warm[name]}
               for name in runs}
    results["ours_group"].update(prompts=batch // group, group_size=group)
    results["hf"]["attn_implementation"] = ref.config._attn_implementation
    ours, shared, theirs = results["ours"], results["ours_group"], results["hf"]

    ratio = ours["best_per_s"] / theirs["best_per_s"]
    rows = [
        ["ours (group 1)", ours["best_per_s"], ours["median_per_s"], ours["best_s"],
         ours["compile_s"]],
        [f"ours (group {group}, {batch // group} prompts)", shared["best_per_s"],
         shared["median_per_s"], shared["best_s"], shared["compile_s"]],
        [f"transformers generate ({theirs['attn_implementation']})", theirs["best_per_s"],
         theirs["median_per_s"], theirs["best_s"], "-"],
    ]
    print()
    common.print_table(rows, ["", "tok/s best", "tok/s median", "s best", "s compile"])
    print(f"\nours / transformers (best tok/s): {ratio:.2f}x  (target >= 2x); "
          f"group {group} / group 1: {shared['best_per_s'] / ours['best_per_s']:.2f}x")

    profile = None
    if _PROFILE.value:
        profile = _profile(model, prompts, new_tokens)
        print("\nour decode step, median seconds:")
        for k, v in profile.items():
            print(f"  {k:22s} {v * 1e3:9.3f} ms" if k.endswith("_s") else f"  {k:22s} {v:9.3f}")
        gflops = profile["lm_head_gflop"] / profile["lm_head_matmul_s"]
        print(f"  {'lm_head GFLOP/s':22s} {gflops:9.1f}")

    env["load_average_1_5_15_end"] = list(os.getloadavg())
    record = {
        "benchmark": "sampling",
        "ours_tokens_per_s": ours["best_per_s"],
        "ours_tokens_per_s_median": ours["median_per_s"],
        "ours_group_tokens_per_s": shared["best_per_s"],
        "hf_tokens_per_s": theirs["best_per_s"],
        "hf_tokens_per_s_median": theirs["median_per_s"],
        "ratio": ratio,
        "target_ratio": 2.0,
        "compile_seconds": ours["compile_s"],
        "settings": {"preset": _PRESET.value, "batch": batch, "prompt_len": prompt_len,
                     "new_tokens": new_tokens, "dtype": _DTYPE.value, "repeats": _REPEATS.value,
                     "group_size": group, "seed": _SEED.value,
                     "num_params": cfg.num_params(), "temperature": 1.0},
        "ours": ours,
        "ours_group": shared,
        "hf": theirs,
        "profile": profile,
        "environment": env,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if _JSON.value:
        common.write_json(_JSON.value, record)
        print(f"\nwrote {_JSON.value}")


if __name__ == "__main__":
    app.run(main)
