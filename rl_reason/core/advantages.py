"""Registered advantage estimators: outcome rewards of a group → one advantage per sample.

An estimator is fn(rewards_PG, valid_PG as 0/1, n_valid_P1, eps) -> advantages_PG, on the P
prompts' groups of G samples; `compute_advantages` handles the batch layout, invalid rewards and
all-equal groups around it. Papers: see `rl_reason.losses`.

Two attributes of an estimator function change what is done around it: ``group_relative =
False`` keeps the advantages of groups whose rewards are all equal (an estimator without a
group baseline), and ``token_level = True`` marks its [N] output as the outcome return at each
sequence's last token, which the batch then turns into per-token advantages over the whole
global batch (`token_advantages`, REINFORCE++).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rl_reason.core.checks import Array, ArrayLike, float_dtype, positive_int, safe_div
from rl_reason.core.registry import Registry

ADVANTAGE_ESTIMATORS = Registry("advantage estimator")
"""Advantage estimators by name: fn(rewards_PG, valid_PG as 0/1, n_valid_P1, eps) -> adv_PG."""

register_advantage_estimator = ADVANTAGE_ESTIMATORS.register


@register_advantage_estimator("grpo")
def _grpo_advantage(r_PG: Array, w_PG: Array, n_P1: Array, eps: float) -> Array:
    mean = safe_div(jnp.sum(w_PG * r_PG, -1, keepdims=True), n_P1)
    dev = r_PG - mean
    var = safe_div(jnp.sum(w_PG * dev**2, -1, keepdims=True), n_P1)  # population, ddof=0
    # sqrt has an infinite derivative at 0; keep it away so gradients w.r.t. rewards stay finite.
    std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1)), 0)
    return dev / (std + eps)


@register_advantage_estimator("dr_grpo")
def _dr_grpo_advantage(r_PG: Array, w_PG: Array, n_P1: Array, eps: float) -> Array:
    del eps
    return r_PG - safe_div(jnp.sum(w_PG * r_PG, -1, keepdims=True), n_P1)


@register_advantage_estimator("rloo")
def _rloo_advantage(r_PG: Array, w_PG: Array, n_P1: Array, eps: float) -> Array:
    del eps
    others_sum = jnp.sum(w_PG * r_PG, -1, keepdims=True) - r_PG
    # A reward with no valid peer has no baseline; the caller zeroes it (n == 1 ⇒ all equal).
    return r_PG - safe_div(others_sum, n_P1 - 1)


@register_advantage_estimator("reinforce_pp")
def _reinforce_pp(r_PG: Array, w_PG: Array, n_P1: Array, eps: float) -> Array:
    del w_PG, n_P1, eps
    return r_PG  # no baseline: the batch normalisation of `token_advantages` is the baseline


_reinforce_pp.group_relative = False
_reinforce_pp.token_level = True


@register_advantage_estimator("reinforce_pp_baseline")
def _reinforce_pp_baseline(r_PG: Array, w_PG: Array, n_P1: Array, eps: float) -> Array:
    return _dr_grpo_advantage(r_PG, w_PG, n_P1, eps)


_reinforce_pp_baseline.token_level = True


@register_advantage_estimator("gae")
def _gae_returns(r_PG: Array, w_PG: Array, n_P1: Array, eps: float) -> Array:
    del w_PG, n_P1, eps
    return r_PG  # the outcome reward; `gae` with the critic's values makes the advantages


_gae_returns.group_relative = False
_gae_returns.token_level = True
_gae_returns.needs_critic = True


def is_token_level(estimator: str) -> bool:
    """Whether `estimator`'s advantages become per-token ones by `token_advantages`."""
    ADVANTAGE_ESTIMATORS.check(estimator)
    return bool(getattr(ADVANTAGE_ESTIMATORS[estimator], "token_level", False))


