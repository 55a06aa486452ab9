"""The device side of GRPO: completion log-probs and one optimizer update, both jitted.

A training row is its prompt (left-padded, width Tp) followed by its completion (width N). The
hidden state at position Tp - 1 + t predicts completion token t, so only those N positions are
projected onto the vocabulary, in chunks (`losses.token_logprobs_from_hidden`): the [B, T, V]
logits never exist at once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models import partitioning
from models.transformer import Transformer
from rl_reason import losses
from rl_reason.core.config import CriticOptions, LossOptions, OptimOptions
from rl_reason.infra import sharding


@struct.dataclass
class Batch:
    """B training rows (split into microbatches inside the jitted update)."""

    prompt_ids: jax.Array  # [B, Tp] int32, left-padded
    prompt_mask: jax.Array  # [B, Tp] bool
    tokens: jax.Array  # [B, N] int32
    mask: jax.Array  # [B, N] float32: completion tokens that enter the loss
    old_logp: jax.Array  # [B, N] float32
    ref_logp: jax.Array  # [B, N] float32 (zeros when there is no KL term)
    advantages: jax.Array  # [B] float32, or [B, N] per token (REINFORCE++, process rewards)
    # [B, N] float32: the sampler's own log-probs, when a mismatch correction compares them
    # with old_logp (the trainer's rescoring); None otherwise.
    sampler_logp: jax.Array | None = None
    # [B, N] float32, with PPO's critic: GAE's returns (the value targets) and the critic's
    # values of the sampled states (the clipped value loss's anchor); None otherwise.
    returns: jax.Array | None = None
    old_values: jax.Array | None = None
    # [B, N] bool: the completion tokens the forward pass attends to, when the loss skips some
    # of them (a multi-turn rollout's observations: unscored, yet context for what follows).
    # None: the tokens of `mask`.
    attend: jax.Array | None = None

    @property
    def context_mask(self) -> jax.Array:
        return self.mask if self.attend is None else self.attend


def learning_rate_fn(opts: OptimOptions, total_steps: int) -> optax.Schedule:
    """Linear warmup over `warmup_steps` updates, then constant or cosine (to 10% of the peak)
    over the rest of `total_steps`."""
    warmup = max(opts.warmup_steps, 0)
    if opts.lr_schedule == "constant":
        after = optax.constant_schedule(opts.learning_rate)
    elif opts.lr_schedule == "cosine":
        after = optax.cosine_decay_schedule(
            opts.learning_rate, max(total_steps - warmup, 1), alpha=0.1
        )
    else:
        raise ValueError(f"unknown lr schedule {opts.lr_schedule!r}; valid: constant, cosine")
    if warmup == 0:
        return after
    ramp = optax.linear_schedule(opts.learning_rate / max(warmup, 1), opts.learning_rate, warmup)
    return optax.join_schedules([ramp, after], [warmup])


def make_optimizer(opts: OptimOptions, total_steps: int = 1) -> optax.GradientTransformation:
    """AdamW with warmup + constant/cosine schedule and global-norm clipping.

    Weight decay skips vectors (norm scales, biases): decaying them only fights the init.
    """
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
    chain = []
    if opts.max_grad_norm is not None:
        chain.append(optax.clip_by_global_norm(opts.max_grad_norm))
    chain.append(
        optax.adamw(
            learning_rate_fn(opts, total_steps),
            b1=opts.adam_b1,
            b2=opts.adam_b2,
            weight_decay=opts.weight_decay,
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


def _loss_and_metrics(params, frozen, graphdef, mb: Batch, normalizer, cfg: LossOptions, max_len):
    model = nnx.merge(graphdef, params, *frozen)
    logp, ent = completion_logprobs(
        model,
        mb.prompt_ids,
        mb.prompt_mask,
        mb.tokens,
        mb.context_mask,
        chunk_size=cfg.logprob_chunk_size,
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
        max_len=max_len,
        ref_logp=mb.ref_logp if cfg.kl_coef > 0 else None,
        kl_coef=cfg.kl_coef,
        kl_estimator=cfg.kl_estimator,
        normalizer=normalizer,
        objective=cfg.objective,
        dual_clip_c=cfg.dual_clip_c,
        cispo_eps_low=cfg.cispo_eps_low,
        cispo_eps_high=cfg.cispo_eps_high,
        sampler_logp=mb.sampler_logp,
        correction=cfg.correction,
        correction_cap=cfg.correction_cap,
    )
    tokens = jnp.maximum(jnp.sum(mb.mask), 1.0)
    metrics = dict(metrics, entropy=jnp.sum(jax.lax.stop_gradient(ent) * mb.mask) / tokens)
    return loss, metrics


def split_microbatches(batch: Batch, microbatches: int, mesh: Mesh) -> Batch:
    """[B, ...] -> [microbatches, B / microbatches, ...], row i going to microbatch i % M.

    Strided rather than contiguous: each device holds a contiguous block of rows, so every
    microbatch then has rows on every device and none sits idle (any split gives the same
    accumulated gradient).
    """
    rows = batch.advantages.shape[0]

    def split(x):
        x = x.reshape(rows // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
        spec = PartitionSpec(None, partitioning.BATCH_AXES, *[None] * (x.ndim - 2))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return jax.tree.map(split, batch)


def _update_impl(
    graphdef,
    optimizer: optax.GradientTransformation,
    cfg: LossOptions,
    max_len: int | None,
    microbatches: int,
    mesh: Mesh,
    params,
    opt_state,
    batch: Batch,
    frozen: tuple = (),
    apply: bool = True,
):
    """One optimizer update on a [B, ...] minibatch, accumulated over `microbatches`.

    With `apply` False (static) the loss, gradient and metrics are computed and params and
    optimizer state left as they are (a policy that waits for its critic).

    Only `params` are trained; `frozen` states (e.g. a LoRA policy's base weights) complete the
    model and receive no gradient.

    Gradients are summed over microbatches with the minibatch's global normaliser, so the update
    equals the one computed on the whole minibatch at once. A non-finite loss or gradient leaves
    params and optimizer state untouched (reported as `finite` = 0).
    """
    normalizer = losses.loss_normalizer(batch.mask, cfg.aggregation, max_len)
    grad_fn = jax.value_and_grad(_loss_and_metrics, has_aux=True)

    def micro(grad_sum, mb):
        (loss, metrics), grads = grad_fn(params, frozen, graphdef, mb, normalizer, cfg, max_len)
        return jax.tree.map(jnp.add, grad_sum, grads), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, params)
    stacked = split_microbatches(batch, microbatches, mesh)
    grads, (loss_parts, metric_parts) = jax.lax.scan(micro, zeros, stacked)
    loss = jnp.sum(loss_parts)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    take = finite & apply
    keep = lambda new, old: jnp.where(take, new, old)
    params = jax.tree.map(keep, new_params, params)
    opt_state = jax.tree.map(keep, new_opt_state, opt_state)
    metrics = losses.merge_metrics(metric_parts)
    metrics.update(loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32))
    return params, opt_state, metrics


def _logprobs_impl(
    graphdef, chunk_size, params, prompt_ids_PT, prompt_mask_PT, tokens, mask, frozen=()
):
    """Completion log-probs [B, N] of B = P * G rows whose prompts are given once each [P, Tp]."""
    g = tokens.shape[0] // prompt_ids_PT.shape[0]
    model = nnx.merge(graphdef, params, *frozen)
    return completion_logprobs(
        model,
        jnp.repeat(prompt_ids_PT, g, axis=0),
        jnp.repeat(prompt_mask_PT, g, axis=0),
        tokens,
        mask,
        chunk_size=chunk_size,
    )


def _batch_impl(
    cfg: LossOptions,
    critic: CriticOptions | None,
    attend: bool,
    rollouts,
    rows_B,
    advantages_B,
    values,
) -> Batch:
    """Training rows from sampling rounds (`RolloutArrays` each); rows_B picks rows of their
    concatenation (None: all, in order).

    With a token-level estimator (REINFORCE++) the [B] outcome returns become [B, N] per-token
    advantages here, normalised over the whole batch: it holds every row of the step (all
    processes' rows, as one global array), so no minibatch, microbatch or process sees
    another normalisation. With PPO's critic ("gae") the [B] rewards and the critic's `values`
    (one [rows, N] array per round) give GAE's advantages (whitened over the batch likewise)
    and returns.

    `attend`: the loss skips completion tokens the forward pass must see (multi-turn
    observations): the batch carries the completion mask as `attend` too.
    """
    parts = []
    for r in rollouts:
        g = r.tokens.shape[0] // r.prompt_ids.shape[0]
        mask = r.loss_mask.astype(jnp.float32)
        if cfg.mask_truncated:
            mask = mask * (~r.truncated)[:, None]
        ref = jnp.zeros(r.tokens.shape, jnp.float32) if r.ref_logprobs is None else r.ref_logprobs
        parts.append(
            (
                jnp.repeat(r.prompt_ids, g, axis=0),
                jnp.repeat(r.prompt_mask, g, axis=0),
                r.tokens,
                mask,
                r.ratio_logprobs,
                ref,
                r.policy_logprobs,
                *((r.mask,) if attend else ()),
            )
        )
    fields = [jnp.concatenate(column, axis=0) for column in zip(*parts, strict=True)]
    if values is not None:
        fields.append(jnp.concatenate(values, axis=0))
    if rows_B is not None:
        fields = [x[rows_B] for x in fields]
    if values is not None:
        *fields, old_values = fields
    seen = None
    if attend:
        *fields, seen = fields
    *fields, sampler = fields
    advantages = advantages_B.astype(jnp.float32)
    sampler = sampler if cfg.correction != "none" else None
    if not losses.is_token_level(cfg.advantage_estimator):
        return Batch(*fields, advantages=advantages, sampler_logp=sampler, attend=seen)
    mask, old, ref = fields[3], fields[4], fields[5]
    kl = losses.kl_penalty(old, ref, cfg.reward_kl_estimator) if cfg.reward_kl_coef > 0 else None
    if critic is not None:
        adv, returns = losses.gae(
            advantages, old_values, mask, critic.gamma, critic.lam, kl, cfg.reward_kl_coef
        )
        if critic.whiten_advantages:
            adv = losses.whiten(adv, mask)
        return Batch(
            *fields,
            advantages=adv,
            sampler_logp=sampler,
            returns=returns,
            old_values=old_values,
            attend=seen,
        )
    advantages = losses.token_advantages(advantages, mask, kl, cfg.reward_kl_coef)
    return Batch(*fields, advantages=advantages, sampler_logp=sampler, attend=seen)


@jax.jit
def logprob_gap(a_BN, b_BN, mask_BN) -> jax.Array:
    """Mean |a - b| over the masked tokens: two scorings of the same completions."""
    m = mask_BN.astype(jnp.float32)
    return jnp.sum(jnp.abs(a_BN - b_BN) * m) / jnp.maximum(jnp.sum(m), 1.0)


class StepFns:
    """The device side of one training setup, jitted with explicit shardings over `mesh`.

    Params and optimizer state are sharded as the rules in models/partitioning.py say, batches
    over data x fsdp; `update` donates the params and optimizer state it replaces.

      init_opt_state(params) -> opt_state
      update(params, opt_state, batch [B, ...]) -> (params, opt_state, metrics)
      logprobs(params, prompt_ids_PT, prompt_mask_PT, tokens, mask) -> [B, N] (old / reference)

    `frozen` (a tuple of nnx.States, e.g. a LoRA policy's base weights) completes the model in
    every call: `nnx.merge(graphdef, params, *frozen)`; only `params` are trained.
      make_batch(rollouts, rows_B, advantages_B) -> Batch (see `_batch_impl`)
      take_rows(batch, idx) -> Batch of those rows (minibatches)
    """

    def __init__(
        self,
        graphdef,
        params,
        optimizer: optax.GradientTransformation,
        loss: LossOptions,
        mesh: Mesh,
        *,
        max_len: int | None = None,
        microbatches: int = 1,
        frozen: tuple = (),
        critic: CriticOptions | None = None,
    ):
        if microbatches < 1:
            raise ValueError(f"microbatches must be >= 1, got {microbatches}")
        self.mesh = mesh
        self.microbatches = microbatches
        self.param_shardings = partitioning.state_shardings(params, mesh)
        self.frozen = tuple(frozen)
        frozen_sh = partitioning.state_shardings(self.frozen, mesh)
        self.opt_shardings = sharding.opt_state_shardings(optimizer, params, self.param_shardings)
        repl = NamedSharding(mesh, PartitionSpec())
        rows = lambda rank: NamedSharding(
            mesh, PartitionSpec(partitioning.BATCH_AXES, *[None] * (rank - 1))
        )
        self._rows, self._repl, self._loss = rows, repl, loss
        # The batch the loop makes: advantages per token for a token-level estimator, and the
        # sampler's log-probs when a correction needs them.
        token_level = losses.is_token_level(loss.advantage_estimator) or loss.process_weight > 0
        if losses.needs_critic(loss.advantage_estimator) != (critic is not None):
            raise ValueError(
                f"advantage estimator {loss.advantage_estimator!r} "
                + ("needs" if critic is None else "takes no")
                + " critic options"
            )
        self._critic = critic
        self._batch = Batch(
            *([rows(2)] * 6),
            advantages=rows(2 if token_level else 1),
            sampler_logp=rows(2) if loss.correction != "none" else None,
            returns=rows(2) if critic is not None else None,
            old_values=rows(2) if critic is not None else None,
        )
        self._batch_fns: dict[tuple, Callable] = {}
        # Jitted per batch layout (which fields, per-sequence or per-token advantages).
        self._take_fns: dict[tuple, Callable] = {}
        self._update_fns: dict[tuple, Callable] = {}
        self._init = jax.jit(optimizer.init, out_shardings=self.opt_shardings)
        self._update_args = (graphdef, optimizer, loss, max_len, microbatches, mesh)
        self._frozen_sh = frozen_sh
        self._logprobs = jax.jit(
            functools.partial(_logprobs_impl, graphdef, loss.logprob_chunk_size),
            in_shardings=(self.param_shardings, rows(2), rows(2), rows(2), rows(2), frozen_sh),
            out_shardings=rows(2),
        )

    def init_opt_state(self, params):
        return self._init(params)

    def _layout(self, batch: Batch) -> tuple[tuple, Batch]:
        leaves, tree = jax.tree.flatten(batch)
        shardings = jax.tree.unflatten(tree, [self._rows(x.ndim) for x in leaves])
        return (tree, tuple(x.ndim for x in leaves)), shardings

    def update(self, params, opt_state, batch: Batch, *, apply: bool = True):
        """One update of `params` on `batch`; with ``apply=False`` only its metrics."""
        rows = batch.advantages.shape[0]
        if rows % self.microbatches:
            raise ValueError(f"{rows} rows do not split into {self.microbatches} microbatches")
        if self._loss.correction != "none" and batch.sampler_logp is None:
            raise ValueError(
                f"loss.correction={self._loss.correction!r} needs the batch's sampler_logp (the "
                "sampler's log-probs; make_batch fills it in)"
            )
        key, batch_sh = self._layout(batch)
        key = (key, apply)
        if key not in self._update_fns:
            self._update_fns[key] = jax.jit(
                functools.partial(_update_impl, *self._update_args, apply=apply),
                in_shardings=(self.param_shardings, self.opt_shardings, batch_sh, self._frozen_sh),
                out_shardings=(self.param_shardings, self.opt_shardings, self._repl),
                donate_argnums=(0, 1),
            )
        return self._update_fns[key](params, opt_state, batch, self.frozen)

    def logprobs(self, params, prompt_ids_PT, prompt_mask_PT, tokens, mask) -> jax.Array:
        return self._logprobs(params, prompt_ids_PT, prompt_mask_PT, tokens, mask, self.frozen)

    def make_batch(self, rollouts, rows_B, advantages_B, values=None) -> Batch:
        """Batch from rounds (`RolloutArrays` each, see `_batch_impl`); `rows_B` numpy or None;
        `values` the critic's [rows, N] values of each round (PPO's critic only)."""
        rollouts = tuple(rollouts)
        if (values is None) != (self._critic is None):
            raise ValueError("make_batch takes the critic's values exactly when a critic runs")
        values = None if values is None else tuple(values)
        present = lambda r: tuple(getattr(r, f.name) is not None for f in dataclasses.fields(r))
        # A loss mask that is not the completion mask itself skips tokens the forward pass
        # still reads (record.RolloutArrays).
        attend = any(r.loss_mask is not r.mask for r in rollouts)
        key = (tuple(present(r) for r in rollouts), rows_B is None, attend)
        if key not in self._batch_fns:
            shard = lambda x: None if x is None else self._rows(x.ndim)
            out = self._batch.replace(attend=self._rows(2)) if attend else self._batch
            self._batch_fns[key] = jax.jit(
                functools.partial(_batch_impl, self._loss, self._critic, attend),
                in_shardings=(
                    tuple(jax.tree.map(shard, r) for r in rollouts),
                    None if rows_B is None else self._repl,
                    self._repl,
                    None if values is None else tuple(self._rows(2) for _ in values),
                ),
                out_shardings=out,
            )
        return self._batch_fns[key](rollouts, rows_B, advantages_B, values)

    def take_rows(self, batch: Batch, idx) -> Batch:
        key, batch_sh = self._layout(batch)
        if key not in self._take_fns:
            self._take_fns[key] = jax.jit(
                lambda b, idx: jax.tree.map(lambda x: x[idx], b),
                in_shardings=(batch_sh, self._repl),
                out_shardings=batch_sh,
            )
        return self._take_fns[key](batch, idx)
