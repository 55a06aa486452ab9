"""Partial rollouts: samples that outlast a step carry over, so the engine never waits out a tail.

With long-tailed lengths, a step that must finish all of its samples before training ends with
most slots idle behind its longest ones. Here `steps_ahead` = k later steps' prompts are in
flight beside the step's own: each engine call decodes until the oldest batch (the one this
step trains on) has finished, its refilled slots taking the later batches' samples meanwhile;
samples still decoding when it has finished carry over to the next call, with their tokens,
both log-probs and the policy version each token was drawn under.

* Staleness is bounded by construction: batch n (drawn for step n - k) is trained at step n,
  so every token it holds was drawn at most k policy versions earlier. The objective's
  importance ratio uses the sampler's log-probs of each token (`RolloutArrays.ratio_logprobs`
  without `recompute_old_logprobs`): the versions they were drawn under, not the trainer's.
* A carried sample resumes in a slot of its own batch shard with its key, so with unchanged
  weights its tokens are those it would have drawn in one call (the tests' check). Its cache
  either is kept as the last call left it (cache="keep", the default: the keys and values of
  its earlier tokens stay those of the weights they were computed with, as in PipelineRL's
  in-flight weight updates; nothing is recomputed) or is rebuilt by forward passes over its
  prompt and tokens so far under the new weights (cache="rebuild", as AReaL does: its later
  tokens are then drawn from the current policy given its whole context, at the cost of a
  prefill per carried sample). Either way each token's recorded log-probs are those it was
  drawn with, which is what the importance ratio needs.
* The state between steps is host arrays (tokens, log-probs, versions, lengths, keys of the
  batches in flight) and, with cache="keep", the slots' caches; it is checkpointed with the
  trainer, so a resumed run is bit-identical; the batches' examples come back from the data
  position before the oldest one.

Rows of a call are laid out shard-major: each batch shard holds an equal share of every batch
in flight, oldest first, so every shard's queue is in age order and a resumed sample never
changes shard. One process only (the batches live on one host).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from models import kv_cache
from rl_reason.infra import sharding
from rl_reason.rollout import engine, sampling, token_choice
from rl_reason.rollout.sampling import SampleOutput, SamplingConfig

CACHE_MODES = ("keep", "rebuild")
_FIELDS = ("tokens", "sample_logprobs", "policy_logprobs", "versions", "lengths", "stopped", "done")


@dataclasses.dataclass
class Batch:
    """One step's P prompts x G samples in flight; rows prompt-major. `versions` [B, N]: the
    policy version (trainer step) each token was drawn under, -1 past the row's length;
    `lengths` 0: not started; `done`: ended (stop token or budget)."""

    prompts: list[list[int]]
    key_data: np.ndarray  # [B, 2] uint32: each sample's key (token_choice.sample_keys)
    tokens: np.ndarray
    sample_logprobs: np.ndarray
    policy_logprobs: np.ndarray
    versions: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray
    done: np.ndarray
    examples: list[dict] | None = None
    data_before: Any = None  # the data position before its examples were drawn

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def staleness(self, version: int) -> np.ndarray:
        """[B, N] versions behind `version` of each completion token (-1 past the length)."""
        return np.where(self.versions >= 0, version - self.versions, -1)


def new_batch(prompts, key: jax.Array, group_size: int, buffer_len: int, pad_id: int, **kw):
    b = len(prompts) * group_size
    keys = token_choice.sample_keys(key, jnp.arange(b, dtype=jnp.int32))
    return Batch(
        prompts=[list(p) for p in prompts],
        key_data=np.asarray(jax.random.key_data(keys)),
        tokens=np.full((b, buffer_len), pad_id, np.int32),
        sample_logprobs=np.zeros((b, buffer_len), np.float32),
        policy_logprobs=np.zeros((b, buffer_len), np.float32),
        versions=np.full((b, buffer_len), -1, np.int32),
        lengths=np.zeros((b,), np.int32),
        stopped=np.zeros((b,), bool),
        done=np.zeros((b,), bool),
        **kw,
    )


@dataclasses.dataclass
class StepRollout:
    """What `PartialRollouts.step` returns: the trained batch, its `SampleOutput` on the
    devices, and the call's engine counters (slot steps, live slot steps, decode steps)."""

    batch: Batch
    sample: SampleOutput
    slot_steps: int
    live_slot_steps: int
    decode_steps: int


