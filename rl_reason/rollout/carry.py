"""What an engine call that continues earlier ones starts from (partial rollouts).

`HostCarry` is the host's view: every row's completion so far, its key, the rows each slot
resumes and each batch shard's queue of rows to start (rl_reason/rollout/partial.py builds it).
The resumed slots' caches come either from the last call as it left them (`kept_caches`: each
slot takes its sample's earlier slot) or are rebuilt with the call's weights (`slot_caches`);
`Carry` is all of it on the devices, as `engine._setup` takes it.

Rebuilt caches come from forward passes over each resumed sample's prompt and tokens so far,
its rows grouped by length into the decode segments' widths: a forward's attention grows with
the square of its width, so one pass at the longest sample's width would make every short one
pay for it (llama-20m on the 2-core CPU: 6.1 s for 32 rows x 1,088 tokens, 0.6 s at 320).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding

from models import kv_cache, partitioning
from rl_reason.infra import sharding
from rl_reason.rollout import sampling


@struct.dataclass
class Carry:
    """`HostCarry` on the devices, with the resumed slots' caches (`layers`, per layer
    LayerKV [S, K, W, H], W the call's first cache width)."""

    tokens: jax.Array
    sample_logprobs: jax.Array
    policy_logprobs: jax.Array
    lengths: jax.Array
    stopped: jax.Array
    key_data: jax.Array
    slot_rows: jax.Array
    queue: jax.Array
    queue_len: jax.Array
    layers: tuple = ()


@dataclasses.dataclass
class HostCarry:
    """Where earlier calls left the samples of this one, as host arrays. Rows [B] as the
    call's (prompt-major): each row's completion so far (`tokens`, both log-probs [B, N],
    `lengths`, `stopped`; length 0: not started) and its key (`key_data` [B, 2]);
    `slot_rows` [S]: the started, unended row each slot resumes (-1: none), in a slot of its
    own batch shard; `queue` [B]: each shard's rows to start, in order, as local ids
    (shard-major, -1 past the shard's `queue_len` [D]). Rows neither resumed nor queued have
    ended: the call returns them as given."""

    tokens: np.ndarray
    sample_logprobs: np.ndarray
    policy_logprobs: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray
    key_data: np.ndarray
    slot_rows: np.ndarray
    queue: np.ndarray
    queue_len: np.ndarray
    # Resume the slots' caches as an earlier call left them (`kept`, its `EngineOutput.
    # slot_cache`; `kept_src` [S]: the earlier slot each slot's sample was in, -1: none)
    # instead of rebuilding them with this call's weights.
    kept: tuple = ()
    kept_src: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        skip = ("kept", "kept_src")
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
        }

    def check(self, rows: int, slots: int, shards: int, buffer_len: int) -> None:
        wide = ("tokens", "sample_logprobs", "policy_logprobs")
        want = {"slot_rows": (slots,), "queue_len": (shards,), "queue": (rows,)}
        want.update({name: (rows, buffer_len) for name in wide})
        for name, x in self.arrays().items():
            shape = want.get(name, (rows,))
            if x.shape[: len(shape)] != shape:
                raise ValueError(f"carry.{name} has shape {x.shape}, expected {shape}")
        if self.kept and (self.kept_src is None or self.kept_src.shape != (slots,)):
            raise ValueError(f"carry.kept needs kept_src of shape {(slots,)}")

    def resumed_lengths(self) -> np.ndarray:
        """[S] the length so far of each slot's resumed sample (0: none)."""
        held = self.slot_rows >= 0
        return np.where(held, self.lengths[np.maximum(self.slot_rows, 0)], 0)

    def first_width(self, buffer_len: int, max_segments: int) -> int:
        """The call's first cache width: the narrowest decode segment its longest resumed
        sample fits."""
        need = int(self.resumed_lengths().max(initial=0))
        return next(w for w in sampling.decode_segments(buffer_len, max_segments) if w >= need)

    def on_devices(self, mesh: Mesh, layers: tuple) -> Carry:
        put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
        return Carry(**{k: put(v) for k, v in self.arrays().items()}, layers=layers)


