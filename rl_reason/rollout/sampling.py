"""The jitted GRPO sampler: P prompts -> G completions each, in one device call.

* Each prompt is prefilled once; its KV cache is shared by its G samples (models/kv_cache.py).
* Decoding runs in `lax.while_loop` and stops as soon as every row has emitted a stop token or
  reached its budget. `max_new_tokens` is a traced scalar (no recompile when it changes); the
  cache buffer and the prompt width are bucketed so that new lengths rarely recompile. Long
  budgets decode in segments of growing static cache length (`decode_segments`), so a token
  attends only to the slots that can be live in its segment.
* Tokens are drawn by inverting the CDF at one uniform number per row (`inverse_cdf`), not by
  Gumbel-max over the whole vocabulary, whose B x V random numbers cost more than the rest of
  the token choice on a CPU. The number of token t of sample i comes from a key folded from i
  and t (`sample_keys`, `token_uniforms`), so the continuous-batching engine
  (rl_reason/rollout/engine.py), which decodes samples in any slot and order, draws the same.
* Prompts are left-padded; positions count real tokens only, so a padded prompt yields the same
  samples as the unpadded one for the same key.
* Rows are ordered prompt-major: row p * G + g is sample g of prompt p (the layout
  `rl_reason.losses.compute_advantages` expects).

Returned per token: the log-prob under the sampling distribution (after temperature / top-k /
top-p) and under the plain policy (temperature 1, untruncated), which is what GRPO's importance
ratio needs when the sampler's weights are the trainer's.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick each token. temperature 0 is greedy; top_k 0 and top_p 1 are off.

    `vocab_size`: ids at or past it are never sampled (embedding rows padded beyond the
    tokenizer's vocabulary); None allows every row.

    `logit_bias`: (token id, bias) pairs added to those tokens' logits before temperature and
    truncation: they change the sampling distribution (and its log-probs), not the policy
    log-prob. Benchmarks use a stop-token bias for controlled, geometric completion lengths.

    `max_decode_segments`: decoding runs in up to this many segments of growing KV-cache length
    (`decode_segments`), so that early tokens do not attend over the whole budget; 1 compiles
    the decode step once.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    vocab_size: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    max_decode_segments: int = 4

    def __post_init__(self) -> None:
        if self.max_decode_segments < 1:
            raise ValueError(f"max_decode_segments must be >= 1, got {self.max_decode_segments}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        bias = tuple((int(t), float(b)) for t, b in self.logit_bias)
        if any(t < 0 for t, _ in bias):
            raise ValueError(f"logit_bias token ids must be >= 0, got {self.logit_bias}")
        object.__setattr__(self, "logit_bias", bias)


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


def filter_logits(logits_BV: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus) on float32 logits; removed entries -inf.

    Top-p keeps the smallest set of most likely tokens whose probability reaches top_p: a token
    stays if the mass of the tokens ranked above it is below top_p. Entries tied with the
    nucleus' least likely token are kept too.
    """
    x = logits_BV.astype(jnp.float32) / cfg.temperature
    if cfg.top_k > 0:
        kth = jax.lax.top_k(x, cfg.top_k)[0][:, -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if cfg.top_p < 1.0:
        sorted_x = jnp.sort(x, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_x, axis=-1)
        mass_above = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_above < cfg.top_p
        threshold = jnp.min(jnp.where(keep, sorted_x, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < threshold, -jnp.inf, x)
    return x


def _argmax_first(x_BV: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (first index of the max; a NaN counts as the max).

    XLA:CPU lowers argmax to a slow variadic (value, index) reduction: at 32 x 32000 it cost
    ~8 ms of a ~26 ms llama-20m decode step. Two plain reductions give the same index ~3x
    faster (see benchmarks/sampling.py --profile).
    """
    top = jnp.max(x_BV, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x_BV.shape, x_BV.ndim - 1)
    hit = (x_BV == top) | jnp.isnan(x_BV)
    return jnp.min(jnp.where(hit, iota, x_BV.shape[-1]), axis=-1)


# Vocabulary block of the two-level inverse-CDF search in `_categorical`.
_CDF_BLOCK = 128


def _first_reaching(cum_BN: jax.Array, weight_BN: jax.Array, target_B: jax.Array) -> jax.Array:
    """Per row, the first index whose running sum reaches the target and whose weight is > 0;
    the last index of positive weight when rounding left the target just above the total."""
    iota = jax.lax.broadcasted_iota(jnp.int32, cum_BN.shape, 1)
    n = cum_BN.shape[-1]
    hit = (cum_BN >= target_B[:, None]) & (weight_BN > 0)
    first = jnp.min(jnp.where(hit, iota, n), axis=-1)
    last = jnp.max(jnp.where(weight_BN > 0, iota, -1), axis=-1)
    return jnp.where(first == n, last, first)


def sample_keys(key: jax.Array, sample_ids_B: jax.Array) -> jax.Array:
    """One key per sample, folded from its id, so that a sample's draws do not depend on the
    row or slot it occupies, its neighbours, or the order in which samples are decoded (the
    continuous-batching engine relies on this to give the static sampler's tokens)."""
    return jax.vmap(jax.random.fold_in, (None, 0))(key, sample_ids_B)


def token_uniforms(keys_B: jax.Array, t_B: jax.Array) -> jax.Array:
    """The uniform number that picks token t_B[i] of sample i (`inverse_cdf`): one per sample
    and position. Gumbel-max would need B * V random numbers per step: at 32 x 32000 its
    threefry bits and logs cost ~5 ms of a llama-20m decode step on the CPU, more than the rest
    of the token choice. Inversion needs B."""
    draw = lambda k, t: jax.random.uniform(jax.random.fold_in(k, t), (), jnp.float32)
    return jax.vmap(draw)(keys_B, t_B)


def inverse_cdf(logits_BV: jax.Array, u_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The token whose CDF interval holds u (in [0, 1)) under softmax(logits), per row, and its
    log-prob.

    The CDF is searched in two levels, sums of 128-entry blocks and then within the chosen
    block, because a [B, V] cumsum is slow on the CPU. Entries of zero probability are skipped
    explicitly, so float rounding of the running sums cannot land on one.
    """
    b, v = logits_BV.shape
    blocks = -(-v // _CDF_BLOCK)
    top_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
    e_BV = jnp.exp(logits_BV - top_B1)
    if blocks * _CDF_BLOCK != v:
        e_BV = jnp.pad(e_BV, ((0, 0), (0, blocks * _CDF_BLOCK - v)))
    e_BNC = e_BV.reshape(b, blocks, _CDF_BLOCK)
    block_sum_BN = jnp.sum(e_BNC, axis=-1)
    block_cum_BN = jnp.cumsum(block_sum_BN, axis=-1)
    total_B = block_cum_BN[:, -1]
    # 1 - u lies in (0, 1]: a zero target would match a leading zero-probability entry.
    target_B = (1.0 - u_B) * total_B
    block_B = _first_reaching(block_cum_BN, block_sum_BN, target_B)
    before_B = jnp.where(
        block_B > 0,
        jnp.take_along_axis(block_cum_BN, jnp.maximum(block_B - 1, 0)[:, None], axis=-1)[:, 0],
        0.0,
    )
    inner_BC = jnp.take_along_axis(e_BNC, block_B[:, None, None], axis=1)[:, 0]
    inner_cum_BC = before_B[:, None] + jnp.cumsum(inner_BC, axis=-1)
    token_B = block_B * _CDF_BLOCK + _first_reaching(inner_cum_BC, inner_BC, target_B)
    picked_B = jnp.take_along_axis(logits_BV, token_B[:, None], axis=-1)[:, 0]
    return token_B.astype(jnp.int32), picked_B - top_B1[:, 0] - jnp.log(total_B)


def _token_logprob(logits_BV: jax.Array, token_B: jax.Array) -> jax.Array:
    """log softmax(logits)[token] per row, without forming the [B, V] log-probs."""
    picked = jnp.take_along_axis(logits_BV, token_B[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits_BV, axis=-1)


def _choose(logits_BV: jax.Array, u_B: jax.Array | None, cfg: SamplingConfig):
    """(token [B], sampling log-prob [B], policy log-prob [B]) from the rows' uniform numbers
    (`token_uniforms`; unused, and may be None, when greedy)."""
    logits_BV = logits_BV.astype(jnp.float32)
    # The policy log-prob is over every embedding row, as the trainer's forward pass sees it.
    raw_BV = logits_BV
    masks_vocab = cfg.vocab_size is not None and cfg.vocab_size < logits_BV.shape[-1]
    if masks_vocab:
        logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < cfg.vocab_size, logits_BV, -jnp.inf)
    if cfg.logit_bias:
        ids, bias = zip(*cfg.logit_bias, strict=True)
        logits_BV = logits_BV.at[:, jnp.asarray(ids)].add(jnp.asarray(bias, jnp.float32))
    if cfg.temperature == 0.0:
        token = _argmax_first(logits_BV).astype(jnp.int32)
        return token, jnp.zeros(token.shape, jnp.float32), _token_logprob(raw_BV, token)
    filters = cfg.temperature != 1.0 or cfg.top_k > 0 or cfg.top_p < 1.0 or bool(cfg.logit_bias)
    token, sample_lp = inverse_cdf(filter_logits(logits_BV, cfg) if filters else logits_BV, u_B)
    if not filters and not masks_vocab:
        return token, sample_lp, sample_lp  # the sampling distribution is the policy
    return token, sample_lp, _token_logprob(raw_BV, token)


def choose_tokens(logits_BV, keys_B, t_B, cfg: SamplingConfig):
    """Token t_B[i] of each sample i from its logits and key: (token, sampling log-prob,
    policy log-prob), each [B]."""
    u_B = token_uniforms(keys_B, t_B) if cfg.temperature > 0 else None
    return _choose(logits_BV, u_B, cfg)


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


def compiled(impl: Callable, graphdef, params, mesh: Mesh, out_shardings, **static) -> Callable:
    """`impl(graphdef, params, prompt_ids, prompt_mask, key_data, max_new_tokens, **static)`
    jitted for one mesh with explicit in/out shardings (cached per shape key)."""
    key = (impl, graphdef, jax.tree.structure(params), mesh, tuple(sorted(static.items())))
    if key not in _COMPILED:
        batch = sharding.batch_sharding(mesh, 2)
        repl = NamedSharding(mesh, PartitionSpec())
        _COMPILED[key] = jax.jit(
            functools.partial(impl, graphdef, mesh=mesh, **static),
            in_shardings=(partitioning.state_shardings(params, mesh), batch, batch, repl, repl),
            out_shardings=out_shardings,
        )
    return _COMPILED[key]


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


def sample(
    model: Transformer | tuple,
    prompts: Sequence[Sequence[int]],
    key: jax.Array,
    *,
    group_size: int = 1,
    max_new_tokens: int,
    config: SamplingConfig = SamplingConfig(),
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