class PartialRollouts:
    """The batches in flight and the engine calls that advance them (see the module doc)."""

    def __init__(
        self,
        *,
        steps_ahead: int,
        group_size: int,
        max_new_tokens: int,
        buffer_len: int,
        config: SamplingConfig,
        engine_config: engine.EngineConfig,
        pad_id: int,
        prompt_width: int,
        mesh: Mesh,
        look_steps: int = 16,
        cache: str = "keep",
    ):
        if cache not in CACHE_MODES:
            raise ValueError(f"partial rollouts' cache must be one of {CACHE_MODES}, got {cache!r}")
        if steps_ahead < 1:
            raise ValueError(f"partial rollouts need steps_ahead >= 1, got {steps_ahead}")
        if jax.process_count() > 1:
            raise ValueError(
                "partial rollouts run in one process (their batches live on one host); "
                "set sampling.partial_rollout_steps=0 for multi-process runs"
            )
        self.steps_ahead, self.group_size = steps_ahead, group_size
        self.max_new_tokens, self.buffer_len = max_new_tokens, buffer_len
        self.config, self.engine_config, self.pad_id = config, engine_config, pad_id
        self.prompt_width, self.mesh, self.look_steps = prompt_width, mesh, look_steps
        self.shards = sharding.batch_shards(mesh)
        self.batches: list[Batch] = []
        self.cache = cache
        # cache="keep": the last call's slot caches and, per slot, the (batch, row) it held
        # live ([S, 2], -1: none), batch counted in `batches`.
        self.kept: tuple = ()
        self.kept_rows: np.ndarray | None = None

    @property
    def wanted(self) -> int:
        """Batches to add before the next step: the step's own and `steps_ahead` more."""
        return self.steps_ahead + 1 - len(self.batches)

    def add(self, prompts: Sequence[Sequence[int]], key: jax.Array, **kw) -> None:
        """A new batch at the back (`kw`: its examples and data position, for the trainer)."""
        if self.batches and len(prompts) != len(self.batches[0].prompts):
            raise ValueError("every batch in flight needs the same number of prompts")
        if len(prompts) % self.shards:
            raise ValueError(
                f"{len(prompts)} prompts do not split over the {self.shards} batch shards"
            )
        self.batches.append(
            new_batch(prompts, key, self.group_size, self.buffer_len, self.pad_id, **kw)
        )

    # -- one step --------------------------------------------------------------------------

    def _layout(self) -> tuple[np.ndarray, list[list[int]]]:
        """[n, B] each batch row's row in the call, and the call's prompts, shard-major."""
        n, p = len(self.batches), len(self.batches[0].prompts)
        d, g = self.shards, self.group_size
        per = p // d  # prompts of each batch on each shard
        prompt_at = np.zeros((n, p), np.int64)
        prompts: list[list[int]] = []
        for shard in range(d):
            for j, batch in enumerate(self.batches):
                for q in range(shard * per, (shard + 1) * per):
                    prompt_at[j, q] = len(prompts)
                    prompts.append(batch.prompts[q])
        rows = (prompt_at[:, :, None] * g + np.arange(g)).reshape(n, p * g)
        return rows, prompts

    def _carry(self, rows: np.ndarray, slots: int) -> engine.HostCarry:
        total = rows.size
        gather = lambda name: np.concatenate([getattr(b, name) for b in self.batches])
        order = np.argsort(rows.reshape(-1))  # call row -> (batch, row) flat index
        arrays = {name: gather(name)[order] for name in _FIELDS}
        key_data = gather("key_data")[order]
        per_shard, slots_per = total // self.shards, slots // self.shards
        resumed = (arrays["lengths"] > 0) & ~arrays["done"]
        fresh = arrays["lengths"] == 0
        slot_rows = np.full((slots,), -1, np.int32)
        queue = np.full((total,), -1, np.int32)
        queue_len = np.zeros((self.shards,), np.int32)
        for shard in range(self.shards):
            ids = np.arange(shard * per_shard, (shard + 1) * per_shard)
            held = ids[resumed[ids]]
            if len(held) > slots_per:  # cannot happen: they were held by this shard's slots
                raise RuntimeError(f"{len(held)} samples to resume on {slots_per} slots")
            slot_rows[shard * slots_per : shard * slots_per + len(held)] = held
            pending = ids[fresh[ids]] - shard * per_shard
            queue[shard * per_shard : shard * per_shard + len(pending)] = pending
            queue_len[shard] = len(pending)
        kept, kept_src = (), None
        if self.kept:
            # Each resumed sample's earlier slot: its (batch, row) in the kept table.
            flat = rows.reshape(-1)
            n_rows = rows.shape[1]
            where = {}
            for s_prev, (j, r) in enumerate(self.kept_rows):
                if j >= 0:
                    where[int(flat[j * n_rows + r])] = s_prev
            kept_src = np.asarray([where.get(int(c), -1) if c >= 0 else -1 for c in slot_rows])
            if np.any((slot_rows >= 0) & (kept_src < 0)):
                raise RuntimeError("a sample to resume has no kept cache")
            kept = self.kept
        return engine.HostCarry(
            kept=kept,
            kept_src=kept_src,
            tokens=arrays["tokens"],
            sample_logprobs=arrays["sample_logprobs"],
            policy_logprobs=arrays["policy_logprobs"],
            lengths=arrays["lengths"],
            stopped=arrays["stopped"],
            key_data=key_data,
            slot_rows=slot_rows,
            queue=queue,
            queue_len=queue_len,
        )

    def step(self, policy: tuple, version: int) -> StepRollout:
        """Decode until the oldest batch has finished (with `policy`, whose version is
        `version`); returns it, the later batches keep their progress."""
        if self.wanted > 0:
            raise ValueError(f"add {self.wanted} more batch(es) before the step")
        counts = (0, 0, 0)
        if not self.batches[0].complete:  # it may have finished during an earlier call
            counts = self._call(policy, version)
        batch = self.batches.pop(0)
        if self.kept_rows is not None:
            assert not np.any(self.kept_rows[:, 0] == 0), "a finished batch's sample is live"
            self.kept_rows[:, 0] = np.where(self.kept_rows[:, 0] > 0, self.kept_rows[:, 0] - 1, -1)
        return StepRollout(batch, self._sample_output(batch), *counts)

    def _call(self, policy: tuple, version: int) -> tuple[int, int, int]:
        rows, prompts = self._layout()
        total = rows.size
        slots = self.engine_config.slots or rows.shape[1]
        carry = self._carry(rows, slots)
        oldest = rows[0]
        waiting = set(oldest[~self.batches[0].done].tolist())

        def on_finished(f: engine.Finished) -> bool:
            waiting.difference_update(f.rows.tolist())
            return not waiting

        out = engine.sample(
            policy,
            prompts,
            jax.random.key(0),  # unused: every sample's key comes with the carry
            group_size=self.group_size,
            max_new_tokens=self.max_new_tokens,
            config=self.config,
            engine=dataclasses.replace(self.engine_config, slots=slots),
            pad_id=self.pad_id,
            buffer_len=self.buffer_len,
            prompt_width=self.prompt_width,
            mesh=self.mesh,
            on_finished=on_finished,
            stream_steps=self.look_steps,
            carry=carry,
        )
        s = out.sample
        got = {
            "tokens": np.asarray(s.tokens),
            "sample_logprobs": np.asarray(s.sample_logprobs),
            "policy_logprobs": np.asarray(s.policy_logprobs),
            "lengths": np.asarray(s.lengths),
            "stopped": ~np.asarray(s.truncated),
        }
        finished, live = np.asarray(out.finished), np.asarray(out.live)
        assert finished.shape == (total,)
        if self.cache == "keep":
            # Call row -> (batch, row) of the samples the slots still hold; the oldest batch
            # has finished, so none is its: after the pop they are counted one batch lower.
            held = np.asarray(out.slot_rows)
            j_of, r_of = np.divmod(np.argsort(rows.reshape(-1)), rows.shape[1])
            self.kept_rows = np.full((len(held), 2), -1, np.int32)
            self.kept_rows[held >= 0] = np.stack([j_of[held[held >= 0]], r_of[held[held >= 0]]], 1)
            self.kept = out.slot_cache
        for j, batch in enumerate(self.batches):
            r = rows[j]
            moved = (finished[r] | live[r]) & ~batch.done  # rows this call decoded
            if not moved.any():
                continue
            before = batch.lengths.copy()
            for name, x in got.items():
                getattr(batch, name)[moved] = x[r][moved]
            cols = np.arange(self.buffer_len)[None]
            new = moved[:, None] & (cols >= before[:, None]) & (cols < batch.lengths[:, None])
            batch.versions[new] = version
            batch.done |= finished[r]
        return int(out.slot_steps), int(out.live_slot_steps), int(out.decode_steps)

    def _sample_output(self, batch: Batch) -> SampleOutput:
        ids, mask = sampling.pad_prompts(batch.prompts, self.pad_id, self.prompt_width)
        cols = np.arange(self.buffer_len)[None]
        host = SampleOutput(
            tokens=batch.tokens,
            mask=cols < batch.lengths[:, None],
            sample_logprobs=batch.sample_logprobs,
            policy_logprobs=batch.policy_logprobs,
            lengths=batch.lengths,
            truncated=~batch.stopped,
            prompt_ids=ids,
            prompt_mask=mask,
        )
        return jax.tree.map(lambda x: sharding.from_global_full(x, self.mesh), host)

    # -- checkpointing -----------------------------------------------------------------------

    def to_checkpoint(self) -> dict[str, Any]:
        """The batches in flight as stacked host arrays [n, B, ...] (their prompts and
        examples come back from the data position), and with cache="keep" the slot caches
        (per layer k, v padded to [S, K, N, H]) and the (batch, row) each slot holds."""
        out: dict[str, Any] = {
            name: np.stack([getattr(b, name) for b in self.batches])
            for name in (*_FIELDS, "key_data")
        }
        if self.cache == "keep":
            slots = self.slots
            rows = np.full((slots, 2), -1, np.int32)
            rows[: len(self.kept_rows)] = self.kept_rows
            out["kept_rows"] = rows

            def pad(x):
                x = np.asarray(x)
                return np.pad(
                    x, [(0, slots - x.shape[0]), (0, 0), (0, self.buffer_len - x.shape[2]), (0, 0)]
                )

            out["kept_cache"] = [{"k": pad(kv.k), "v": pad(kv.v)} for kv in self.kept]
        return out

    @property
    def slots(self) -> int:
        return self.engine_config.slots or len(self.batches[0].prompts) * self.group_size

    def abstract_checkpoint(self, rows: int, policy: tuple | None = None) -> dict[str, Any]:
        """`to_checkpoint`'s shapes after a step (`steps_ahead` batches of `rows` rows);
        with cache="keep", `policy` gives the caches' layers, heads and dtype."""
        n, w = self.steps_ahead, self.buffer_len
        wide = {
            "tokens": np.int32,
            "sample_logprobs": np.float32,
            "policy_logprobs": np.float32,
            "versions": np.int32,
        }
        flat = {"lengths": np.int32, "stopped": np.bool_, "done": np.bool_}
        out: dict[str, Any] = {k: jax.ShapeDtypeStruct((n, rows, w), v) for k, v in wide.items()}
        out.update({k: jax.ShapeDtypeStruct((n, rows), v) for k, v in flat.items()})
        out["key_data"] = jax.ShapeDtypeStruct((n, rows, 2), np.uint32)
        if self.cache == "keep":
            slots = self.engine_config.slots or rows
            out["kept_rows"] = jax.ShapeDtypeStruct((slots, 2), np.int32)
            out["kept_cache"] = [
                {
                    "k": jax.ShapeDtypeStruct((slots, k, w, h), dtype),
                    "v": jax.ShapeDtypeStruct((slots, k, w, h), dtype),
                }
                for k, h, dtype in cache_layout(policy)
            ]
        return out

    def load(self, arrays: dict, prompts: list[list[list[int]]], extras: list[dict]) -> None:
        """Batches in flight from `to_checkpoint`'s arrays, their prompts and (per batch)
        the keyword fields of `Batch` (examples, data position)."""
        self.batches = []
        for j, (p, kw) in enumerate(zip(prompts, extras, strict=True)):
            fields = {k: np.array(arrays[k][j]) for k in (*_FIELDS, "key_data")}
            self.batches.append(Batch(prompts=[list(x) for x in p], **fields, **kw))
        if self.cache == "keep":
            self.kept_rows = np.asarray(arrays["kept_rows"], np.int32)
            self.kept = tuple(
                kv_cache.LayerKV(jnp.asarray(kv["k"]), jnp.asarray(kv["v"]))
                for kv in arrays["kept_cache"]
            )


def cache_layout(policy: tuple) -> list[tuple[int, int, Any]]:
    """(kv heads, head dim, dtype) of each layer's cache when `policy` samples."""
    graphdef, *states = policy
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, 8), jnp.bool_)
    shapes = jax.eval_shape(
        lambda s, i, m: sampling.prefill(nnx.merge(graphdef, *s), i, m)[2], tuple(states), ids, mask
    )
    return [(kv.k.shape[2], kv.k.shape[3], kv.k.dtype) for kv in shapes]
