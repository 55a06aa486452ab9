"""The jitted GRPO sampler: P prompts -> G completions each, in one device call.

* Each prompt is prefilled once; its KV cache is shared by its G samples (models/kv_cache.py).
* Decoding runs in `lax.while_loop` and stops as soon as every row has emitted a stop token or
  reached its budget. `max_new_tokens` is a traced scalar (no recompile when it changes); the
  cache buffer and the prompt width are bucketed so that new lengths rarely recompile. Long
  budgets decode in segments of growing static cache length (`decode_segments`), so a token
  attends only to the slots that can be live in its segment.
* Tokens are chosen as rl_reason/rollout/token_choice.py says (CDF inversion at one uniform
  number per sample and position, from a key folded from the sample's id and the position), so
  the continuous-batching engine (engine.py), which decodes samples in any slot and order,
  draws the same.
* Prompts are left-padded; positions count real tokens only, so a padded prompt yields the same
  samples as the unpadded one for the same key.
* Rows are ordered prompt-major: row p * G + g is sample g of prompt p (the layout
  `rl_reason.losses.compute_advantages` expects).

Returned per token: the log-prob under the sampling distribution (after temperature / top-k /
top-p) and under the plain policy (temperature 1, untruncated), which is what GRPO's importance
ratio needs when the sampler's weights are the trainer's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models import kv_cache, partitioning
from models.transformer import Transformer, positions_from_mask, rope_table
from rl_reason.infra import sharding
from rl_reason.rollout.token_choice import (  # noqa: F401  (the sampler's public names)
    SamplingConfig,
    _choose,
    choose_tokens,
    filter_logits,
    inverse_cdf,
    sample_keys,
    token_uniforms,
)

# Shortest decode segment (see `decode_segments`).
_MIN_SEGMENT = 256


@struct.dataclass
class SampleOutput:
    """Completions of B = P * G rows; N is the (bucketed) completion buffer length."""

    tokens: jax.Array  # [B, N] int32, pad after the end of each completion
    mask: jax.Array  # [B, N] bool, 1 on completion tokens (the stop token included)
    sample_logprobs: jax.Array  # [B, N] float32, log-prob under the sampling distribution
    policy_logprobs: jax.Array  # [B, N] float32, log-prob under the plain policy
    lengths: jax.Array  # [B] int32
    truncated: jax.Array  # [B] bool: budget reached without a stop token
    prompt_ids: jax.Array  # [P, Tp] int32, left-padded
    prompt_mask: jax.Array  # [P, Tp] bool
    # [B, N] bool, from multi-turn rollouts (rollout/multi_turn.py): the tokens the policy wrote
    # (`mask` without the observations). None: every completion token is the policy's.
    loss_mask: jax.Array | None = None


def _constrain_cache(cache: kv_cache.KVCache, mesh: Mesh) -> kv_cache.KVCache:
    """Pin the cache's layout: rows over data x fsdp, kv-heads over tensor (models/partitioning)."""

    def pin(x, names):
        spec = partitioning.logical_to_spec(names, x.shape, mesh)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    kv = lambda layer: kv_cache.LayerKV(
        pin(layer.k, kv_cache.KV_AXES), pin(layer.v, kv_cache.KV_AXES)
    )
    return cache.replace(
        prefix=tuple(kv(layer) for layer in cache.prefix),
        layers=tuple(kv(layer) for layer in cache.layers),
        prefix_mask=pin(cache.prefix_mask, ("batch", None)),
        prefix_positions=pin(cache.prefix_positions, ("batch", None)),
    )


def prefill(model: Transformer, prompt_ids_PT: jax.Array, prompt_mask_PT: jax.Array):
    """One pass over the left-padded prompts: (positions [P, Tp] counting real tokens only, the
    logits after each prompt's last token [P, V], the per-layer keys/values [P, Tp, K, H])."""
    positions_PT = positions_from_mask(prompt_mask_PT)
    hidden, kvs = model(
        prompt_ids_PT,
        mask_BT=prompt_mask_PT,
        positions_BT=positions_PT,
        return_hidden=True,
        return_kv=True,
    )
    # Left padding puts every prompt's last real token in the last column.
    return positions_PT, model.logits(hidden[:, -1:])[:, 0], kvs


