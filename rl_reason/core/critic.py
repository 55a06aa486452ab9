"""PPO's critic: a value model V(s_t) on a transformer trunk, its clipped value loss, and its
jitted update [PPO, GAE].

The critic is its own model: a trunk (the policy's weights copied, or another checkpoint's)
whose final hidden state at each completion position goes through a linear value head. The
head starts at zero, so the first values are 0 and the first GAE advantages are the returns.
Its parameters are ``{"trunk": nnx.State, "head": {"w": [D], "b": []}}``: the trunk sharded by
the same logical rules as the policy, the head replicated.

Positions: the value of completion token t is read where the policy's logits for token t are,
at the hidden state of position Tp - 1 + t, i.e. the state *before* token t is written.

    fns = CriticFns(trunk_graphdef, critic_params, opts, mesh, microbatches=M, total_updates=U)
    values = fns.values(critic_params, prompt_ids_PT, prompt_mask_PT, tokens, mask)   # [B, N]
    critic_params, opt_state, metrics = fns.update(critic_params, opt_state, batch)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models import partitioning
from rl_reason.core.checks import safe_div
from rl_reason.core.config import CriticOptions, OptimOptions
from rl_reason.core.update import make_optimizer as adamw
from rl_reason.core.update import split_microbatches
from rl_reason.infra import sharding


def init_params(graphdef, policy_params, opts: CriticOptions, mesh: Mesh):
    """(trunk graphdef, critic params): the trunk copied from the policy (``opts.init ==
    "policy"``) or read from a model directory (``opts.init`` its path), and a zero head."""
    if opts.init == "policy":
        trunk = jax.tree.map(jnp.copy, policy_params)
    else:
        from models import from_pretrained  # a checkpoint directory, read once at start

        graphdef, trunk = nnx.split(from_pretrained(opts.init, mesh=mesh))
    width = nnx.merge(graphdef, trunk).cfg.embed_dim
    head = {"w": jnp.zeros((width,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
    return graphdef, {"trunk": trunk, "head": head}


def param_shardings(params, mesh: Mesh):
    repl = NamedSharding(mesh, PartitionSpec())
    return {
        "trunk": partitioning.state_shardings(params["trunk"], mesh),
        "head": jax.tree.map(lambda _: repl, params["head"]),
    }


def values_of(graphdef, params, prompt_ids, prompt_mask, tokens, mask) -> jax.Array:
    """V(s_t) [B, N] float32 for completion tokens `tokens` [B, N] after prompts [B, Tp]."""
    trunk = nnx.merge(graphdef, params["trunk"])
    ids = jnp.concatenate([prompt_ids, tokens], axis=1)
    full_mask = jnp.concatenate([prompt_mask.astype(bool), mask.astype(bool)], axis=1)
    hidden = trunk(ids, mask_BT=full_mask, return_hidden=True)
    tp, n = prompt_ids.shape[1], tokens.shape[1]
    hidden = hidden[:, tp - 1 : tp - 1 + n].astype(jnp.float32)
    head = params["head"]
    return jnp.einsum("btd,d->bt", hidden, head["w"]) + head["b"]


def value_loss(values, old_values, returns, mask, *, clip: float, normalizer):
    """PPO's clipped value loss, summed over tokens and divided by `normalizer` [PPO]:

        L = Σ_t m_t · ½ max((V_t − R_t)², (V_old,t + clip(V_t − V_old,t, −ε, ε) − R_t)²) / Z

    ε = `clip` (0: unclipped, ½ (V − R)² alone); Z the minibatch's mask tokens, given whole so
    that microbatches sum to the minibatch's loss exactly. Returns (loss, sums) with sums of the
    metrics' numerators over this call's tokens.
    """
    m = mask.astype(jnp.float32)
    sq = (values - returns) ** 2
    if clip > 0:
        clipped = old_values + jnp.clip(values - old_values, -clip, clip)
        sq_clipped = (clipped - returns) ** 2
        per_token = 0.5 * jnp.maximum(sq, sq_clipped)
        was_clipped = (sq_clipped > sq).astype(jnp.float32)
    else:
        per_token = 0.5 * sq
        was_clipped = jnp.zeros_like(sq)
    loss = safe_div(jnp.sum(m * per_token), normalizer)
    sg = jax.lax.stop_gradient
    sums = {
        "value_clip_frac": jnp.sum(m * was_clipped),
        "value_mean": jnp.sum(m * sg(values)),
        "value_abs_error": jnp.sum(m * jnp.abs(sg(values) - returns)),
        "tokens": jnp.sum(m),
    }
    return loss, sums


def explained_variance(returns, values, mask) -> jax.Array:
    """1 − Var(R − V) / Var(R) over the mask tokens: 1 is a perfect critic, 0 a constant one."""
    m = mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(m), 1.0)

    def var(x):
        mean = jnp.sum(m * x) / count
        return jnp.sum(m * (x - mean) ** 2) / count

    return jnp.where(var(returns) > 0, 1 - safe_div(var(returns - values), var(returns)), 0.0)


def _loss(params, graphdef, mb, clip, normalizer):
    v = values_of(graphdef, params, mb.prompt_ids, mb.prompt_mask, mb.tokens, mb.context_mask)
    return value_loss(v, mb.old_values, mb.returns, mb.mask, clip=clip, normalizer=normalizer)


def _update_impl(graphdef, optimizer, clip, microbatches, mesh, params, opt_state, batch):
    """One critic update on a minibatch, accumulated exactly over `microbatches` (the split of
    the policy's update); a non-finite loss or gradient keeps the old params (value_finite 0)."""
    normalizer = jnp.maximum(jnp.sum(batch.mask), 1.0)
    grad_fn = jax.value_and_grad(_loss, has_aux=True)

    def micro(grad_sum, mb):
        (loss, sums), grads = grad_fn(params, graphdef, mb, clip, normalizer)
        return jax.tree.map(jnp.add, grad_sum, grads), (loss, sums)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (losses, sums) = jax.lax.scan(
        micro, zeros, split_microbatches(batch, microbatches, mesh)
    )
    loss = jnp.sum(losses)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jnp.where(finite, new, old)
    params = jax.tree.map(keep, new_params, params)
    opt_state = jax.tree.map(keep, new_opt_state, opt_state)
    sums = jax.tree.map(jnp.sum, sums)
    tokens = jnp.maximum(sums.pop("tokens"), 1.0)
    metrics = {k: v / tokens for k, v in sums.items()}
    metrics.update(
        value_loss=loss, value_grad_norm=grad_norm, value_finite=finite.astype(jnp.float32)
    )
    return params, opt_state, metrics


def make_optimizer(opts: CriticOptions, total_updates: int) -> optax.GradientTransformation:
    """The critic's AdamW: its own learning rate and warmup, the policy's schedule otherwise."""
    o = OptimOptions(
        learning_rate=opts.learning_rate,
        warmup_steps=opts.warmup_steps,
        weight_decay=opts.weight_decay,
        max_grad_norm=opts.max_grad_norm,
    )
    return adamw(o, total_updates)


class CriticFns:
    """The critic's jitted functions over `mesh`; `update` donates the params and optimizer
    state it replaces.

      init_opt_state(params) -> opt_state
      values(params, prompt_ids_PT, prompt_mask_PT, tokens, mask) -> [B, N] (B = P * G rows)
      update(params, opt_state, batch) -> (params, opt_state, metrics); `batch` is the
        policy's `core.update.Batch` with its `returns` and `old_values`
    """

    def __init__(
        self,
        graphdef,
        params,
        opts: CriticOptions,
        mesh: Mesh,
        *,
        microbatches: int = 1,
        total_updates: int = 1,
        optimizer: optax.GradientTransformation | None = None,
    ):
        self.graphdef, self.opts, self.mesh = graphdef, opts, mesh
        # `optimizer` replaces the critic's AdamW (`make_optimizer`), e.g. plain SGD in tests.
        self.optimizer = make_optimizer(opts, total_updates) if optimizer is None else optimizer
        self.param_shardings = param_shardings(params, mesh)
        self.opt_shardings = sharding.opt_state_shardings(
            self.optimizer, params, self.param_shardings
        )
        rows = lambda rank: NamedSharding(
            mesh, PartitionSpec(partitioning.BATCH_AXES, *[None] * (rank - 1))
        )
        self._rows, self._repl = rows, NamedSharding(mesh, PartitionSpec())
        self._init = jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)
        self._values = jax.jit(
            functools.partial(_values_for_prompts, graphdef),
            in_shardings=(self.param_shardings, rows(2), rows(2), rows(2), rows(2)),
            out_shardings=rows(2),
        )
        self._update_args = (graphdef, self.optimizer, opts.value_clip, microbatches, mesh)
        self._update_fns: dict = {}

    def place(self, params):
        return jax.device_put(params, self.param_shardings)

    def init_opt_state(self, params):
        return self._init(params)

    def values(self, params, prompt_ids_PT, prompt_mask_PT, tokens, mask) -> jax.Array:
        return self._values(params, prompt_ids_PT, prompt_mask_PT, tokens, mask)

    def update(self, params, opt_state, batch):
        if batch.returns is None or batch.old_values is None:
            raise ValueError("the critic's update needs the batch's returns and old_values")
        leaves, tree = jax.tree.flatten(batch)
        key = (tree, tuple(x.ndim for x in leaves))
        if key not in self._update_fns:
            batch_sh = jax.tree.unflatten(tree, [self._rows(x.ndim) for x in leaves])
            self._update_fns[key] = jax.jit(
                functools.partial(_update_impl, *self._update_args),
                in_shardings=(self.param_shardings, self.opt_shardings, batch_sh),
                out_shardings=(self.param_shardings, self.opt_shardings, self._repl),
                donate_argnums=(0, 1),
            )
        return self._update_fns[key](params, opt_state, batch)


def _values_for_prompts(graphdef, params, prompt_ids_PT, prompt_mask_PT, tokens, mask):
    g = tokens.shape[0] // prompt_ids_PT.shape[0]
    return values_of(
        graphdef,
        params,
        jnp.repeat(prompt_ids_PT, g, axis=0),
        jnp.repeat(prompt_mask_PT, g, axis=0),
        tokens,
        mask,
    )


@jax.jit
def batch_explained_variance(returns, values, mask):
    return explained_variance(returns, values, mask)