def needs_critic(estimator: str) -> bool:
    """Whether `estimator`'s advantages need a learned value function (PPO's critic, "gae")."""
    ADVANTAGE_ESTIMATORS.check(estimator)
    return bool(getattr(ADVANTAGE_ESTIMATORS[estimator], "needs_critic", False))


def whiten(x_NT: ArrayLike, mask_NT: ArrayLike, eps: float = 1e-6) -> Array:
    """(x − mean) / (std + eps) over the mask tokens (population std), 0 elsewhere."""
    m = jnp.asarray(mask_NT).astype(jnp.float32)
    on = m != 0
    g = jnp.asarray(x_NT).astype(jnp.float32)
    total = jnp.sum(m)
    mean = safe_div(jnp.sum(m * g), total)
    var = safe_div(jnp.sum(m * (g - mean) ** 2), total)
    std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1)), 0)
    return jnp.where(on, (g - mean) / (std + eps), 0)


def token_advantages(
    returns_N: ArrayLike,
    mask_NT: ArrayLike,
    kl_NT: ArrayLike | None = None,
    kl_coef: float = 0.0,
    eps: float = 1e-6,
) -> Array:
    """REINFORCE++ per-token advantages, normalised over every token of the batch [REINFORCE++].

    The per-token reward is the outcome return R_i (``returns_N``: the raw reward for
    "reinforce_pp", the reward minus its group mean for "reinforce_pp_baseline") at the last
    token minus β·KL_it at every token (KL of the sampling policy to the reference, ``kl_NT``),
    so the return from token t, with γ = 1, is

        G_it = R_i − β Σ_{s ≥ t} m_is KL_is,

    and the advantage is its z-score over all mask tokens of the batch:
    A_it = (G_it − mean) / (std + eps), population std. Computed once on the whole global batch
    (`core.update` does it when the batch is made, before minibatches and microbatches are cut
    and over every process's rows), the normalisation is exactly that of one big batch.

    Returns:
      [N, T] float32, 0 at masked positions.
    """
    m = jnp.asarray(mask_NT).astype(jnp.float32)
    on = m != 0
    ret = jnp.asarray(returns_N).astype(jnp.float32)
    if m.ndim != 2 or ret.shape != m.shape[:1]:
        raise ValueError(f"returns must be [N] and mask [N, T], got {ret.shape}, {m.shape}")
    g = jnp.broadcast_to(ret[:, None], m.shape)
    if kl_NT is not None:
        kl = jnp.where(on, jnp.asarray(kl_NT).astype(jnp.float32), 0)
        if kl.shape != m.shape:
            raise ValueError(f"kl shape {kl.shape} != mask shape {m.shape}")
        g = g - kl_coef * jnp.flip(jnp.cumsum(jnp.flip(kl, -1), -1), -1)
    return whiten(g, m, eps)


