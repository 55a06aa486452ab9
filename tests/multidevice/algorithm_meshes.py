"""The parity gate and the new objectives on one mesh; results written for the test to compare.

One computation per mesh for tests/test_parity_gate.py: the sharded meshes' in the shared
8-device process (tests/multidevice/runner.py), the one-device reference (1x1x1) in the test's
own process, where the parity tests have compiled its model, sampler and scoring already. For
each sampling configuration it samples with the static sampler and scores the same tokens as
the trainer does (`StepFns.logprobs`, the function behind the rescored old log-probs) and from
the full forward pass's logits, filtered in numpy by the definition of temperature / top-k /
top-p; it writes the largest gaps. Then one update per algorithm configuration (REINFORCE++
advantages, CISPO / dual-clip, a mismatch correction) with two microbatches, on one sampled
round shared by them, whose advantages, loss, grad norm and params the test compares with the
one-device run.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import get_config
from rl_reason import losses
from rl_reason.core import critic
from rl_reason.core import update as train_step
from rl_reason.core.config import CriticOptions, LossOptions
from rl_reason.core.record import RolloutArrays
from rl_reason.infra import sharding
from rl_reason.rollout import engine, sampling

# 2 x 2 x 2 splits the batch over data and fsdp and the heads over tensor: every collective
# of the step; the meshes with one axis are tests/test_sharding.py's.
MESHES = {"1x1x1": (1, 1, 1), "2x2x2": (2, 2, 2)}
CFG = get_config("tiny").replace(num_layers=2, max_seq_len=128)
P, G, NEW = 8, 4, 10
PROMPTS = [[1 + (11 * i + j) % 500 for j in range(2 + i % 4)] for i in range(P)]
# (name, temperature, top_k, top_p)
SAMPLING = (
    ("t1", 1.0, 0, 1.0),
    ("t0.7", 0.7, 0, 1.0),
    ("topk", 1.0, 20, 1.0),
    ("topp", 0.8, 0, 0.9),
    ("topk_topp", 0.7, 30, 0.8),
)
ALGORITHMS = {
    "reinforce_pp_baseline+cispo+tis_token": LossOptions(
        advantage_estimator="reinforce_pp_baseline",
        reward_kl_coef=0.05,
        objective="cispo",
        correction="tis_token",
        correction_cap=1.5,
        recompute_old_logprobs=True,
    ),
    # PPO with a critic: GAE over values of a critic with a non-zero head, then the critic's
    # own update (its params are compared too).
    "gae+ppo_clip+tis_token": LossOptions(
        advantage_estimator="gae",
        reward_kl_coef=0.03,
        correction="tis_token",
        correction_cap=1.5,
        recompute_old_logprobs=True,
    ),
    "reinforce_pp+dual_clip+geo_mask": LossOptions(
        advantage_estimator="reinforce_pp",
        reward_kl_coef=0.02,
        objective="dual_clip",
        correction="geo_mask",
        correction_cap=1.08,
        recompute_old_logprobs=True,
    ),
}


def filtered_logprobs(logits_BV: np.ndarray, temperature: float, top_k: int, top_p: float):
    """log-probs [B, V] of the sampling distribution, in float64, by the definitions: divide by
    the temperature; keep the k largest logits (and ties with the k-th); keep the smallest set
    of most likely tokens whose probability reaches top_p (and ties with its last); renormalise.
    Removed entries are -inf."""
    x = np.asarray(logits_BV, np.float64) / temperature
    keep = np.ones(x.shape, bool)
    for b in range(x.shape[0]):
        if top_k > 0:
            keep[b] &= x[b] >= np.sort(x[b])[::-1][top_k - 1]
        if top_p < 1.0:
            z = np.where(keep[b], x[b], -np.inf)
            p = np.exp(z - z.max())
            p /= p.sum()
            order = np.argsort(-z, kind="stable")
            mass, last = 0.0, None
            for v in order:
                last = v
                mass += p[v]
                if mass >= top_p:
                    break
            keep[b] &= z >= z[last]
    z = np.where(keep, x, -np.inf)
    top = z.max(-1, keepdims=True)
    return z - top - np.log(np.exp(z - top).sum(-1, keepdims=True))


def sharpen(params, scale: float = 2.0):
    # The default init gives near-uniform logits over 512 ids (|logit| < 3), where top-p cuts
    # little; x2 gives |logit| up to ~5. Sharper models need a gate relative to float32's
    # rounding floor, which grows with the logits (tests/test_parity_gate.py).
    return jax.tree.map(lambda x: x * scale, params)


# The continuous-batching engine in the parity gate: 8 slots for the 32 samples (one or two per
# batch shard on the sharded meshes), refilled, then the tail packed into 4 (one more compiled
# loop; the deeper levels are tests/test_engine.py's).
ENGINE = engine.EngineConfig(slots=8, min_slots=4)
# The settings the gate runs sharded (static sampler), and the engine's on one device: plain
# and every filter.
SHARDED_SAMPLING = ("t1", "topk_topp")


def sample_round(graphdef, params, mesh, temperature, top_k, top_p, seed=0, sampler="static"):
    cfg = sampling.SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    kw = dict(group_size=G, max_new_tokens=NEW, config=cfg, mesh=mesh)
    if sampler == "engine":
        key = jax.random.key(seed)
        return engine.sample((graphdef, params), PROMPTS, key, engine=ENGINE, **kw).sample
    return sampling.sample((graphdef, params), PROMPTS, jax.random.key(seed), **kw)


def parity_gaps(
    graphdef, params, mesh, fns, temperature, top_k, top_p, seed=0, sampler="static"
) -> dict:
    """Largest gaps over completion tokens between the sampler's log-probs and the trainer's."""
    out = sample_round(graphdef, params, mesh, temperature, top_k, top_p, seed, sampler)
    prompt_ids = jnp.repeat(out.prompt_ids, G, axis=0)
    prompt_mask = jnp.repeat(out.prompt_mask, G, axis=0)
    trainer = fns.logprobs(params, out.prompt_ids, out.prompt_mask, out.tokens, out.mask)
    ids = jnp.concatenate([prompt_ids, out.tokens], axis=1)
    full_mask = jnp.concatenate([prompt_mask, out.mask], axis=1)
    forward = jax.jit(lambda p, i, k: nnx.merge(graphdef, p)(i, mask_BT=k))
    logits = np.asarray(forward(params, ids, full_mask))
    tp, width = prompt_ids.shape[1], out.tokens.shape[1]
    logits = logits[:, tp - 1 : tp - 1 + width]  # position tp - 1 + t predicts token t
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    b, n, v = logits.shape
    full = filtered_logprobs(logits.reshape(b * n, v), temperature, top_k, top_p)
    ref = np.take_along_axis(full, tokens.reshape(-1, 1), -1).reshape(b, n)
    m = mask.astype(bool)
    assert np.isfinite(ref[m]).all(), "a sampled token lies outside the reference's kept set"
    gap = lambda a, c: float(np.max(np.abs(np.float64(a) - np.float64(c))[m]))
    return {
        "policy_vs_trainer": gap(out.policy_logprobs, trainer),
        "sample_vs_filtered": gap(out.sample_logprobs, ref),
        "tokens": int(m.sum()),
        # The share of the vocabulary the filters keep where tokens were sampled.
        "kept_fraction": float(np.isfinite(full.reshape(b, n, v))[m].mean()),
    }


def algorithm_round(graphdef, params, mesh, fns):
    """The sampled round every algorithm's update trains on, with the trainer's old log-probs and
    a reference's: the same weights unsharpened (x1 against the policy's x2), so the KL penalty
    in the rewards is not zero. One per mesh, shared by the algorithms."""
    out = sampling.sample(
        (graphdef, params), PROMPTS, jax.random.key(5), group_size=G, max_new_tokens=NEW, mesh=mesh
    )
    args = (out.prompt_ids, out.prompt_mask, out.tokens, out.mask)
    old = fns.logprobs(params, *args)
    ref = fns.logprobs(sharpen(params, 0.5), *args)
    return out, old, ref


def algorithm_update(
    graphdef, params, mesh, loss_cfg: LossOptions, round_
) -> dict[str, np.ndarray]:
    """One update of `loss_cfg` on the sampled round (`algorithm_round`) whose sampler log-probs
    carry a fixed gap."""
    out, old, ref = round_
    opts = (
        CriticOptions(gamma=0.97, lam=0.9)
        if losses.needs_critic(loss_cfg.advantage_estimator)
        else None
    )
    fns = train_step.StepFns(
        graphdef, params, optax.sgd(0.5, momentum=0.9), loss_cfg, mesh, microbatches=2, critic=opts
    )
    args = (out.prompt_ids, out.prompt_mask, out.tokens, out.mask)
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.3, out.tokens.shape).astype(np.float32)
    rec = RolloutArrays.from_sample(out, ref_logprobs=ref, old_logprobs=old)
    sampler_lp = jax.device_put(np.asarray(old) + noise, out.policy_logprobs.sharding)
    rec = rec.replace(policy_logprobs=sampler_lp)
    lengths, first = np.asarray(out.lengths), np.asarray(out.tokens)[:, 0]
    rewards = ((lengths % 2) + (first % 3 == 0)).astype(np.float32)
    returns = np.asarray(losses.compute_advantages(rewards, G, loss_cfg.advantage_estimator))
    values, record = None, {}
    if opts is not None:
        cfns, cparams = _critic(graphdef, params, opts, mesh)
        values = [cfns.values(cparams, *args)]
    batch = fns.make_batch([rec], None, returns, values)
    if opts is not None:
        new_critic, _, value_metrics = cfns.update(cparams, cfns.init_opt_state(cparams), batch)
        record["value_loss"] = np.asarray(value_metrics["value_loss"])
        record["values"] = np.asarray(values[0])
        for i, leaf in enumerate(jax.tree.leaves(new_critic)):
            record[f"param_critic{i}"] = np.asarray(leaf)
    params = jax.tree.map(jnp.copy, params)  # the update donates them
    new_params, _, metrics = fns.update(params, fns.init_opt_state(params), batch)
    metrics = jax.device_get(metrics)
    record.update({k: np.asarray(metrics[k]) for k in ("loss", "grad_norm", "mismatch_token_frac")})
    record["mismatch_seq_frac"] = np.asarray(metrics["mismatch_seq_frac"])
    record["advantages"] = np.asarray(batch.advantages)
    record["advantages_spec"] = np.asarray(repr(tuple(batch.advantages.sharding.spec)))
    record["tokens"] = np.asarray(out.tokens)
    for i, leaf in enumerate(jax.tree.leaves(new_params)):
        record[f"param{i}"] = np.asarray(leaf)
    return record


def _critic(graphdef, params, opts, mesh):
    """A critic on a copy of the policy with a fixed non-zero head, updated by SGD."""
    cgd, cparams = critic.init_params(graphdef, params, opts, mesh)
    d = cparams["head"]["w"].shape[0]
    cparams["head"] = {
        "w": 0.3 * jnp.sin(jnp.arange(d, dtype=jnp.float32)),
        "b": jnp.asarray(0.05, jnp.float32),
    }
    cfns = critic.CriticFns(cgd, cparams, opts, mesh, microbatches=2, optimizer=optax.sgd(0.05))
    return cfns, cfns.place(cparams)


def compute(name: str, out_dir: str) -> None:
    devices = jax.devices()[: int(np.prod(MESHES[name]))]
    mesh = sharding.make_mesh(sharding.MeshConfig(*MESHES[name]), devices)
    graphdef, params = sharding.create_model(CFG, mesh, seed=0)
    params = sharpen(params)
    fns = train_step.StepFns(graphdef, params, optax.sgd(1.0), LossOptions(), mesh)
    record: dict[str, np.ndarray] = {}
    # One device is the in-process test's; sharded, the plain and the fully filtered settings
    # (the filters' arithmetic does not depend on the mesh, the sharding of the step does).
    # The engine's sharded tokens and log-probs are the static sampler's (tests/test_sharding.py).
    for label, temperature, top_k, top_p in SAMPLING if name != "1x1x1" else ():
        if label not in SHARDED_SAMPLING:
            continue
        gaps = parity_gaps(graphdef, params, mesh, fns, temperature, top_k, top_p)
        for k, v in gaps.items():
            record[f"gap/{label}/{k}"] = np.asarray(v)
    round_ = algorithm_round(graphdef, params, mesh, fns)
    for label, loss_cfg in ALGORITHMS.items():
        for k, v in algorithm_update(graphdef, params, mesh, loss_cfg, round_).items():
            record[f"update/{label}/{k}"] = v
    np.savez(os.path.join(out_dir, f"{name}.npz"), **record)
