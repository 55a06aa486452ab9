"""The device side of GRPO: completion log-probs and one optimizer update, both jitted.

A training row is its prompt (left-padded, width Tp) followed by its completion (width N). The
hidden state at position Tp - 1 + t predicts completion token t, so only those N positions are
projected onto the vocabulary, in chunks (`losses.token_logprobs_from_hidden`): the [B, T, V]
logits never exist at once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from models.transformer import Transformer
from rl_reason import losses


@struct.dataclass
class Batch:
    """B training rows. Leaves may carry a leading microbatch axis inside `update`."""

    prompt_ids: jax.Array  # [B, Tp] int32, left-padded
    prompt_mask: jax.Array  # [B, Tp] bool
    tokens: jax.Array  # [B, N] int32
    mask: jax.Array  # [B, N] float32: completion tokens that enter the loss
    old_logp: jax.Array  # [B, N] float32
    ref_logp: jax.Array  # [B, N] float32 (zeros when there is no KL term)
    advantages: jax.Array  # [B] float32


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static options of `losses.policy_loss` (hashable: part of the compiled step)."""

    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    ratio_level: str = "token"
    aggregation: str = "token-mean"
    max_len: int | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    chunk_size: int | None = None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    total_steps: int = 1
    schedule: str = "constant"  # or "cosine" (to 10% of the peak)
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.99
    max_grad_norm: float | None = 1.0

    def learning_rate_fn(self) -> optax.Schedule:
        warmup = max(self.warmup_steps, 0)
        if self.schedule == "constant":
            after = optax.constant_schedule(self.learning_rate)
        elif self.schedule == "cosine":
            after = optax.cosine_decay_schedule(
                self.learning_rate, max(self.total_steps - warmup, 1), alpha=0.1
            )
        else:
            raise ValueError(f"unknown lr schedule {self.schedule!r}; valid: constant, cosine")
        if warmup == 0:
            return after
        ramp = optax.linear_schedule(
            self.learning_rate / max(warmup, 1), self.learning_rate, warmup
        )
        return optax.join_schedules([ramp, after], [warmup])


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """AdamW with warmup + constant/cosine schedule and global-norm clipping.

    Weight decay skips vectors (norm scales, biases): decaying them only fights the init.
    """
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
    chain = []
    if cfg.max_grad_norm is not None:
        chain.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    chain.append(
        optax.adamw(
            cfg.learning_rate_fn(),
            b1=cfg.b1,
            b2=cfg.b2,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*chain)


def completion_logprobs(
    model: Transformer,
    prompt_ids,
    prompt_mask,
    tokens,
    mask,
    *,
    chunk_size: int | None = None,
    with_entropy: bool = False,
):
    """log p(tokens | prompt, previous tokens) [B, N] (and the entropy [B, N])."""
    ids = jnp.concatenate([prompt_ids, tokens], axis=1)
    full_mask = jnp.concatenate([prompt_mask.astype(bool), mask.astype(bool)], axis=1)
    hidden = model(ids, mask_BT=full_mask, return_hidden=True)
    tp, n = prompt_ids.shape[1], tokens.shape[1]
    hidden = hidden[:, tp - 1 : tp - 1 + n]
    cfg = model.cfg
    head = (
        {"embed_VD": model.embedding[...].astype(cfg.jnp_dtype)}
        if cfg.tie_embeddings
        else {"unembed_DV": model.lm_head[...].astype(cfg.jnp_dtype)}
    )
    return losses.token_logprobs_from_hidden(
        hidden,
        tokens,
        chunk_size=chunk_size,
        final_logit_softcap=cfg.final_logit_softcap,
        return_entropy=with_entropy,
        **head,
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size"))
def sequence_logprobs(
    graphdef, params, prompt_ids, prompt_mask, tokens, mask, *, chunk_size: int | None = None
) -> jax.Array:
    """Jitted `completion_logprobs` for old-policy and reference log-probs."""
    model = nnx.merge(graphdef, params)
    return completion_logprobs(model, prompt_ids, prompt_mask, tokens, mask, chunk_size=chunk_size)


def _loss_and_metrics(params, graphdef, mb: Batch, normalizer, cfg: LossConfig):
    model = nnx.merge(graphdef, params)
    logp, ent = completion_logprobs(
        model,
        mb.prompt_ids,
        mb.prompt_mask,
        mb.tokens,
        mb.mask,
        chunk_size=cfg.chunk_size,
        with_entropy=True,
    )
    loss, metrics = losses.policy_loss(
        logp,
        mb.old_logp,
        mb.advantages,
        mb.mask,
        clip_eps_low=cfg.clip_eps_low,
        clip_eps_high=cfg.clip_eps_high,
        ratio_level=cfg.ratio_level,
        aggregation=cfg.aggregation,
        max_len=cfg.max_len,
        ref_logp=mb.ref_logp if cfg.kl_coef > 0 else None,
        kl_coef=cfg.kl_coef,
        kl_estimator=cfg.kl_estimator,
        normalizer=normalizer,
    )
    tokens = jnp.maximum(jnp.sum(mb.mask), 1.0)
    metrics = dict(metrics, entropy=jnp.sum(jax.lax.stop_gradient(ent) * mb.mask) / tokens)
    return loss, metrics


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "optimizer", "cfg"),
    donate_argnames=("params", "opt_state"),
)
def update(
    graphdef,
    optimizer: optax.GradientTransformation,
    cfg: LossConfig,
    params,
    opt_state,
    batch: Batch,
):
    """One optimizer update on a minibatch whose leaves are [microbatches, rows, ...].

    Gradients are summed over microbatches with the minibatch's global normaliser, so the update
    equals the one computed on the whole minibatch at once. A non-finite loss or gradient leaves
    params and optimizer state untouched (reported as `finite` = 0).
    """
    flat_mask = batch.mask.reshape(-1, batch.mask.shape[-1])
    normalizer = losses.loss_normalizer(flat_mask, cfg.aggregation, cfg.max_len)
    grad_fn = jax.value_and_grad(_loss_and_metrics, has_aux=True)

    def micro(grad_sum, mb):
        (loss, metrics), grads = grad_fn(params, graphdef, mb, normalizer, cfg)
        return jax.tree.map(jnp.add, grad_sum, grads), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (loss_parts, metric_parts) = jax.lax.scan(micro, zeros, batch)
    loss = jnp.sum(loss_parts)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jnp.where(finite, new, old)
    params = jax.tree.map(keep, new_params, params)
    opt_state = jax.tree.map(keep, new_opt_state, opt_state)
    metrics = losses.merge_metrics(metric_parts)
    metrics.update(loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32))
    return params, opt_state, metrics


def split_microbatches(batch: Batch, microbatches: int) -> Batch:
    """[B, ...] -> [microbatches, B / microbatches, ...]."""
    rows = batch.advantages.shape[0]
    if rows % microbatches:
        raise ValueError(f"{rows} rows do not split into {microbatches} microbatches")
    return jax.tree.map(
        lambda x: x.reshape(microbatches, rows // microbatches, *x.shape[1:]), batch
    )
