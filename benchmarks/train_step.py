"""Train-step speed: our jitted GRPO update vs PyTorch forward + backward + AdamW, same run.

    python -m benchmarks.train_step [--json=PATH] [--preset=llama-20m] [--rows=16]
        [--prompt_len=64] [--completion_len=128] [--dtype=float32] [--remat=none]
        [--chunk_size=0] [--repeats=5] [--smoke]

Both sides take one optimizer step on the same weights and the same batch: rows of a prompt
followed by a completion, the completion's token log-probs (lm-head on the completion positions
only), their entropy as a metric, the clipped GRPO surrogate with token-mean aggregation,
gradient clipping at global norm 1 and AdamW (b1 0.9, b2 0.99). Ours is
`rl_reason.core.update.StepFns.update`; the reference is the transformers model of the same
family with our weights (benchmarks/hf_reference.py), a hand-written loss of the same formula
and `torch.optim.AdamW`. Before timing, the first step's loss and gradient norm are compared,
so that the two cannot be doing different work.

Throughput is trained tokens (prompt + completion) per second; MFU is the step's useful FLOPs
(benchmarks/flops.py: 3x the forward) per second over the matmul peak measured in the same run
(benchmarks/roofline.py). With `--dtype=bfloat16` ours keeps float32 weights and computes in
bfloat16 (float32 logits, loss and optimizer), and torch runs under `torch.autocast`.

Target (issue "Performance"): ours >= 1.0x PyTorch tokens/s. `--smoke` runs the tiny preset at
toy sizes in seconds; its figures mean nothing.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from benchmarks import common, flops, hf_reference, roofline
from models import Transformer, get_config
from rl_reason.core import update as train_step
from rl_reason.core.config import LossOptions, OptimOptions
from rl_reason.infra import sharding

_JSON = flags.DEFINE_string("json", None, "Write the results to this JSON file.")
_PRESET = flags.DEFINE_string("preset", "llama-20m", "models.config preset (Llama or Qwen2).")
_ROWS = flags.DEFINE_integer("rows", 16, "Rows per step.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row.")
_COMPLETION_LEN = flags.DEFINE_integer("completion_len", 128, "Completion tokens per row.")
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"], "Compute dtype (weights stay float32)."
)
_REMAT = flags.DEFINE_enum("remat", "none", ["none", "full", "dots"], "ModelConfig.remat.")
_CHUNK = flags.DEFINE_integer(
    "chunk_size", 0, "Completion positions per lm-head chunk of the log-probs; 0: one chunk."
)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps per side, after one warm-up.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and the batch.")
_CPUS = flags.DEFINE_integer(
    "cpus", 0, "Confine both sides to this many CPUs (common.limit_cpus); 0: all of them."
)
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny preset, 4 rows of 8 + 8 tokens, 1 repeat.")
_TORCH_ONE_THREAD = flags.DEFINE_bool(
    "torch_one_thread",
    True,
    "Also time torch with torch.set_num_threads(1): on a loaded machine its default threads can "
    "collapse; the ratio is against the faster of the two settings.",
)

TARGET_RATIO = 1.0
CLIP_EPS = 0.2
LEARNING_RATE = 1e-5


def _settings() -> dict[str, Any]:
    if _SMOKE.value:
        return dict(preset="tiny", rows=4, prompt_len=8, completion_len=8, repeats=1)
    return dict(
        preset=_PRESET.value,
        rows=_ROWS.value,
        prompt_len=_PROMPT_LEN.value,
        completion_len=_COMPLETION_LEN.value,
        repeats=_REPEATS.value,
    )


def _batch(cfg, rows: int, tp: int, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "prompt_ids": rng.integers(1, cfg.vocab_size, (rows, tp)).astype(np.int32),
        "prompt_mask": np.ones((rows, tp), bool),
        "tokens": rng.integers(1, cfg.vocab_size, (rows, n)).astype(np.int32),
        "mask": np.ones((rows, n), np.float32),
        "advantages": rng.choice([-1.0, 1.0], rows).astype(np.float32),
    }


class _Ours:
    """Our update, its state carried (and donated) from call to call."""

    def __init__(self, model: Transformer, host: dict[str, np.ndarray], chunk_size: int | None):
        graphdef, params = nnx.split(model)
        mesh = sharding.make_mesh()
        params = jax.device_put(params, sharding.state_shardings(params, mesh))
        optim = OptimOptions(learning_rate=LEARNING_RATE, adam_b1=0.9, adam_b2=0.99)
        loss_cfg = LossOptions(
            clip_eps_low=CLIP_EPS, clip_eps_high=CLIP_EPS, logprob_chunk_size=chunk_size
        )
        self.fns = train_step.StepFns(
            graphdef, params, train_step.make_optimizer(optim), loss_cfg, mesh
        )
        d = {k: jnp.asarray(v) for k, v in host.items()}
        # Old log-probs of the current policy: the first step's ratios are exactly 1.
        old = self.fns.logprobs(params, d["prompt_ids"], d["prompt_mask"], d["tokens"], d["mask"])
        self.old_logp = np.asarray(old)
        self.batch = train_step.Batch(
            prompt_ids=d["prompt_ids"],
            prompt_mask=d["prompt_mask"],
            tokens=d["tokens"],
            mask=d["mask"],
            old_logp=old,
            ref_logp=jnp.zeros_like(old),
            advantages=d["advantages"],
        )
        self.params, self.opt_state = params, self.fns.init_opt_state(params)

    def __call__(self) -> dict[str, float]:
        self.params, self.opt_state, metrics = self.fns.update(
            self.params, self.opt_state, self.batch
        )
        return jax.device_get(metrics)  # blocks, as the trainer does


class _Torch:
    """The same step in PyTorch: transformers model, the same loss formula, AdamW."""

    def __init__(self, ref, host, old_logp: np.ndarray, dtype: str, threads: int | None = None):
        import torch

        self.torch = torch
        self.threads = threads
        self.ref = ref.train()
        self.opt = torch.optim.AdamW(
            self.ref.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.99), weight_decay=0.0
        )
        self.ids = torch.as_tensor(
            np.concatenate([host["prompt_ids"], host["tokens"]], 1), dtype=torch.long
        )
        self.attn_mask = torch.ones_like(self.ids)
        self.tokens = torch.as_tensor(host["tokens"], dtype=torch.long)
        self.mask = torch.as_tensor(host["mask"])
        self.old = torch.from_numpy(np.array(old_logp))
        self.adv = torch.as_tensor(host["advantages"])[:, None]
        self.tp = host["prompt_ids"].shape[1]
        self.autocast = dtype == "bfloat16"

    def __call__(self) -> dict[str, float]:
        previous = self.torch.get_num_threads()
        if self.threads is not None:
            self.torch.set_num_threads(self.threads)
        try:
            return self._step()
        finally:
            self.torch.set_num_threads(previous)

    def _step(self) -> dict[str, float]:
        torch, tp, n = self.torch, self.tp, self.tokens.shape[1]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            hidden = self.ref.model(input_ids=self.ids, attention_mask=self.attn_mask)
            h = hidden.last_hidden_state[:, tp - 1 : tp - 1 + n]
            logits = self.ref.lm_head(h)
        logp_all = torch.log_softmax(logits.float(), dim=-1)
        logp = logp_all.gather(-1, self.tokens[..., None])[..., 0]
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        ratio = torch.exp(logp - self.old)
        clipped = ratio.clamp(1 - CLIP_EPS, 1 + CLIP_EPS)
        per_token = -torch.minimum(ratio * self.adv, clipped * self.adv)
        loss = (per_token * self.mask).sum() / self.mask.sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.ref.parameters(), 1.0)
        self.opt.step()
        return {
            "loss": loss.item(),
            "grad_norm": grad_norm.item(),
            "entropy": float((entropy * self.mask).sum() / self.mask.sum()),
        }


def main(argv: list[str]) -> None:
    del argv
    if _CPUS.value:
        common.limit_cpus(_CPUS.value)
    st = _settings()
    rows, tp, n = st["rows"], st["prompt_len"], st["completion_len"]
    chunk = _CHUNK.value or None
    cfg = get_config(
        st["preset"],
        param_dtype="float32",
        dtype=_DTYPE.value,
        remat=_REMAT.value,
        max_seq_len=max(get_config(st["preset"]).max_seq_len, tp + n),
    )
    env = common.environment()
    print(
        f"preset {st['preset']}: {cfg.num_params() / 1e6:.1f}M params, {rows} rows x "
        f"({tp} + {n}) tokens, {_DTYPE.value}, remat {_REMAT.value}, chunk {chunk}; "
        f"load {env['load_average_1_5_15']}"
    )
    roof_before = roofline.measure(_SMOKE.value)
    model = Transformer(cfg, rngs=nnx.Rngs(_SEED.value))
    host = _batch(cfg, rows, tp, n, _SEED.value)

    # Copied before ours starts: our update donates (and so deletes) the arrays it replaces.
    ref = hf_reference.torch_model(model, "float32")
    compiled_before, start = common.compile_seconds(), time.perf_counter()
    ours = _Ours(model, host, chunk)
    first_ours = ours()
    ours_first_s = time.perf_counter() - start
    compile_s = common.compile_seconds() - compiled_before
    theirs = _Torch(ref, host, ours.old_logp, _DTYPE.value)
    first_theirs = theirs()
    # Same weights, batch and formula: the first step's loss and gradient norm agree.
    agreement = {
        k: (float(first_ours[k]), first_theirs[k]) for k in ("loss", "grad_norm", "entropy")
    }
    tol = 2e-3 if _DTYPE.value == "float32" else 5e-2
    for k, (a, b) in agreement.items():
        if not abs(a - b) <= tol * max(1.0, abs(b)):
            raise AssertionError(f"first-step {k}: ours {a} vs torch {b}: not the same work")

    sides = {"ours": ours, "torch": theirs}
    if _TORCH_ONE_THREAD.value:
        # The same model and optimizer state, stepped with one intra-op thread.
        sides["torch_1thread"] = _Torch(ref, host, ours.old_logp, _DTYPE.value, threads=1)
        sides["torch_1thread"].opt = theirs.opt
    seconds = common.time_interleaved(sides, st["repeats"])
    roof = roofline.measure(_SMOKE.value)
    roof = {k: max(v, roof[k]) if isinstance(v, float) else v for k, v in roof_before.items()}
    peak = roof[
        "matmul_bf16_flops_per_s" if _DTYPE.value == "bfloat16" else "matmul_f32_flops_per_s"
    ]
    step_flops = flops.train_flops(cfg, rows, tp, n)
    tokens = rows * (tp + n)
    results = {}
    for name in seconds:
        r = common.summarize(seconds[name], tokens)
        r["flops_per_s"] = step_flops / r["best_s"]
        r["mfu"] = r["flops_per_s"] / peak
        results[name] = r
    results["ours"].update(compile_s=compile_s, first_call_s=ours_first_s)
    torch_names = [name for name in results if name.startswith("torch")]
    fastest = max(results[name]["best_per_s"] for name in torch_names)
    ratio = results["ours"]["best_per_s"] / fastest

    print()
    print(roofline.describe(roof))
    common.print_table(
        [
            [name, r["best_per_s"], r["median_per_s"], r["best_s"], f"{r['mfu']:.0%}"]
            for name, r in results.items()
        ],
        ["", "tok/s best", "tok/s median", "s best", "MFU"],
    )
    print(
        f"\nours / faster torch (best tok/s): {ratio:.2f}x (target >= {TARGET_RATIO:g}x); "
        f"compile {compile_s:.1f} s; first-step loss {agreement['loss'][0]:.6f} vs "
        f"{agreement['loss'][1]:.6f}"
    )
    env["load_average_1_5_15_end"] = list(os.getloadavg())
    record = {
        "benchmark": "train_step",
        "smoke": _SMOKE.value,
        "ours_tokens_per_s": results["ours"]["best_per_s"],
        "torch_tokens_per_s": results["torch"]["best_per_s"],
        "torch_fastest_tokens_per_s": fastest,
        "ratio": ratio,
        "ratio_vs_torch_default_threads": results["ours"]["best_per_s"]
        / results["torch"]["best_per_s"],
        "ratio_median": results["ours"]["median_per_s"]
        / max(results[name]["median_per_s"] for name in torch_names),
        "target_ratio": TARGET_RATIO,
        "met_target": ratio >= TARGET_RATIO,
        "ours_mfu": results["ours"]["mfu"],
        "torch_mfu": max(results[name]["mfu"] for name in torch_names),
        "step_flops": step_flops,
        "first_step_agreement": agreement,
        "roofline": roof,
        "roofline_before": roof_before,
        "results": results,
        "settings": {
            **st,
            "dtype": _DTYPE.value,
            "remat": _REMAT.value,
            "chunk_size": chunk,
            "cpus": _CPUS.value or None,
            "seed": _SEED.value,
            "num_params": cfg.num_params(),
        },
        "environment": env,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if _JSON.value:
        common.write_json(_JSON.value, record)
        print(f"wrote {_JSON.value}")


if __name__ == "__main__":
    app.run(main)
