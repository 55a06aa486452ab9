"""The sampler–trainer log-prob gap, float32 against bfloat16, and what each correction touches.

    python -m benchmarks.mismatch [--json=PATH] [--model=models/bases/arithmetic_chains_tiny]
        [--prompts=16] [--group=8] [--new_tokens=64] [--temperature=1.0] [--smoke]

The static sampler draws completions of the task's prompts and reports its log-probs of them
under the plain policy; the trainer scores the same tokens under the same weights with its full
forward pass (`StepFns.logprobs`, what `loss.recompute_old_logprobs` uses). Three setups: both
in float32 (the parity gate's case: the gap is rounding), both computing in bfloat16, and a
bfloat16 sampler against a float32 trainer (an inference engine in low precision). For each:
the gap |log π_trainer − log π_sampler| per token (mean, 99th percentile, max) and per sequence
(the summed log-ratio), beside the trainer's own rounding floor (the largest change of its
log-probs when rows are scored one at a time instead of in the batch); and for each registered
correction at its cap, the fraction of tokens and of sequences it touches and the mean weight
it gives. Not a speed measurement; `--smoke` shrinks the batch so that it runs in seconds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from benchmarks import common
from models import from_pretrained
from rl_reason import losses
from rl_reason.core import update as train_step
from rl_reason.core.config import LossOptions
from rl_reason.infra import sharding
from rl_reason.infra.tokenizer import load_tokenizer
from rl_reason.rollout import sampling
from rl_reason.tasks import arithmetic

_JSON = flags.DEFINE_string("json", None, "Write the results to this JSON file.")
_MODEL = flags.DEFINE_string("model", "models/bases/arithmetic_chains_tiny", "Model directory.")
_PROMPTS = flags.DEFINE_integer("prompts", 16, "Prompts (arithmetic chains).")
_GROUP = flags.DEFINE_integer("group", 8, "Samples per prompt.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Completion budget.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
_SMOKE = flags.DEFINE_bool("smoke", False, "4 prompts x 4 samples of 32 tokens.")

SETUPS = {  # sampler dtype, trainer dtype
    "float32": ("float32", "float32"),
    "bfloat16": ("bfloat16", "bfloat16"),
    "bfloat16_sampler_float32_trainer": ("bfloat16", "float32"),
}
CAPS = {
    "tis_token": 2.0,
    "tis_sequence": 2.0,
    "mask_token": 2.0,
    "mask_sequence": 2.0,
    "geo_mask": 1.001,
}


def _model(path: str, dtype: str):
    # Weights stay float32 in both; only the compute dtype differs.
    return nnx.split(from_pretrained(path, dtype=dtype, param_dtype="float32"))


def self_gap(fns, params, out, whole, group, rows=16) -> float:
    """Largest change of the trainer's own log-probs when rows are scored one at a time instead
    of in the batch: float32 rounding's floor for this model (other shapes, other sums)."""
    gap = 0.0
    for i in range(min(rows, whole.shape[0])):
        p = i // group
        one = fns.logprobs(
            params,
            out.prompt_ids[p : p + 1],
            out.prompt_mask[p : p + 1],
            out.tokens[i : i + 1],
            out.mask[i : i + 1],
        )
        m = np.asarray(out.mask[i]).astype(bool)
        if m.any():
            gap = max(gap, float(np.abs(np.asarray(one)[0] - whole[i])[m].max()))
    return gap


def measure(path, prompts, group, new_tokens, temperature, sampler_dtype, trainer_dtype):
    """The gaps and the corrections' reach for one (sampler, trainer) compute-dtype pair."""
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
    s_graphdef, s_params = _model(path, sampler_dtype)
    t_graphdef, t_params = _model(path, trainer_dtype)
    out = sampling.sample(
        (s_graphdef, s_params),
        prompts,
        jax.random.key(0),
        group_size=group,
        max_new_tokens=new_tokens,
        config=sampling.SamplingConfig(temperature=temperature),
        mesh=mesh,
    )
    fns = train_step.StepFns(t_graphdef, t_params, optax.sgd(1.0), LossOptions(), mesh)
    trainer = fns.logprobs(t_params, out.prompt_ids, out.prompt_mask, out.tokens, out.mask)
    sampler, mask = out.policy_logprobs, out.mask.astype(jnp.float32)
    m = np.asarray(mask).astype(bool)
    u = np.where(m, np.float64(trainer) - np.float64(sampler), 0.0)
    record = {
        "tokens": int(m.sum()),
        "sequences": int(m.any(-1).sum()),
        "token_gap_mean": float(np.abs(u)[m].mean()),
        "token_gap_p99": float(np.quantile(np.abs(u)[m], 0.99)),
        "token_gap_max": float(np.abs(u)[m].max()),
        "sequence_log_ratio_abs_mean": float(np.abs(u.sum(-1))[m.any(-1)].mean()),
        "trainer_self_gap_max": self_gap(fns, t_params, out, np.asarray(trainer), group),
    }
    for kind, cap in CAPS.items():
        cor, metrics = losses.mismatch_correction(trainer, sampler, mask, kind, cap)
        weight = np.broadcast_to(np.asarray(cor.weight), m.shape)[m]
        record[kind] = {
            "cap": cap,
            "token_frac": float(metrics["mismatch_token_frac"]),
            "seq_frac": float(metrics["mismatch_seq_frac"]),
            "weight_mean": float(weight.mean()),
        }
    return record


def main(argv: list[str]) -> None:
    del argv
    prompts_n, group, new = _PROMPTS.value, _GROUP.value, _NEW.value
    if _SMOKE.value:
        prompts_n, group, new = 4, 4, 32
    tokenizer = load_tokenizer(_MODEL.value)
    task = arithmetic.ArithmeticTask(arithmetic.ArithmeticConfig(max_value=19, ops="+-"))
    texts = [task.prompt(ex) for ex in task.eval_set(0, prompts_n)]
    prompts = tokenizer.encode_batch(texts, add_bos=True)
    record = {"environment": common.environment(), "model": _MODEL.value, "setups": {}}
    rows = []
    for name, (s_dtype, t_dtype) in SETUPS.items():
        r = measure(_MODEL.value, prompts, group, new, _TEMPERATURE.value, s_dtype, t_dtype)
        record["setups"][name] = r
        touched = [f"{r[k]['token_frac']:.4f}/{r[k]['seq_frac']:.3f}" for k in CAPS]
        gaps = (r["token_gap_mean"], r["token_gap_max"], r["trainer_self_gap_max"])
        rows.append([name, *(f"{g:.2e}" for g in gaps), *touched])
    header = ["setup", "gap mean", "gap max", "self max", *(f"{k} tok/seq" for k in CAPS)]
    common.print_table(rows, header)
    if _JSON.value:
        common.write_json(_JSON.value, record)


if __name__ == "__main__":
    app.run(main)