def gae(
    rewards_N: ArrayLike,
    values_NT: ArrayLike,
    mask_NT: ArrayLike,
    gamma: float = 1.0,
    lam: float = 1.0,
    kl_NT: ArrayLike | None = None,
    kl_coef: float = 0.0,
) -> tuple[Array, Array]:
    """GAE(γ, λ) per token for an outcome reward at each sequence's last token [GAE].

    With the mask tokens of a row taken in order (masked positions, e.g. a tool's output, are
    skipped: the next value of the token before them is the one after them), reward r_t = R_i
    on the last mask token and 0 elsewhere, minus β·KL_t at every token when ``kl_NT`` (the
    sampling policy's KL to the reference) and ``kl_coef`` β are given, and V = 0 after the
    last token:

        δ_t = r_t + γ·V_{t+1} − V_t,    A_t = Σ_{l ≥ 0} (γλ)^l δ_{t+l},    returns_t = A_t + V_t.

    λ = 1, γ = 1 gives A_t = R − V_t (Monte Carlo); λ = 0 the one-step TD error. Pure: no
    critic here (the values are given), differentiable in the values.

    Returns:
      (advantages [N, T], returns [N, T]) float32, 0 at masked positions.
    """
    v = jnp.asarray(values_NT).astype(jnp.float32)
    m = jnp.asarray(mask_NT).astype(jnp.float32)
    r = jnp.asarray(rewards_N).astype(jnp.float32)
    if m.ndim != 2 or v.shape != m.shape or r.shape != m.shape[:1]:
        raise ValueError(
            f"need rewards [N], values and mask [N, T]; got {r.shape}, {v.shape}, {m.shape}"
        )
    on = m != 0
    v = jnp.where(on, v, 0)
    t = m.shape[1]
    last_N = t - 1 - jnp.argmax(jnp.flip(on, -1), -1)  # the last mask token of each row
    reward_NT = jnp.where(jnp.arange(t)[None] == last_N[:, None], r[:, None], 0) * m
    if kl_NT is not None:
        kl = jnp.asarray(kl_NT).astype(jnp.float32)
        if kl.shape != m.shape:
            raise ValueError(f"kl shape {kl.shape} != mask shape {m.shape}")
        reward_NT = reward_NT - kl_coef * jnp.where(on, kl, 0)

    def back(carry, x):
        next_v, next_a = carry
        r_t, v_t, m_t = x
        a_t = r_t + gamma * next_v - v_t + gamma * lam * next_a
        keep = m_t != 0
        return (jnp.where(keep, v_t, next_v), jnp.where(keep, a_t, next_a)), a_t * m_t

    zeros = jnp.zeros(m.shape[:1], jnp.float32)
    _, adv_TN = jax.lax.scan(back, (zeros, zeros), (reward_NT.T, v.T, m.T), reverse=True)
    adv = adv_TN.T
    return adv, (adv + v) * m


def compute_advantages(
    rewards: ArrayLike,
    group_size: int,
    estimator: str = "grpo",
    eps: float = 1e-6,
    valid: ArrayLike | None = None,
) -> Array:
    """Outcome advantages relative to each prompt's group of G samples.

    ``rewards`` is [N] with N = P·G and the G samples of a prompt contiguous. With mean_g and
    std_g the mean and population standard deviation (ddof=0) of the group's valid rewards:

    - ``"grpo"`` [GRPO, outcome supervision]: A_i = (r_i − mean_g) / (std_g + eps).
    - ``"dr_grpo"`` [DrGRPO]: A_i = r_i − mean_g. Dropping the std removes the question-difficulty
      bias (groups with nearly equal rewards are no longer up-weighted).
    - ``"rloo"`` [RLOO]: A_i = r_i − (1/(G−1)) Σ_{j≠i} r_j, the leave-one-out baseline, which is
      independent of r_i and hence unbiased; equals G/(G−1)·(r_i − mean_g).
    - ``"reinforce_pp"`` [REINFORCE++]: A_i = r_i, no baseline; and
      ``"reinforce_pp_baseline"``: A_i = r_i − mean_g. Both are the outcome return that
      `token_advantages` turns into per-token advantages over the whole batch (with the KL
      folded in); the trainer does that when it makes the batch.

    ``valid`` [N] (bool) marks rewards that exist (e.g. the verifier did not time out). Invalid
    rewards are left out of their group's statistics (G becomes the group's valid count) and get
    advantage 0. A group whose valid rewards are all equal (including a single valid reward, or
    none) gets exactly 0: r − mean alone can leave a rounding residue (the float32 mean of three
    0.1s is off by 7e-9), which grpo's division by std + eps would turn into a spurious signal.

    Returns:
      advantages [N], float (at least float32).
    """
    ADVANTAGE_ESTIMATORS.check(estimator)
    r = jnp.asarray(rewards)
    if r.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {r.shape}")
    group_size = positive_int("group_size", group_size)
    n = r.shape[0]
    if n % group_size:
        raise ValueError(
            f"rewards length {n} is not divisible by group_size {group_size}; the batch must "
            "hold whole groups of G samples per prompt, contiguous"
        )
    r = r.astype(float_dtype(r))
    if valid is None:
        ok = jnp.ones(r.shape, bool)
    else:
        ok = jnp.asarray(valid)
        if ok.shape != r.shape:
            raise ValueError(f"valid must have the shape of rewards {r.shape}, got {ok.shape}")
        ok = ok.astype(bool)

    r_PG = r.reshape(-1, group_size)
    ok_PG = ok.reshape(-1, group_size)
    # Invalid entries may hold NaN or garbage; replace them before any arithmetic.
    r_PG = jnp.where(ok_PG, r_PG, 0)
    w_PG = ok_PG.astype(r.dtype)
    n_P1 = jnp.sum(w_PG, -1, keepdims=True)
    fn = ADVANTAGE_ESTIMATORS[estimator]
    adv_PG = fn(r_PG, w_PG, n_P1, eps)
    if not getattr(fn, "group_relative", True):
        return jnp.where(ok_PG, adv_PG, 0).reshape(n)

    hi = jnp.max(jnp.where(ok_PG, r_PG, -jnp.inf), -1, keepdims=True)
    lo = jnp.min(jnp.where(ok_PG, r_PG, jnp.inf), -1, keepdims=True)
    all_equal_P1 = hi <= lo  # also true for an empty group (-inf <= inf)
    adv_PG = jnp.where(ok_PG & ~all_equal_P1, adv_PG, 0)
    return adv_PG.reshape(n)