def _pin(x: jax.Array, mesh: Mesh) -> jax.Array:
    spec = partitioning.logical_to_spec(kv_cache.KV_AXES, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def slot_caches(
    graphdef,
    params,
    mesh: Mesh,
    host: HostCarry,
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    *,
    group_size: int,
    width: int,
    max_segments: int,
    buffer_len: int,
) -> tuple:
    """Per layer LayerKV [S, K, width, H]: each resumed slot's keys and values of its tokens
    so far (positions 0 .. length - 1 after its prompt), computed with `params`; zeros in the
    other slots; () when no slot resumes. One forward pass per decode-segment width that some
    resumed sample needs, over those samples only (their count rounded up to a power of two,
    so that few shapes compile). `prompt_ids`, `prompt_mask` [P, Tp]: the call's prompts."""
    lengths = host.resumed_lengths()
    slots, tp = len(lengths), prompt_ids.shape[1]
    layers, lower = (), 0
    for w in sampling.decode_segments(buffer_len, max_segments):
        pick = np.flatnonzero((lengths > lower) & (lengths <= w))
        lower = w
        if w > width or len(pick) == 0:
            continue
        n = sampling.bucket(len(pick), minimum=1)
        rows = host.slot_rows[pick]
        prompt = np.zeros(n, np.int64)
        prompt[: len(pick)] = rows // group_size
        ids = np.zeros((n, tp + w), np.int32)
        mask = np.zeros((n, tp + w), bool)
        ids[:, :tp], mask[:, :tp] = prompt_ids[prompt], prompt_mask[prompt]
        ids[: len(pick), tp:] = host.tokens[rows, :w]
        # Padding rows attend over a prompt only (finite keys and values), and are dropped.
        mask[: len(pick), tp:] = np.arange(w)[None] < lengths[pick][:, None]
        target = np.full(n, slots, np.int32)
        target[: len(pick)] = pick
        static = dict(n=n, tp=tp, w=w, width=width, slots=slots, fresh=not layers)

        def make(w=w, fresh=not layers):
            write = functools.partial(
                _write, graphdef, tp=tp, w=w, width=width, slots=slots, mesh=mesh, fresh=fresh
            )
            return jax.jit(write)

        fn = sampling.cached("carry/slot_caches", graphdef, params, mesh, static, make)
        layers = fn(params, layers, ids, mask, target)
    return layers


def kept_caches(kept: tuple, src: np.ndarray, width: int, mesh: Mesh) -> tuple:
    """Per layer LayerKV [S, K, width, H]: slot s takes earlier slot src[s]'s cache (zeros
    where src is -1), cut to `width` (every resumed sample fits it)."""
    if not (src >= 0).any():
        return ()

    def take(layers, src):
        def one(x):
            got = jnp.take(x, jnp.maximum(src, 0), axis=0, mode="clip")[:, :, :width]
            return _pin(jnp.where((src >= 0)[:, None, None, None], got, 0), mesh)

        return tuple(kv_cache.LayerKV(one(kv.k), one(kv.v)) for kv in layers)

    # Nothing of the model is in this program: one per (mesh, width), whatever the policy.
    fn = sampling.cached("carry/kept", None, (), mesh, dict(width=width), lambda: jax.jit(take))
    return fn(kept, jax.device_put(src.astype(np.int32), sharding.replicated(mesh)))


def _write(graphdef, params, layers, ids, mask, target, *, tp, w, width, slots, mesh, fresh):
    """`layers` with the suffix keys and values of one forward pass over `ids` written into
    slots `target` (out of range: dropped), columns 0 .. w - 1."""
    model = nnx.merge(graphdef, *params)
    _, kvs = model(ids, mask_BT=mask, return_hidden=True, return_kv=True)
    out = []
    for i, kv in enumerate(kvs):
        new = kv_cache.heads_first(kv_cache.LayerKV(kv.k[:, tp:], kv.v[:, tp:]))
        if fresh:
            shape = (slots, new.k.shape[1], width, new.k.shape[3])
            base = kv_cache.LayerKV(jnp.zeros(shape, new.k.dtype), jnp.zeros(shape, new.v.dtype))
        else:
            base = layers[i]
        put = lambda b, x: b.at[target, :, :w].set(x, mode="drop")
        out.append(kv_cache.LayerKV(_pin(put(base.k, new.k), mesh), _pin(put(base.v, new.v), mesh)))
    return tuple(out)