def _sample_impl(
    graphdef,
    params,
    prompt_ids_PT,
    prompt_mask_PT,
    key_data,
    max_new_tokens,
    *,
    group_size: int,
    buffer_len: int,
    cfg: SamplingConfig,
    pad_id: int,
    mesh: Mesh,
):
    model: Transformer = nnx.merge(graphdef, *params)
    key = jax.random.wrap_key_data(key_data)
    p = prompt_ids_PT.shape[0]
    b = p * group_size
    row_keys = sample_keys(key, jnp.arange(b, dtype=jnp.int32))
    positions_PT, last_logits_PV, kvs = prefill(model, prompt_ids_PT, prompt_mask_PT)
    first_logits = jnp.repeat(last_logits_PV, group_size, axis=0)
    segments = decode_segments(buffer_len, cfg.max_decode_segments)
    cache = kv_cache.from_prefill(kvs, prompt_mask_PT, positions_PT, group_size, segments[0])
    prompt_len_B = jnp.repeat(jnp.sum(prompt_mask_PT, axis=-1, dtype=jnp.int32), group_size)
    stop_ids = jnp.asarray(cfg.stop_token_ids or (-1,), jnp.int32)
    max_new = jnp.minimum(max_new_tokens, buffer_len)

    def emit(t, logits, outputs):
        """Choose token t of every row from `logits` and record it."""
        tokens, slp, plp, stopped, done, lengths = outputs
        token, s_lp, p_lp = choose_tokens(logits, row_keys, jnp.full((b,), t, jnp.int32), cfg)
        token = jnp.where(done, pad_id, token)
        tokens = tokens.at[:, t].set(token)
        slp = slp.at[:, t].set(jnp.where(done, 0.0, s_lp))
        plp = plp.at[:, t].set(jnp.where(done, 0.0, p_lp))
        lengths = lengths + (~done).astype(jnp.int32)
        hit_stop = ~done & jnp.isin(token, stop_ids)
        stopped = stopped | hit_stop
        done = done | hit_stop | (t + 1 >= max_new)
        return token, (tokens, slp, plp, stopped, done, lengths)

    # Token t is fed at position prompt_len + t: the sin/cos of every step, made once.
    rope_BN = rope_table(prompt_len_B[:, None] + jnp.arange(buffer_len)[None], model.cfg)

    def body(state):
        # Token t was chosen last: feed it (writing cache slot t), choose token t + 1.
        t, cache, token, outputs = state
        rope = tuple(jax.lax.dynamic_slice_in_dim(x, t, 1, axis=1) for x in rope_BN)
        logits, cache = model.decode(token, prompt_len_B + t, cache, rope)
        token, outputs = emit(t + 1, logits, outputs)
        return t + 1, _constrain_cache(cache, mesh), token, outputs

    outputs = (
        jnp.full((b, buffer_len), pad_id, jnp.int32),
        jnp.zeros((b, buffer_len), jnp.float32),
        jnp.zeros((b, buffer_len), jnp.float32),
        jnp.zeros((b,), bool),
        jnp.zeros((b,), bool),
        jnp.zeros((b,), jnp.int32),
    )
    token, outputs = emit(0, first_logits, outputs)
    state = (jnp.zeros((), jnp.int32), cache, token, outputs)
    for slots in segments:
        # Feeding token t needs slot t: this segment runs while t < slots, attending to
        # `slots` per-sample slots instead of the whole buffer.
        cond = lambda s, slots=slots: (s[0] < slots) & (s[0] + 1 < max_new) & ~jnp.all(s[3][4])
        t, cache, token, outputs = state
        state = (t, _constrain_cache(kv_cache.grow(cache, slots), mesh), token, outputs)
        state = jax.lax.while_loop(cond, body, state)
    tokens, slp, plp, stopped, _, lengths = state[3]
    mask = jnp.arange(buffer_len)[None, :] < lengths[:, None]
    return SampleOutput(
        tokens=tokens,
        mask=mask,
        sample_logprobs=slp,
        policy_logprobs=plp,
        lengths=lengths,
        truncated=~stopped,
        prompt_ids=prompt_ids_PT,
        prompt_mask=prompt_mask_PT,
    )