def process_advantages(
    step_rewards_NT: ArrayLike,
    step_mask_NT: ArrayLike,
    group_size: int,
    eps: float = 1e-6,
) -> Array:
    """Per-token advantages from step-level rewards: GRPO with process supervision [GRPO, §4.1.3].

    A process reward model scores each reasoning step; step j of sequence i has reward r_ij,
    placed at the token where the step's text ends, index(j) (``step_rewards_NT`` holds it
    there and ``step_mask_NT`` is 1 there, 0 elsewhere). Over all steps of the G samples of a
    prompt, with mean_g and population std_g of those rewards,

        r̃_ij = (r_ij − mean_g) / (std_g + eps),      A_it = Σ_{j : index(j) ≥ t} r̃_ij,

    so a token is credited with the normalised rewards of its own step and of every later one,
    and tokens after a sequence's last step get 0. A group whose step rewards are all equal
    (one step, or none) gets exactly 0, as in `compute_advantages`.

    Returns:
      [N, T] float32.
    """
    r = jnp.asarray(step_rewards_NT).astype(jnp.float32)
    m = jnp.asarray(step_mask_NT).astype(jnp.float32)
    if r.ndim != 2 or m.shape != r.shape:
        raise ValueError(f"step rewards and mask must be [N, T] alike, got {r.shape}, {m.shape}")
    group_size = positive_int("group_size", group_size)
    n, t = r.shape
    if n % group_size:
        raise ValueError(f"{n} rows do not split into groups of {group_size}")
    on = m != 0
    r_PK = jnp.where(on, r, 0).reshape(-1, group_size * t)
    m_PK = m.reshape(r_PK.shape)
    count = jnp.sum(m_PK, -1, keepdims=True)
    mean = safe_div(jnp.sum(m_PK * r_PK, -1, keepdims=True), count)
    var = safe_div(jnp.sum(m_PK * (r_PK - mean) ** 2, -1, keepdims=True), count)
    std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1)), 0)
    hi = jnp.max(jnp.where(m_PK != 0, r_PK, -jnp.inf), -1, keepdims=True)
    lo = jnp.min(jnp.where(m_PK != 0, r_PK, jnp.inf), -1, keepdims=True)
    normed = jnp.where((m_PK != 0) & (hi > lo), (r_PK - mean) / (std + eps), 0).reshape(n, t)
    return jnp.flip(jnp.cumsum(jnp.flip(normed, -1), -1), -1)
