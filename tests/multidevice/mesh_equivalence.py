"""One sampling call and one GRPO update on several meshes; results written for the test to compare.

Each mesh is one computation of the shared 8-device process (tests/multidevice/runner.py, for
tests/test_sharding.py); all of them also run as `python -m tests.multidevice.mesh_equivalence
OUT_DIR` with XLA_FLAGS=--xla_force_host_platform_device_count=8. For each mesh it writes
OUT_DIR/<name>.npz holding the sampled tokens and log-probs, the update's loss and grad
norm, the initial and updated params, and each param's shard shape and PartitionSpec as seen on
the arrays themselves (`.sharding`, `.addressable_shards`).
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import optax

from models import get_config
from rl_reason import losses
from rl_reason.core import update as train_step
from rl_reason.core.config import LossOptions
from rl_reason.core.record import RolloutArrays
from rl_reason.infra import sharding
from rl_reason.rollout import engine, sampling

MESHES = {
    "1x1x1": (1, 1, 1),
    "8x1x1": (8, 1, 1),
    "1x8x1": (1, 8, 1),
    "1x4x2": (1, 4, 2),
    "2x2x2": (2, 2, 2),
}
# The meshes whose sampling, engine and update are compared with one device: every axis at
# once, and the batch over 8 shards (fsdp alone). The others are only sharded and read (specs,
# shard shapes, the optimizer state's): their computations are these with other axis sizes.
COMPUTED = ("1x1x1", "1x8x1", "2x2x2")
# Every parameter axis divides 8 (or 2 for kv heads over tensor), so the rules shard everything
# they name: vocab 512, width 128, 4 query / 2 kv heads, MLP 384.
CFG = get_config("tiny").replace(num_layers=2, max_seq_len=128)
P, G, NEW = 8, 4, 12
PROMPTS = [[1 + (7 * i + j) % 500 for j in range(3 + i % 5)] for i in range(P)]


def _flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def run(name: str, shape: tuple[int, int, int], out_dir: str) -> None:
    devices = jax.devices()[: int(np.prod(shape))]
    mesh = sharding.make_mesh(sharding.MeshConfig(*shape), devices)
    graphdef, params = sharding.create_model(CFG, mesh, seed=0)
    record: dict[str, np.ndarray] = {}
    for path, x in _flat(params).items():
        record[f"init{path}"] = np.asarray(x)
        record[f"spec{path}"] = np.asarray(repr(tuple(x.sharding.spec)))
        record[f"shard{path}"] = np.asarray(x.addressable_shards[0].data.shape)
    optimizer = optax.sgd(0.5, momentum=0.9)
    if name not in COMPUTED:
        fns = train_step.StepFns(graphdef, params, optimizer, LossOptions(kl_coef=0.0), mesh)
        for path, x in _flat(fns.init_opt_state(params)).items():
            record[f"opt_spec{path}"] = np.asarray(repr(tuple(x.sharding.spec)))
        np.savez(os.path.join(out_dir, f"{name}.npz"), **record)
        return

    cfg = sampling.SamplingConfig(temperature=1.0, stop_token_ids=tuple(range(3, 512, 6)))
    out = sampling.sample(
        (graphdef, params),
        PROMPTS,
        jax.random.key(3),
        group_size=G,
        max_new_tokens=NEW,
        config=cfg,
        mesh=mesh,
    )
    record["tokens"] = np.asarray(out.tokens)
    record["lengths"] = np.asarray(out.lengths)
    record["policy_logprobs"] = np.asarray(out.policy_logprobs)
    record["tokens_spec"] = np.asarray(repr(tuple(out.tokens.sharding.spec)))
    # The continuous-batching engine on the same mesh: 16 slots (2 or 4 per batch shard) for
    # the 32 samples, refilled within each shard, the tail packed once into 8.
    eng = engine.sample(
        (graphdef, params),
        PROMPTS,
        jax.random.key(3),
        group_size=G,
        max_new_tokens=NEW,
        config=cfg,
        mesh=mesh,
        engine=engine.EngineConfig(slots=16, min_slots=8),
    )
    record["engine_tokens"] = np.asarray(eng.sample.tokens)
    record["engine_lengths"] = np.asarray(eng.sample.lengths)
    record["engine_policy_logprobs"] = np.asarray(eng.sample.policy_logprobs)
    record["engine_tokens_spec"] = np.asarray(repr(tuple(eng.sample.tokens.sharding.spec)))
    record["engine_decode_steps"] = np.asarray(eng.decode_steps)

    # Rewards that vary within groups: the completion's length parity and its first token.
    lengths = np.asarray(out.lengths)
    rewards = ((lengths % 2) + (np.asarray(out.tokens)[:, 0] % 3 == 0)).astype(np.float32)
    advantages = np.asarray(losses.compute_advantages(rewards, G), np.float32)
    # SGD with momentum: the updated params are the gradient itself (Adam would turn 1e-8
    # differences of near-zero gradients into lr-sized ones), and the momentum is state that
    # must be sharded like the params.
    fns = train_step.StepFns(
        graphdef, params, optimizer, LossOptions(kl_coef=0.0), mesh, microbatches=2
    )
    batch = fns.make_batch([RolloutArrays.from_sample(out)], None, advantages)
    opt_state = fns.init_opt_state(params)
    new_params, new_opt, metrics = fns.update(params, opt_state, batch)
    metrics = jax.device_get(metrics)
    record["loss"] = np.asarray(metrics["loss"])
    record["grad_norm"] = np.asarray(metrics["grad_norm"])
    for path, x in _flat(new_params).items():
        record[f"updated{path}"] = np.asarray(x)
        record[f"updated_spec{path}"] = np.asarray(repr(tuple(x.sharding.spec)))
    for path, x in _flat(new_opt).items():
        record[f"opt_spec{path}"] = np.asarray(repr(tuple(x.sharding.spec)))
    np.savez(os.path.join(out_dir, f"{name}.npz"), **record)


def compute(name: str, out_dir: str) -> None:
    assert jax.device_count() == 8
    run(name, MESHES[name], out_dir)


if __name__ == "__main__":
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    for mesh_name, mesh_shape in MESHES.items():
        run(mesh_name, mesh_shape, sys.argv[1])
    print("done")