def decode_segments(buffer_len: int, max_segments: int) -> tuple[int, ...]:
    """Per-sample cache lengths of the decode segments: at most `max_segments` equal steps of
    at least `_MIN_SEGMENT` slots (a multiple of 8), the last one `buffer_len`.

    Each segment is its own loop over a cache of static length, so attention reads only the
    slots that can be live in it; more segments read less but compile the decode step again.
    """
    count = max(1, min(max_segments, buffer_len // _MIN_SEGMENT))
    step = -(-buffer_len // count // 8) * 8
    return tuple(sorted({min(step * i, buffer_len) for i in range(1, count + 1)}))


_COMPILED: dict[tuple, Callable] = {}


def sample_output_shardings(mesh: Mesh) -> SampleOutput:
    batch = lambda rank: NamedSharding(
        mesh, PartitionSpec(partitioning.BATCH_AXES, *[None] * (rank - 1))
    )
    return SampleOutput(*([batch(2)] * 4), batch(1), batch(1), batch(2), batch(2))


def cached(name, graphdef, params, mesh: Mesh, static: dict, make: Callable[[], Callable]):
    """The jitted function `make()` builds, built once per (name, model graph, params
    structure, mesh, static arguments)."""
    key = (name, graphdef, jax.tree.structure(params), mesh, tuple(sorted(static.items())))
    if key not in _COMPILED:
        _COMPILED[key] = make()
    return _COMPILED[key]


def compiled(impl: Callable, graphdef, params, mesh: Mesh, out_shardings, **static) -> Callable:
    """`impl(graphdef, params, prompt_ids, prompt_mask, key_data, max_new_tokens, **static)`
    jitted for one mesh with explicit in/out shardings (cached per shape key)."""

    def make():
        batch = sharding.batch_sharding(mesh, 2)
        repl = NamedSharding(mesh, PartitionSpec())
        return jax.jit(
            functools.partial(impl, graphdef, mesh=mesh, **static),
            in_shardings=(partitioning.state_shardings(params, mesh), batch, batch, repl, repl),
            out_shardings=out_shardings,
        )

    return cached(impl, graphdef, params, mesh, static, make)


def compiled_count() -> int:
    """Executables compiled so far by the sampler (tests check that budgets do not recompile)."""
    return sum(fn._cache_size() for fn in _COMPILED.values())


def bucket(n: int, minimum: int = 16) -> int:
    """Round a length up to a power of two (>= minimum) so that few shapes get compiled."""
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def pad_prompts(
    prompts: Sequence[Sequence[int]], pad_id: int, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to `width` (default: the bucketed longest). Returns (ids, mask)."""
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty; every prompt needs >= 1 token")
    width = bucket(max(lengths)) if width is None else width
    if max(lengths) > width:
        raise ValueError(f"a prompt has {max(lengths)} tokens, more than the width {width}")
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = True
    return ids, mask


def prepare(
    model: Transformer | tuple,
    prompts: Sequence[Sequence[int]],
    key: jax.Array,
    *,
    max_new_tokens: int,
    pad_id: int,
    buffer_len: int | None,
    prompt_width: int | None,
    mesh: Mesh | None,
):
    """Checks a sampling call and puts its inputs on the devices: (graphdef, params, mesh,
    buffer_len, device args). See `sample` for the arguments."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    graphdef, *states = nnx.split(model) if isinstance(model, nnx.Module) else model
    params = tuple(states)  # merged with nnx.merge(graphdef, *params) inside the jit
    buffer_len = bucket(max_new_tokens) if buffer_len is None else buffer_len
    if max_new_tokens > buffer_len:
        raise ValueError(f"max_new_tokens {max_new_tokens} exceeds buffer_len {buffer_len}")
    mesh = sharding.mesh_of(params) if mesh is None else mesh
    shards = sharding.batch_shards(mesh) // jax.process_count()
    if len(prompts) % max(shards, 1):
        raise ValueError(
            f"{len(prompts)} prompts do not split over the {shards} local batch shards of mesh "
            f"{dict(mesh.shape)}: pass a multiple of {shards} prompts"
        )
    ids, mask = pad_prompts(prompts, pad_id, prompt_width)
    batch = sharding.batch_sharding(mesh, 2)
    repl = NamedSharding(mesh, PartitionSpec())
    # Every input goes to the devices by an explicit transfer, none implicitly at the call: the
    # sampler runs under jax.transfer_guard("disallow") (tests/test_transfer_guard.py).
    args = (
        jax.make_array_from_process_local_data(batch, ids),
        jax.make_array_from_process_local_data(batch, mask),
        # Raw key bits: a host value every process holds alike (a typed key array would be
        # committed to one local device).
        jax.make_array_from_process_local_data(repl, np.asarray(jax.random.key_data(key))),
        jax.make_array_from_process_local_data(repl, np.asarray(max_new_tokens, np.int32)),
    )
    return graphdef, params, mesh, buffer_len, args


_PLAIN = SamplingConfig()


def sample(
    model: Transformer | tuple,
    prompts: Sequence[Sequence[int]],
    key: jax.Array,
    *,
    group_size: int = 1,
    max_new_tokens: int,
    config: SamplingConfig = _PLAIN,
    pad_id: int = 0,
    buffer_len: int | None = None,
    prompt_width: int | None = None,
    mesh: Mesh | None = None,
) -> SampleOutput:
    """Sample `group_size` completions for each prompt (lists of token ids).

    `model` is a Transformer or its `nnx.split`: (graphdef, params) or (graphdef, *states), e.g.
    (graphdef, lora_state, base_state) for a LoRA policy. `buffer_len` (default: the
    bucketed `max_new_tokens`) fixes the compiled completion width; calls with any
    `max_new_tokens <= buffer_len` reuse the same executable.

    `mesh` (default: the one the params live on) splits prompts and rows over data x fsdp and
    the KV cache's kv-heads over tensor. With several processes, `prompts` are this process's
    prompts (the same number on each) and the outputs are global arrays; read this process's
    rows with `rl_reason.infra.sharding.local_rows`.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    graphdef, params, mesh, buffer_len, args = prepare(
        model,
        prompts,
        key,
        max_new_tokens=max_new_tokens,
        pad_id=pad_id,
        buffer_len=buffer_len,
        prompt_width=prompt_width,
        mesh=mesh,
    )
    fn = compiled(
        _sample_impl,
        graphdef,
        params,
        mesh,
        sample_output_shardings(mesh),
        group_size=group_size,
        buffer_len=buffer_len,
        cfg=config,
        pad_id=pad_id,
    )
    return fn(params, *args)
