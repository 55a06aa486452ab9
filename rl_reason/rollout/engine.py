"""Continuous batching: a fixed number of decode slots, each refilled as its sample finishes.

The static sampler (sampling.py) decodes all P * G rows in lockstep, so a call lasts as long as
its longest row and a finished row keeps paying for its place. Here `slots` rows decode at
once, each holding one sample at its own position (per-slot cache index, ragged); when a sample
ends (stop token or budget), its slot takes the next pending sample of the same batch shard,
which starts from its prompt's prefilled last logits. With long-tailed lengths the slots stay
busy while the long samples finish, instead of most rows idling behind them.

* Each prompt is prefilled once (all prompts of the call, in one batched pass, before decoding);
  its keys and values are stored once, [P, K, Tp, H] per layer. While slot i holds sample i
  (a slot per sample, before the tail is packed) the G slots of a prompt read it in one matmul,
  as in the static sampler. With fewer slots than samples, each step gathers the prompt of
  each slot's sample by index (a per-step copy of [S, K, Tp, H], the engine's main overhead on
  the CPU). In the packed tail no slot changes sample, so each slot's prompt is gathered once
  per packing.
* A slot's own tokens live in a per-slot suffix cache [S, K, W, H] that the next sample of the
  slot overwrites from slot 0 (entries past a row's index are masked): cache memory grows with
  `slots`, not with the P * G samples of the call. W grows in segments as the longest live
  sample needs it (`sampling.decode_segments`, as in the static sampler).
* Exact: token t of sample i is drawn with a key folded from i and t (`token_choice.sample_keys`),
  so a sample's tokens do not depend on its slot, its neighbours or the refill order; for the
  same key this gives the static sampler's tokens and log-probs (up to float32 rounding of the
  differently batched matmuls).
* Sharded like the static sampler: prompts, samples and slots split over the mesh's batch
  shards (data x fsdp), each shard refilling its slots from its own prompts' samples, so a
  slot never reads another shard's prompt.

* A call may continue earlier ones (`sample(carry=)`, partial rollouts: rollout/partial.py):
  each row arrives with its completion so far, resumed rows take their slots at once (their
  caches kept from the last call or rebuilt, rollout/carry.py), the rest queue in the order
  the carry gives; `on_finished` may stop the call, leaving the live samples where they are.

The result is the static sampler's `SampleOutput` (rows prompt-major, pad after each
completion), plus the engine's counters for occupancy metrics.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models import kv_cache, partitioning
from models.transformer import Transformer, rope_table
from rl_reason.infra import sharding
from rl_reason.rollout import carry as carry_lib
from rl_reason.rollout import sampling, token_choice
from rl_reason.rollout.carry import Carry, HostCarry
from rl_reason.rollout.sampling import SampleOutput
from rl_reason.rollout.token_choice import SamplingConfig


@struct.dataclass
class EngineOutput:
    sample: SampleOutput
    decode_steps: jax.Array  # int32 scalar: decode iterations run
    slot_steps: jax.Array  # int32 scalar: slots decoded, summed over the iterations
    # int32 scalar: ... of them holding a live sample, each emitting one token (every token but
    # the samples' first, which come from the prefill).
    live_slot_steps: jax.Array
    # [B] bool, from a call that continues earlier ones (`carry`): the rows that have ended
    # and the rows a slot still decodes (the rest are pending, untouched). None otherwise.
    finished: jax.Array | None = None
    live: jax.Array | None = None
    # ... and where the live ones are: the slots' caches (per layer LayerKV [S, K, W, H]) and
    # the row each slot holds live (-1: none), for a next call to resume them as they are.
    slot_cache: tuple | None = None
    slot_rows: jax.Array | None = None

    @property
    def slot_occupancy(self) -> float:
        """Mean fraction of the decoded slots that held a live sample."""
        total = int(self.slot_steps)
        return float(self.live_slot_steps) / total if total else 0.0


@struct.dataclass
class _Slots:
    """Per-slot state, [S] each: the sample held (-1: none), the tokens it has emitted, the last
    of them (fed at the next step), and whether it has ended. Multi-turn rollouts add whether
    the sample waits for the environment's answer to its turn (it keeps its slot and cache but
    does not decode), and up to which of its tokens the slot emits the observation the host
    wrote into the output buffer instead of sampling (`forced`)."""

    sample: jax.Array
    emitted: jax.Array
    token: jax.Array
    done: jax.Array
    waiting: jax.Array
    forced: jax.Array

    @property
    def live(self) -> jax.Array:
        return (self.sample >= 0) & ~self.done & ~self.waiting

    @property
    def held(self) -> jax.Array:
        """Slots a sample occupies: live or waiting for its observation."""
        return self.live | self.waiting


def _pin(x: jax.Array, mesh: Mesh, names) -> jax.Array:
    spec = partitioning.logical_to_spec(names, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _pin_layers(layers, mesh: Mesh):
    return tuple(
        kv_cache.LayerKV(_pin(kv.k, mesh, kv_cache.KV_AXES), _pin(kv.v, mesh, kv_cache.KV_AXES))
        for kv in layers
    )


def _refill(slots: _Slots, next_D, ctx: _Context) -> tuple[_Slots, jax.Array]:
    """Ended or empty slots take the next rows of their batch shard's queue, in queue order
    (id order unless a call continues earlier ones). A sample arrives with its first token
    (drawn from its prompt's prefill) already emitted; one that this token ended holds its
    slot, not live, until the next refill."""
    d, per_shard = ctx.queue.shape
    free_DS = (~slots.held).reshape(d, -1)
    rank_DS = jnp.cumsum(free_DS, axis=1, dtype=jnp.int32) - 1
    at_DS = next_D[:, None] + rank_DS
    take_DS = free_DS & (at_DS < ctx.queue_len[:, None])
    local_DS = jnp.take_along_axis(ctx.queue, jnp.minimum(at_DS, per_shard - 1), axis=1)
    take = take_DS.reshape(-1)
    new = (jnp.arange(d, dtype=jnp.int32)[:, None] * per_shard + local_DS).reshape(-1)
    sample = jnp.where(take, new, jnp.where(slots.held, slots.sample, -1))
    arrived = jnp.maximum(sample, 0)
    slots = _Slots(
        sample=sample,
        emitted=jnp.where(take, 1, slots.emitted),
        token=jnp.where(take, ctx.first[arrived], slots.token),
        done=jnp.where(take, ctx.ended[arrived], slots.done),
        waiting=jnp.where(take, ctx.first_waits[arrived], slots.waiting),
        forced=jnp.where(take, 0, slots.forced),
    )
    return slots, next_D + jnp.sum(take_DS, axis=1, dtype=jnp.int32)


def slot_levels(slots: int, min_slots: int, shards: int) -> tuple[int, ...]:
    """Slot counts the engine runs at: `slots`, then halved while at least `min_slots` and a
    multiple of `shards` (the tail of a call runs on fewer slots once nothing is pending)."""
    levels = [slots]
    while levels[-1] % (2 * shards) == 0 and levels[-1] // 2 >= max(min_slots, shards):
        levels.append(levels[-1] // 2)
    return tuple(levels)


def default_min_slots(slots: int, shards: int) -> int:
    """A sixteenth of the slots: below that a CPU decode step costs about the same whatever
    its rows (reading the weights dominates), and every level is one more compiled loop."""
    return max(shards, slots // 16)


def _shrink(state, fewer: int, shards: int, mesh: Mesh):
    """The state with its live slots packed into `fewer` slots, within each batch shard."""
    slots, next_D, layers, *rest = state
    per_shard = slots.sample.shape[0] // shards
    live_DS = slots.held.reshape(shards, per_shard)
    keep_DS = jnp.argsort(~live_DS, axis=1, stable=True)[:, : fewer // shards]
    keep = (jnp.arange(shards)[:, None] * per_shard + keep_DS).reshape(-1)
    take = lambda x: jnp.take(x, keep, axis=0, mode="clip")
    layers = _pin_layers(jax.tree.map(take, layers), mesh)
    return (jax.tree.map(take, slots), next_D, layers, *rest)


@struct.dataclass
class _Context:
    """What every decode step of a call reads and none changes."""

    prefix: tuple  # per layer, LayerKV [P, K, Tp, H]: each prompt's keys and values, once
    prompt_mask: jax.Array  # [P, Tp] bool
    positions: jax.Array  # [P, Tp]
    prompt_len: jax.Array  # [P] int32
    key_data: jax.Array  # [B, ...] each sample's key (token_choice.sample_keys), as raw bits
    max_new: jax.Array  # int32 scalar: the call's budget (<= buffer_len)
    rope: tuple  # (sin, cos) [P, buffer_len, 1, H/2] at each prompt's new positions
    first: jax.Array  # [B] each sample's first token, drawn from its prompt's prefill
    ended: jax.Array  # [B] bool: ... which ended it (stop token, or a budget of 1)
    first_waits: jax.Array  # [B] bool: ... which ended its first turn (multi-turn)
    # Each batch shard's rows in the order slots take them: [D, B / D] local ids, the first
    # queue_len [D] of them pending at the start (all, in id order, unless a carry says
    # otherwise), and each row's place in its queue [B] (-1: not queued, never taken).
    queue: jax.Array
    queue_len: jax.Array
    queue_pos: jax.Array


def _setup(
    model: Transformer,
    prompt_ids_PT,
    prompt_mask_PT,
    key_data,
    max_new_tokens,
    *,
    group_size: int,
    num_slots: int,
    shards: int,
    buffer_len: int,
    cfg: SamplingConfig,
    pad_id: int,
    mesh: Mesh,
    carry: Carry | None = None,
    first_width: int = 0,
    turn_ids: tuple[int, ...] = (),
):
    """Prefill every prompt, draw every sample's first token, fill the slots: (context, state).
    With `carry`, the call continues earlier ones, its slot caches `first_width` wide.

    The state is (slots, next_D, layers, outputs, counts, held): the slots, the next pending
    sample of each batch shard, the slots' own cache, the output buffers (tokens, sample and
    policy log-probs, lengths, stopped), the counters (decode steps, slot steps, live slot
    steps) and, once packed, each slot's gathered prompt."""
    b = prompt_ids_PT.shape[0] * group_size
    per_shard = b // shards
    positions_PT, first_logits_PV, kvs = sampling.prefill(model, prompt_ids_PT, prompt_mask_PT)
    prompt_len_P = jnp.sum(prompt_mask_PT, axis=-1, dtype=jnp.int32)
    if carry is None:
        keys_B = token_choice.sample_keys(
            jax.random.wrap_key_data(key_data), jnp.arange(b, dtype=jnp.int32)
        )
        local = jnp.arange(per_shard, dtype=jnp.int32)
        queue = jnp.broadcast_to(local, (shards, per_shard))
        queue_len = jnp.full((shards,), per_shard, jnp.int32)
        queue_pos = jnp.tile(local, shards)
    else:
        keys_B = jax.random.wrap_key_data(carry.key_data)
        queue, queue_len = carry.queue.reshape(shards, per_shard), carry.queue_len
        rows = jnp.where(queue >= 0, jnp.arange(shards)[:, None] * per_shard + queue, b)
        places = jnp.broadcast_to(jnp.arange(per_shard, dtype=jnp.int32), queue.shape)
        queue_pos = (
            jnp.full((b,), -1, jnp.int32).at[rows.reshape(-1)].set(places.reshape(-1), mode="drop")
        )
    stop_ids = jnp.asarray(cfg.stop_token_ids or (-1,), jnp.int32)
    max_new = jnp.minimum(max_new_tokens, buffer_len)
    # Every sample's first token at once, from its prompt's prefill logits (as the static
    # sampler draws them): a refilled slot then starts by feeding it, and no decode step needs
    # the [slots, V] prefill logits.
    first_B, first_slp, first_plp = token_choice.choose_tokens(
        jnp.repeat(first_logits_PV, group_size, axis=0), keys_B, jnp.zeros((b,), jnp.int32), cfg
    )
    stopped = jnp.isin(first_B, stop_ids)
    ended_B = stopped | (max_new <= 1)
    first_waits = (
        ~ended_B & jnp.isin(first_B, jnp.asarray(turn_ids, jnp.int32))
        if turn_ids
        else jnp.zeros((b,), bool)
    )
    ctx = _Context(
        prefix=tuple(kv_cache.heads_first(kv) for kv in kvs),
        prompt_mask=prompt_mask_PT.astype(bool),
        positions=positions_PT,
        prompt_len=prompt_len_P,
        key_data=jax.random.key_data(keys_B),
        max_new=max_new,
        rope=rope_table(prompt_len_P[:, None] + jnp.arange(buffer_len)[None], model.cfg),
        first=first_B,
        ended=ended_B,
        first_waits=first_waits,
        queue=queue,
        queue_len=queue_len,
        queue_pos=queue_pos,
    )
    outputs = (
        jnp.full((b, buffer_len), pad_id, jnp.int32).at[:, 0].set(first_B),
        jnp.zeros((b, buffer_len), jnp.float32).at[:, 0].set(first_slp),
        jnp.zeros((b, buffer_len), jnp.float32).at[:, 0].set(first_plp),
        jnp.ones((b,), jnp.int32),
        stopped,
    )
    width = first_width or sampling.decode_segments(buffer_len, cfg.max_decode_segments)[0]
    if carry is None or not carry.layers:
        empty = _Slots(
            sample=jnp.full((num_slots,), -1, jnp.int32),
            emitted=jnp.zeros((num_slots,), jnp.int32),
            token=jnp.full((num_slots,), pad_id, jnp.int32),
            done=jnp.zeros((num_slots,), bool),
            waiting=jnp.zeros((num_slots,), bool),
            forced=jnp.zeros((num_slots,), jnp.int32),
        )

        def empty_layer(kv: kv_cache.LayerKV) -> kv_cache.LayerKV:
            _, k, _, h = kv.k.shape
            shape = (num_slots, k, width, h)
            return kv_cache.LayerKV(jnp.zeros(shape, kv.k.dtype), jnp.zeros(shape, kv.v.dtype))

        layers = _pin_layers(tuple(empty_layer(kv) for kv in ctx.prefix), mesh)
    if carry is not None:
        outputs, resumed, rebuilt = _resume(ctx, carry, outputs, mesh)
        if carry.layers:
            empty, layers = resumed, rebuilt
    slots, next_D = _refill(empty, jnp.zeros((shards,), jnp.int32), ctx)
    zero = jnp.zeros((), jnp.int32)
    return ctx, (slots, next_D, layers, outputs, (zero, zero, zero), ())


