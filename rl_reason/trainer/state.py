"""The trainer's resumable state: what a checkpoint holds, its restore target, and resume.

Arrays (params, optimizer state, step, key, reference, a round in flight) go into the
checkpoint's state; counters, the data position and the config into its JSON meta. A resumed
run repeats and skips nothing: the data iterator moves to where the checkpoint left it, and a
round that was in flight is verified again and trained on.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models import lora
from rl_reason.core import critic, update
from rl_reason.core.record import Rollout, RolloutArrays
from rl_reason.infra import sharding
from rl_reason.rollout.rounds import check_verifier
from rl_reason.trainer import health

log = logging.getLogger(__name__)


def init(t, params) -> None:
    """The trainer's optimizer, jitted step functions, and initial state on the devices: the
    params (owned and donated by the trainer from here on), the optimizer state, the frozen
    reference (only with a KL term) and the key."""
    cfg = t.cfg
    t.optimizer = update.make_optimizer(cfg.optim, cfg.total_updates)
    t.lr_fn = update.learning_rate_fn(cfg.optim, cfg.total_updates)
    t.fns = update.StepFns(
        t.graphdef,
        params,
        t.optimizer,
        cfg.loss,
        t.mesh,
        max_len=cfg.max_new_tokens,
        microbatches=cfg.optim.microbatches,
        frozen=t.frozen,
        critic=cfg.critic if cfg.uses_critic else None,
    )
    # The trainer owns (and donates) these arrays from here on.
    t.params = jax.device_put(params, t.fns.param_shardings)
    t.opt_state = t.fns.init_opt_state(t.params)
    t.critic = t.critic_params = t.critic_opt_state = None
    if cfg.uses_critic:
        if t.frozen and cfg.critic.init == "policy":
            raise ValueError(
                "critic.init='policy' copies the policy's weights, but a LoRA policy trains "
                "adapters over frozen weights: give critic.init a model directory instead"
            )
        graphdef, params = critic.init_params(t.graphdef, t.params, cfg.critic, t.mesh)
        t.critic = critic.CriticFns(
            graphdef,
            params,
            cfg.critic,
            t.mesh,
            microbatches=cfg.optim.microbatches,
            total_updates=cfg.total_updates,
        )
        t.critic_params = t.critic.place(params)
        t.critic_opt_state = t.critic.init_opt_state(t.critic_params)
    t.ref_params = None  # the frozen reference policy (only with a KL term)
    if cfg.loss.needs_reference:
        # LoRA: the base model is the reference (zero adapters over the same frozen arrays);
        # otherwise a copy of the initial weights.
        copy = lora.lora_off if t.frozen else lambda p: jax.tree.map(jnp.copy, p)
        t.ref_params = copy(t.params)
    # Replicated over the mesh: a global array every process holds alike (and checkpoints).
    replicated = sharding.replicated(t.mesh)
    t.key = jax.jit(lambda: jax.random.key(cfg.seed), out_shardings=replicated)()


def state(t) -> dict:
    """The arrays a resumed run needs: params, optimizer state, step, key (+ reference, + the
    critic's params and optimizer state)."""
    tree = {
        "params": t.params,
        "opt_state": t.opt_state,
        "step": sharding.from_global_full(np.int32(t.step_count), t.mesh),
        "key": t.key,
    }
    if t.ref_params is not None and not t.frozen:
        tree["ref_params"] = t.ref_params
    if t.critic is not None:
        tree["critic"] = {"params": t.critic_params, "opt_state": t.critic_opt_state}
    if t.in_flight is not None:
        # The round sampled for the next step with weights no longer held: saved so a
        # resumed run trains on exactly it (its examples come back from the data position).
        tree["in_flight"] = t.in_flight.arrays.to_checkpoint()
    if t.partial is not None:
        # The later steps' samples, partly decoded under weights no longer held.
        replicated = sharding.replicated(t.mesh)
        host = t.partial.to_checkpoint()
        tree["partial"] = jax.tree.map(lambda v: jax.device_put(v, replicated), host)
    return tree


def abstract_state(t) -> dict:
    """`state()`'s shapes, dtypes and shardings: the restore target (no arrays touched)."""
    as_target = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    params = jax.tree.map(as_target, t.params, t.fns.param_shardings)
    replicated = sharding.replicated(t.mesh)
    target = {
        "params": params,
        "opt_state": jax.tree.map(as_target, t.opt_state, t.fns.opt_shardings),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        "key": jax.ShapeDtypeStruct((), t.key.dtype, sharding=replicated),
    }
    if t.ref_params is not None and not t.frozen:
        target["ref_params"] = params
    if t.critic is not None:
        target["critic"] = {
            "params": jax.tree.map(as_target, t.critic_params, t.critic.param_shardings),
            "opt_state": jax.tree.map(as_target, t.critic_opt_state, t.critic.opt_shardings),
        }
    if t.cfg.off_policy_steps:  # every checkpoint (step >= 1) has a round in flight
        target["in_flight"] = _abstract_in_flight(t)
    if t.partial is not None:  # ... and batches in flight
        shapes = t.partial.abstract_checkpoint(t.cfg.rows, t.rounds.training_policy(t.policy))
        target["partial"] = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes
        )
    return target


def _abstract_in_flight(t) -> dict:
    cfg = t.cfg
    p, b, n = cfg.prompts_per_step, cfg.rows, t.rounds.buffer_len
    rows = lambda shape, dtype: jax.ShapeDtypeStruct(
        shape, dtype, sharding=sharding.batch_sharding(t.mesh, len(shape))
    )
    f32 = jnp.float32
    mask = rows((b, n), jnp.bool_)
    arrays = RolloutArrays(
        prompt_ids=rows((p, cfg.max_prompt_len), jnp.int32),
        prompt_mask=rows((p, cfg.max_prompt_len), jnp.bool_),
        tokens=rows((b, n), jnp.int32),
        mask=mask,
        loss_mask=mask,  # sampled rounds score every completion token (see to_checkpoint)
        sample_logprobs=rows((b, n), f32),
        policy_logprobs=rows((b, n), f32),
        lengths=rows((b,), jnp.int32),
        truncated=rows((b,), jnp.bool_),
        ref_logprobs=rows((b, n), f32) if t.ref_params is not None else None,
        old_logprobs=rows((b, n), f32) if cfg.loss.recompute_old_logprobs else None,
    )
    return arrays.to_checkpoint()


def meta(t, extra: Mapping[str, Any] | None = None) -> dict:
    """JSON-able rest of the state: counters, the data position, the config."""
    out = {
        "trainer": {
            "step": t.step_count,
            "updates": t.updates,
            **t.health.to_meta(),
        },
        "config": dataclasses.asdict(t.cfg),
        **dict(extra or {}),
    }
    data = t.data_before_in_flight if t.in_flight is not None else t.data_state()
    if t.partial is not None and t.partial.batches:
        data = t.partial.batches[0].data_before  # the oldest batch in flight's examples
    if data is not None:
        out["data"] = data
    return out


def resume(t) -> dict | None:
    """Continue from the newest readable checkpoint, if any; returns its meta (or None).

    Restores params, optimizer state, key and counters, and moves the data iterator to
    where that checkpoint left it, so that the resumed run repeats and skips nothing.
    """
    if t.checkpointer is None:
        return None
    while True:
        resumed = t.checkpointer.restore_latest(abstract_state(t))
        if resumed is None:
            return None
        step, tree, saved = resumed
        # Written inside a failing streak (the run died before its guard stopped it): resume
        # from before the streak instead.
        first_bad = health.untrusted_from(saved)
        if first_bad is None:
            break
        moved = t.checkpointer.discard_from(first_bad)
        log.warning("checkpoints %s were written while the run diverged; moved aside", moved)
    counters = saved["trainer"]
    if int(tree["step"]) != step or counters["step"] != step:
        raise ValueError(
            f"checkpoint step {step} holds trainer step {int(tree['step'])} / "
            f"{counters['step']}: the directory mixes runs; use a fresh workdir"
        )
    batches = t.train_batches
    if "data" in saved:
        if not hasattr(batches, "set_state"):
            raise ValueError(
                "the checkpoint holds a data position but train_batches has no set_state: "
                "pass a resumable iterator (rl_reason.infra.data.train_iterator)"
            )
        batches.set_state(saved["data"])
    elif step > 0 and hasattr(batches, "set_state"):
        raise ValueError("the checkpoint holds no data position to resume train_batches from")
    t.params, t.opt_state, t.key = tree["params"], tree["opt_state"], tree["key"]
    if t.ref_params is not None and not t.frozen:
        t.ref_params = tree["ref_params"]
    if t.critic is not None:
        t.critic_params = tree["critic"]["params"]
        t.critic_opt_state = tree["critic"]["opt_state"]
    t.step_count = step
    if "in_flight" in tree:
        # The data position is the one before the in-flight round's examples were drawn.
        t.data_before_in_flight = saved["data"]
        arrays = RolloutArrays.from_checkpoint(tree["in_flight"])
        t.in_flight = Rollout(t.next_examples(), arrays, t.cfg.group_size)
        t.rounds.send(t.in_flight)
    if "partial" in tree:
        # The data position is the one before the oldest batch in flight: draw them again.
        drawn = [t._next_batch() for _ in range(t.partial.steps_ahead)]
        t.key = tree["key"]  # drawing split the key; the checkpoint's is after the draws
        arrays = jax.tree.map(np.asarray, tree["partial"])
        t.partial.load(arrays, [d[0] for d in drawn], [d[2] for d in drawn])
    t.updates = counters["updates"]
    t.health.load_meta(counters)
    log.warning("resumed from checkpoint step %d", step)
    return saved


def next_examples(t) -> list[dict]:
    """The next step's examples of this process, checked."""
    examples = list(next(t.train_batches))
    for name in {ex["verifier"] for ex in examples if "verifier" in ex}:
        check_verifier(name)
    if len(examples) != t.local_prompts:
        raise ValueError(
            f"train_batches gave {len(examples)} examples; each step needs "
            f"{t.local_prompts} from this process (prompts_per_step "
            f"{t.cfg.prompts_per_step} / {t.processes} processes)"
        )
    return examples


def data_state(t) -> dict | None:
    batches = t.train_batches
    return batches.get_state() if hasattr(batches, "get_state") else None