def _resume(ctx: _Context, carry: Carry, fresh, mesh: Mesh):
    """The outputs, slots and slot caches of a call that continues earlier ones: rows not
    started get `fresh` (their first token), the others what `carry` holds; the resumed slots
    take `carry.layers` (kept from the last call or rebuilt, rollout/carry.py)."""
    new = carry.lengths == 0
    pick = lambda a, b: jnp.where(new.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
    outputs = tuple(
        pick(f, c)
        for f, c in zip(
            fresh,
            (
                carry.tokens,
                carry.sample_logprobs,
                carry.policy_logprobs,
                carry.lengths,
                carry.stopped,
            ),
            strict=True,
        )
    )
    row_S = carry.slot_rows
    held = row_S >= 0
    row = jnp.maximum(row_S, 0)
    length_S = jnp.where(held, carry.lengths[row], 0)
    slots = _Slots(
        sample=jnp.where(held, row_S, -1),
        emitted=length_S,
        token=carry.tokens[row, jnp.maximum(length_S - 1, 0)],
        done=jnp.zeros(row_S.shape, bool),
        waiting=jnp.zeros(row_S.shape, bool),
        forced=jnp.zeros(row_S.shape, jnp.int32),
    )
    return outputs, slots, (_pin_layers(carry.layers, mesh) if carry.layers else ())


def _slot_prompts(ctx: _Context, prompt_S):
    """Each slot's prompt keys, values, mask and positions: (layers, mask, positions)."""
    take = lambda x: jnp.take(x, prompt_S, axis=0, mode="clip")
    pre = tuple(kv_cache.LayerKV(take(kv.k), take(kv.v)) for kv in ctx.prefix)
    return pre, take(ctx.prompt_mask), take(ctx.positions)


def _decode_step(model, ctx: _Context, state, *, mode, group_size, cfg, mesh, turn_ids=()):
    """One decode step of every slot; ended slots are refilled from their shard's pending.

    With `turn_ids` (multi-turn), a slot whose sample has an observation to emit emits its
    next token from the output buffer (where the host wrote it), log-probs 0, instead of
    drawing one; feeding it writes the cache like any token, so the context grows without a
    second prefill. A drawn token in `turn_ids` ends the turn: the slot waits for the host."""
    slots, next_D, layers, outputs, (steps, slot_steps, live_steps), held = state
    tokens, slp, plp, lengths, stopped = outputs
    b = ctx.first.shape[0]
    live = slots.live
    row = jnp.maximum(slots.sample, 0)
    prompt = row // group_size
    # A slot feeds its last token (token emitted - 1) at cache slot emitted - 1. Every slot's
    # cache entry at its index is written, so a slot waiting for an observation feeds its
    # turn's last token again where it was: the same keys and values it will write on resuming.
    index = jnp.where(slots.held, jnp.maximum(slots.emitted - 1, 0), 0)
    if mode == "grouped":
        # Slot i holds sample i: the group layout of the static sampler, whose G rows of a
        # prompt read its keys once, in one matmul.
        pre, pre_mask, pre_positions = ctx.prefix, ctx.prompt_mask, ctx.positions
    elif mode == "held":
        # Packed tail: no slot changes sample any more, its prompt was gathered once.
        pre, pre_mask, pre_positions = held
    else:
        # Slots refilled as they go: each reads its sample's prompt, gathered every step.
        pre, pre_mask, pre_positions = _slot_prompts(ctx, prompt)
    cache = kv_cache.KVCache(
        prefix=pre,
        prefix_mask=pre_mask,
        prefix_positions=pre_positions,
        layers=layers,
        index=index,
    )
    rope = tuple(x[prompt, index][:, None] for x in ctx.rope)
    logits, cache = model.decode(slots.token, ctx.prompt_len[prompt] + index, cache, rope)
    keys = jax.random.wrap_key_data(ctx.key_data[row])
    token, s_lp, p_lp = token_choice.choose_tokens(logits, keys, slots.emitted, cfg)
    # Rows of slots without a live sample are written out of bounds, i.e. dropped.
    out_row = jnp.where(live, row, b)
    col = slots.emitted
    drawn = live
    if turn_ids:
        forced = live & (col < slots.forced)
        drawn = live & ~forced
        written = tokens[row, jnp.minimum(col, tokens.shape[1] - 1)]
        token = jnp.where(forced, written, token)
        s_lp, p_lp = jnp.where(forced, 0.0, s_lp), jnp.where(forced, 0.0, p_lp)
    tokens = tokens.at[out_row, col].set(token, mode="drop")
    slp = slp.at[out_row, col].set(s_lp, mode="drop")
    plp = plp.at[out_row, col].set(p_lp, mode="drop")
    lengths = lengths.at[out_row].set(col + 1, mode="drop")
    stop_ids = jnp.asarray(cfg.stop_token_ids or (-1,), jnp.int32)
    hit_stop = drawn & jnp.isin(token, stop_ids)
    stopped = stopped.at[out_row].set(hit_stop, mode="drop")
    emitted = jnp.where(live, slots.emitted + 1, slots.emitted)
    done = slots.done | (live & (hit_stop | (emitted >= ctx.max_new)))
    waiting = slots.waiting
    if turn_ids:
        waiting = waiting | (drawn & ~done & jnp.isin(token, jnp.asarray(turn_ids, jnp.int32)))
    slots = _Slots(
        sample=slots.sample,
        emitted=emitted,
        token=jnp.where(live, token, slots.token),
        done=done,
        waiting=waiting,
        forced=slots.forced,
    )
    slots, next_D = _refill(slots, next_D, ctx)
    outputs = (tokens, slp, plp, lengths, stopped)
    counts = (
        steps + 1,
        slot_steps + live.shape[0],
        live_steps + jnp.sum(live, dtype=jnp.int32),
    )
    return slots, next_D, _pin_layers(cache.layers, mesh), outputs, counts, held


def _working(ctx: _Context, state) -> jax.Array:
    slots, next_D = state[0], state[1]
    return jnp.any(slots.held) | jnp.any(next_D < ctx.queue_len)


def _progress(ctx: _Context, state) -> jax.Array:
    """Whether a decode step would do anything: a slot is live, or a free one can take a
    pending sample (all held slots may be waiting for the host's observations)."""
    slots, next_D = state[0], state[1]
    free_D = jnp.any((~slots.held).reshape(next_D.shape[0], -1), axis=1)
    return jnp.any(slots.live) | jnp.any((next_D < ctx.queue_len) & free_D)


def _in_stage(ctx: _Context, state, width: int, fewer: int | None) -> jax.Array:
    """Whether the stage (slot count, cache width) has steps left: work remains, every live
    slot's next cache slot (emitted - 1) fits the width, and (before the last level) the live
    samples do not yet fit `fewer` slots with nothing pending."""
    slots, next_D = state[0], state[1]
    shards = next_D.shape[0]
    fits = jnp.all(~slots.live | (slots.emitted - 1 < width))
    go = _working(ctx, state) & fits
    if fewer is None:
        return go
    live_D = jnp.sum(slots.held.reshape(shards, -1), axis=1)
    can_shrink = jnp.all(next_D >= ctx.queue_len) & jnp.all(live_D <= fewer // shards)
    return go & ~can_shrink


def _stage(
    model, ctx, state, step_limit, *, mode, width, fewer, group_size, cfg, mesh, turn_ids=()
):
    """Decode at one (slot count, cache width) while the stage has steps left, and (when
    `step_limit` is given) until the call's decode steps reach it; with `turn_ids`, also
    until every held slot waits for the host."""
    have = state[2][0].k.shape[kv_cache.SEQ_AXIS]
    if width > have:
        pad = [(0, 0)] * 4
        pad[kv_cache.SEQ_AXIS] = (0, width - have)
        grown = tuple(kv_cache.LayerKV(jnp.pad(x.k, pad), jnp.pad(x.v, pad)) for x in state[2])
        state = (*state[:2], _pin_layers(grown, mesh), *state[3:])
    step = functools.partial(
        _decode_step,
        model,
        ctx,
        mode=mode,
        group_size=group_size,
        cfg=cfg,
        mesh=mesh,
        turn_ids=turn_ids,
    )

    def cond(s):
        go = _in_stage(ctx, s, width, fewer)
        if turn_ids:
            go = go & _progress(ctx, s)
        return go if step_limit is None else go & (s[4][0] < step_limit)

    return jax.lax.while_loop(cond, step, state)


def _pack(ctx, state, fewer: int, *, group_size: int, mesh: Mesh):
    """The live slots packed into `fewer`, each with its prompt gathered once (the tail)."""
    shards = state[1].shape[0]
    state = _shrink(state, fewer, shards, mesh)
    prompt_S = jnp.maximum(state[0].sample, 0) // group_size
    return (*state[:5], _slot_prompts(ctx, prompt_S))


def _stages(num_slots: int, min_slots: int, shards: int, b: int, buffer_len: int, cfg):
    """The engine's program: [(mode, width, fewer)] in order, `fewer` the slot count packed
    into after the level's last width (None at the last level). Static shapes, so each (slot
    count, cache width) is its own loop: widths grow while the slots are full; once nothing
    is pending, the live samples are packed into half as many slots whenever they fit (the
    long tail then runs on a smaller, cheaper batch)."""
    levels = slot_levels(num_slots, min_slots, shards)
    segments = sampling.decode_segments(buffer_len, cfg.max_decode_segments)
    out = []
    for level, fewer in enumerate((*levels[1:], None)):
        # With a slot per sample nothing is refilled: until the first packing, slot i holds
        # sample i. Once packed, nothing is pending, so no slot changes sample.
        mode = "held" if level else "grouped" if num_slots == b else "gather"
        out.append([(mode, width, fewer) for width in segments])
    return out


def _output(ctx, state, prompt_ids_PT, prompt_mask_PT) -> EngineOutput:
    _, _, _, outputs, counts, _ = state
    tokens, slp, plp, lengths, stopped = outputs
    mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    out = SampleOutput(
        tokens=tokens,
        mask=mask,
        sample_logprobs=slp,
        policy_logprobs=plp,
        lengths=lengths,
        truncated=~stopped,
        prompt_ids=prompt_ids_PT,
        prompt_mask=prompt_mask_PT,
    )
    return EngineOutput(out, *counts)


def _live_rows(state) -> jax.Array:
    """[B] bool: the rows a slot holds (live, or waiting for an observation)."""
    slots, outputs = state[0], state[3]
    b = outputs[3].shape[0]
    where = jnp.where(slots.held, slots.sample, b)
    return jnp.zeros((b,), bool).at[where].set(True, mode="drop")


def _finished(ctx: _Context, state) -> jax.Array:
    """[B] bool: the samples that have ended (taken from their queue, or never queued, and
    no longer live)."""
    next_D = state[1]
    b = state[3][3].shape[0]
    shard = jnp.arange(b, dtype=jnp.int32) // (b // next_D.shape[0])
    taken = ctx.queue_pos < next_D[shard]
    return taken & ~_live_rows(state)


def _engine_impl(
    graphdef, params, prompt_ids_PT, prompt_mask_PT, key_data, max_new_tokens, *, min_slots, **kw
):
    """The whole call as one program (`_setup`'s keyword arguments in `kw`)."""
    model: Transformer = nnx.merge(graphdef, *params)
    ctx, state = _setup(model, prompt_ids_PT, prompt_mask_PT, key_data, max_new_tokens, **kw)
    group_size, num_slots, shards = kw["group_size"], kw["num_slots"], kw["shards"]
    buffer_len, cfg, mesh = kw["buffer_len"], kw["cfg"], kw["mesh"]
    b = prompt_ids_PT.shape[0] * group_size
    stage_kw = dict(group_size=group_size, cfg=cfg, mesh=mesh)
    state = _drive(
        _stages(num_slots, min_slots, shards, b, buffer_len, cfg),
        state,
        lambda st, mode, width, fewer: _stage(
            model, ctx, st, None, mode=mode, width=width, fewer=fewer, **stage_kw
        ),
        lambda st, fewer: _pack(ctx, st, fewer, group_size=group_size, mesh=mesh),
    )
    return _output(ctx, state, prompt_ids_PT, prompt_mask_PT)


def _drive(stages, state, run: Callable, pack: Callable):
    """The engine's stages in order: `run(state, mode, width, fewer)` at each cache width the
    state has not passed (packing keeps the width), then `pack(state, fewer)` after each
    level but the last. Shared by the one-call program and the streamed host loop."""
    for level in stages:
        for mode, width, fewer in level:
            if width >= state[2][0].k.shape[kv_cache.SEQ_AXIS]:
                state = run(state, mode, width, fewer)
        if fewer is not None:
            state = pack(state, fewer)
    return state


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """`slots`: rows decoded at once (a multiple of the mesh's batch shards); 0 = as many as
    the call has samples (then nothing is refilled, only the tail is packed).
    `min_slots`: the fewest slots the tail is packed into (0: `default_min_slots`)."""

    slots: int = 0
    min_slots: int = 0

    def __post_init__(self) -> None:
        if self.slots < 0:
            raise ValueError(f"engine slots must be >= 0 (0: one per sample), got {self.slots}")
        if self.min_slots < 0:
            raise ValueError(
                f"engine min_slots must be >= 0 (0: the default), got {self.min_slots}"
            )


_PLAIN = SamplingConfig()


def sample(
    model: Transformer | tuple,
    prompts: Sequence[Sequence[int]],
    key: jax.Array,
    *,
    group_size: int = 1,
    max_new_tokens: int,
    config: SamplingConfig = _PLAIN,
    engine: EngineConfig = EngineConfig(),
    pad_id: int = 0,
    buffer_len: int | None = None,
    prompt_width: int | None = None,
    mesh: Mesh | None = None,
    on_finished: Callable[[Finished], bool | None] | None = None,
    stream_steps: int = 32,
    carry: HostCarry | None = None,
    turns: TurnHost | None = None,
) -> EngineOutput:
    """`sampling.sample` through the continuous-batching engine (same arguments, plus
    `engine`); `.sample` of the result is what `sampling.sample` returns for the same key.

    `on_finished`: called on the host with each batch of this process's samples that have
    finished (`Finished`), every `stream_steps` decode steps (each look is a host round
    trip in which the device waits) while the others decode,
    so that their verification overlaps decoding; every local sample is passed exactly once,
    with its final tokens. The decoding is the same steps as without it (same tokens and
    log-probs), cut into calls of at most `stream_steps` steps. When `on_finished` returns
    True, the call stops after that look: unfinished samples stay as they are, and the
    result's `finished` and `live` say which (what `carry` of a next call needs).

    `carry` (`HostCarry`, one process only, with `on_finished`): the call continues where
    earlier calls left these rows (partial rollouts, rl_reason/rollout/partial.py).

    `turns` (`TurnHost`, one process only): a multi-turn rollout (rl_reason/rollout/
    multi_turn.py). A sample that draws one of `turns.stop_ids` waits in its slot; every
    `stream_steps` decode steps, or sooner when no slot can go on, the host answers the
    waiting samples (`turns.answer`) and each answer's tokens are emitted one a decode step
    from the slot's cache, so nothing is prefilled twice. `max_new_tokens` bounds the whole
    trajectory, observations included; an observation that does not fit is cut and the
    sample ends truncated."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if on_finished is not None and stream_steps < 1:
        raise ValueError(f"stream_steps must be >= 1, got {stream_steps}")
    graphdef, params, mesh, buffer_len, args = sampling.prepare(
        model,
        prompts,
        key,
        max_new_tokens=max_new_tokens,
        pad_id=pad_id,
        buffer_len=buffer_len,
        prompt_width=prompt_width,
        mesh=mesh,
    )
    shards = sharding.batch_shards(mesh)
    samples = len(prompts) * jax.process_count() * group_size
    slots = engine.slots or samples
    if slots % shards:
        raise ValueError(
            f"engine slots {slots} do not split over the {shards} batch shards of mesh "
            f"{dict(mesh.shape)}: use a multiple of {shards}"
        )
    static = dict(
        group_size=group_size,
        num_slots=slots,
        min_slots=engine.min_slots or default_min_slots(slots, shards),
        shards=shards,
        buffer_len=buffer_len,
        cfg=config,
        pad_id=pad_id,
    )
    if carry is not None:
        if on_finished is None or jax.process_count() > 1:
            raise ValueError("engine.sample(carry=) needs on_finished and runs in one process")
        carry.check(samples, slots, shards, buffer_len)
    if turns is not None:
        if carry is not None or jax.process_count() > 1:
            raise ValueError("engine.sample(turns=) runs in one process, without a carry")
        if not turns.stop_ids:
            raise ValueError("engine.sample(turns=) needs turns.stop_ids (the turn-end tokens)")
        if stream_steps < 1:
            raise ValueError(f"stream_steps must be >= 1, got {stream_steps}")
        static["turn_ids"] = tuple(int(i) for i in turns.stop_ids)
    if on_finished is not None or turns is not None:
        return _streamed(
            graphdef, params, args, mesh, stream_steps, on_finished, static, carry, turns
        )
    repl = NamedSharding(mesh, PartitionSpec())
    out_shardings = EngineOutput(sampling.sample_output_shardings(mesh), repl, repl, repl)
    fn = sampling.compiled(_engine_impl, graphdef, params, mesh, out_shardings, **static)
    return fn(params, *args)


class TurnHost(Protocol):
    """The host side of a multi-turn rollout. `stop_ids`: tokens that end a turn calling the
    environment. `answer(rows, tokens, lengths)`: for this call's rows that wait (their
    completions so far, [n, buffer_len] and [n]), each one's observation tokens and whether
    the trajectory ends there instead (its tokens are then not emitted)."""

    stop_ids: tuple[int, ...]

    def answer(
        self, rows: np.ndarray, tokens: np.ndarray, lengths: np.ndarray
    ) -> list[tuple[Sequence[int], bool]]: ...


def _feed(ctx: _Context, slots: _Slots, outputs, slot_S, obs_SM, obs_len_S, end_S):
    """The host's answers into the slots and output buffers: slot_S[i] (S: padding) gets
    observation obs_SM[i, :obs_len_S[i]] written after its sample's tokens and emitted from
    the next step (cut to the budget), or ends (end_S[i]: stopped, not truncated). The caches
    are not touched, so they are not passed (nor copied)."""
    tokens, slp, plp, lengths, stopped = outputs
    b, s, m = tokens.shape[0], slots.sample.shape[0], obs_SM.shape[1]
    valid = slot_S < s
    idx = jnp.minimum(slot_S, s - 1)
    row = jnp.where(valid, slots.sample[idx], b)
    start = slots.emitted[idx]
    count = jnp.where(end_S, 0, jnp.minimum(obs_len_S, ctx.max_new - start))
    col = start[:, None] + jnp.arange(m, dtype=jnp.int32)[None]
    put = jnp.arange(m)[None] < count[:, None]
    tokens = tokens.at[jnp.where(put, row[:, None], b), col].set(obs_SM, mode="drop")
    at = jnp.where(valid, idx, s)
    ends = jnp.where(valid & end_S, idx, s)
    slots = slots.replace(
        forced=slots.forced.at[at].set(start + count, mode="drop"),
        waiting=slots.waiting.at[at].set(False, mode="drop"),
        done=slots.done.at[ends].set(True, mode="drop"),
    )
    stopped = stopped.at[jnp.where(valid & end_S, row, b)].set(True, mode="drop")
    return slots, (tokens, slp, plp, lengths, stopped)


@dataclasses.dataclass
class Finished:
    """Samples of this process that finished since the last call: `rows` index this
    process's rows of the call's batch (prompt-major, as `SampleOutput`'s local rows);
    `tokens` [n, buffer_len] (pad after each completion), `lengths` [n], `truncated` [n]
    (ended by the budget, not a stop token); `decode_steps`: the call's steps so far."""

    rows: np.ndarray
    tokens: np.ndarray
    lengths: np.ndarray
    truncated: np.ndarray
    decode_steps: int


def _streamed(
    graphdef, params, args, mesh, stream_steps, on_finished, static, carry=None, turns=None
) -> EngineOutput:
    """The engine's stages as host-driven calls of at most `stream_steps` decode steps each;
    after each, the newly finished local samples go to `on_finished`, which may stop the call,
    and (multi-turn) the waiting samples get their observations from `turns`.
    The state is donated from call to call; only the finished flags (and, when some are new,
    the output rows) come back to the host."""
    group_size, cfg = static["group_size"], static["cfg"]
    turn_ids = static.get("turn_ids", ())
    host_width, host_done = 0, None
    if carry is not None:
        host, n = carry, static["buffer_len"]
        host_width = host.first_width(n, cfg.max_decode_segments)
        host_done = (host.lengths > 0) & ~np.isin(np.arange(len(host.lengths)), host.slot_rows)
        layers = (
            carry_lib.kept_caches(host.kept, host.kept_src, host_width, mesh)
            if host.kept
            else carry_lib.slot_caches(
                graphdef,
                params,
                mesh,
                host,
                np.asarray(args[0]),
                np.asarray(args[1]),
                group_size=group_size,
                width=host_width,
                max_segments=cfg.max_decode_segments,
                buffer_len=n,
            )
        )
        carry = host.on_devices(mesh, layers)
    jitted = lambda name, make: sampling.cached(
        f"engine/{name}", graphdef, params, mesh, static, make
    )
    batch = sharding.batch_sharding(mesh, 2)
    batch1 = sharding.batch_sharding(mesh, 1)
    merge = lambda p: nnx.merge(graphdef, *p)
    setup_kw = {k: static[k] for k in ("group_size", "num_slots", "shards", "buffer_len", "pad_id")}
    setup_kw["turn_ids"] = turn_ids

    first_width = 0 if carry is None else host_width

    def make_setup():
        def setup(p, ids, mask, key_data, max_new, carry):
            model = merge(p)
            kw = dict(cfg=cfg, mesh=mesh, carry=carry, first_width=first_width, **setup_kw)
            return _setup(model, ids, mask, key_data, max_new, **kw)

        return jax.jit(setup)

    def make_chunk(mode, width, fewer):
        def chunk(p, ctx, state, limit):
            state = _stage(
                merge(p),
                ctx,
                state,
                limit,
                mode=mode,
                width=width,
                fewer=fewer,
                group_size=group_size,
                cfg=cfg,
                mesh=mesh,
                turn_ids=turn_ids,
            )
            active = _in_stage(ctx, state, width, fewer)
            finished = jax.lax.with_sharding_constraint(_finished(ctx, state), batch1)
            return state, (active, state[4][0], finished, jnp.any(state[0].waiting))

        return jax.jit(chunk, donate_argnums=(2,))

    def make_rows():
        def rows(state):
            tokens, _, _, lengths, stopped = state[3]
            pin = jax.lax.with_sharding_constraint
            return pin(tokens, batch), pin(lengths, batch1), pin(stopped, batch1)

        return jax.jit(rows)

    ids, mask = args[0], args[1]
    ctx, state = jitted(f"setup/{first_width}", make_setup)(params, *args, carry)
    rows_fn = jitted("rows", make_rows)
    sent: np.ndarray | None = None
    if host_done is not None:
        sent = host_done.copy()  # ended in earlier calls: not passed again
    stop = False

    def emit(state, finished, steps: int) -> None:
        nonlocal sent, stop
        if on_finished is None:
            return
        done = sharding.local_rows(finished)
        if sent is None:
            sent = np.zeros(done.shape, bool)
        new = np.flatnonzero(done & ~sent)
        if len(new) == 0:
            return
        sent[new] = True
        tokens, lengths, stopped = (sharding.local_rows(x) for x in rows_fn(state))
        stop = bool(on_finished(Finished(new, tokens[new], lengths[new], ~stopped[new], steps)))

    repl = sharding.replicated(mesh)

    def answer(state):
        """The waiting samples' observations from the host, into the state."""
        waiting_of = lambda: jax.jit(lambda st: (st[0].waiting, st[0].sample))
        waiting, held = (np.asarray(x) for x in jitted("waiting", waiting_of)(state))
        at = np.flatnonzero(waiting)
        rows = held[at]
        tokens, lengths, _ = (np.asarray(x) for x in rows_fn(state))
        replies = turns.answer(rows, tokens[rows], lengths[rows])
        n_slots = len(waiting)
        width = sampling.bucket(max([len(ids) for ids, _ in replies] + [1]))
        slot_S = np.full(n_slots, n_slots, np.int32)
        obs = np.full((n_slots, width), static["pad_id"], np.int32)
        obs_len, end = np.zeros(n_slots, np.int32), np.zeros(n_slots, bool)
        for i, (slot, (ids, ends)) in enumerate(zip(at, replies, strict=True)):
            slot_S[i], obs_len[i], end[i] = slot, len(ids), ends
            obs[i, : len(ids)] = ids
        host = (slot_S, obs, obs_len, end)
        make = lambda: jax.jit(_feed, donate_argnums=(1, 2))
        fed = jitted("feed", make)(
            ctx, state[0], state[3], *(jax.device_put(x, repl) for x in host)
        )
        slots, outputs = fed
        return (slots, state[1], state[2], outputs, *state[4:])

    def run(state, mode, width, fewer):
        nonlocal limit
        chunk = jitted(f"chunk/{mode}/{width}/{fewer}", lambda: make_chunk(mode, width, fewer))
        while not stop:
            state, (active, steps, finished, waits) = chunk(params, ctx, state, np.int32(limit))
            active, steps = bool(_scalar(active)), int(_scalar(steps))
            emit(state, finished, steps)
            if turns is not None and bool(_scalar(waits)):
                state = answer(state)
            if not active:
                break
            limit = steps + stream_steps
        return state

    def pack(state, fewer):
        if stop:  # the live samples stay in their slots, for the next call to resume
            return state
        make = lambda: jax.jit(lambda c, st: _pack(c, st, fewer, group_size=group_size, mesh=mesh))
        return jitted(f"pack/{fewer}", make)(ctx, state)

    limit = stream_steps
    b = ids.shape[0] * group_size
    n_slots, min_slots, shards = static["num_slots"], static["min_slots"], static["shards"]
    stages = _stages(n_slots, min_slots, shards, b, static["buffer_len"], cfg)
    state = _drive(stages, state, run, pack)
    if carry is None and not stop:
        shardings = EngineOutput(sampling.sample_output_shardings(mesh), repl, repl, repl)
        output = lambda: jax.jit(_output, out_shardings=shardings)
        return jitted("output", output)(ctx, state, ids, mask)
    shardings = EngineOutput(
        sampling.sample_output_shardings(mesh), repl, repl, repl, batch1, batch1, None, batch1
    )

    def partial_output(ctx, state, ids, mask):
        out = _output(ctx, state, ids, mask)
        slots = state[0]
        return out.replace(
            finished=_finished(ctx, state),
            live=_live_rows(state),
            slot_rows=jnp.where(slots.live, slots.sample, -1),
        )

    make = lambda: jax.jit(partial_output, out_shardings=shardings)
    out = jitted("partial_output", make)(ctx, state, ids, mask)
    return out.replace(slot_cache=state[2])


def _scalar(x: jax.Array) -> np.ndarray:
    # A replicated value: every process holds it whole (it is not fully addressable with
    # several processes, so np.asarray of the global array would refuse).
    return np.asarray(x.addressable_shards[0].data)
