"""Registered advantage estimators, policy objectives and KL estimators: the README's worked
example runs as written, its variants give the numbers numpy gives (values and gradients), the
config validates against the registries, and the registries refuse ambiguous registrations."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_reason import losses
from rl_reason.core.config import GRPOConfig, LossOptions
from rl_reason.core.registry import Registry

README = Path(__file__).resolve().parents[1] / "README.md"
REGISTRIES = (losses.ADVANTAGE_ESTIMATORS, losses.POLICY_OBJECTIVES, losses.KL_ESTIMATORS)


@pytest.fixture(autouse=True)
def restore_registries():
    # A name registered here must not leak into other tests' lists of valid names.
    saved = [dict(r) for r in REGISTRIES]
    yield
    for registry, before in zip(REGISTRIES, saved, strict=True):
        registry.clear()
        registry.update(before)


def _readme_example() -> dict:
    text = README.read_text()
    section = text[text.index("### Extending: an estimator") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md (Extending)", "exec"), namespace)
    return namespace


def test_the_readme_example_registers_and_configures():
    ns = _readme_example()
    assert losses.ADVANTAGE_ESTIMATORS["max_baseline"] is ns["max_baseline"]
    assert losses.POLICY_OBJECTIVES["unclipped"] is ns["unclipped"]
    cfg = ns["cfg"]
    assert cfg.loss.objective == "unclipped"
    # Running the example again (a notebook cell run twice) redefines, without an error.
    _readme_example()


def test_the_example_estimator_is_what_numpy_computes():
    _readme_example()
    r = np.array([1.0, 0.0, 0.5, 0.5, 2.0, 3.0, 3.0, -1.0], np.float32)
    valid = np.array([1, 1, 1, 0, 1, 1, 1, 1], bool)
    got = np.asarray(losses.compute_advantages(r, 4, "max_baseline", valid=valid))
    want = np.zeros(8, np.float32)
    for g in range(2):
        idx = np.arange(4 * g, 4 * g + 4)
        ok = idx[valid[idx]]
        want[ok] = r[ok] - r[ok].max()  # groups with differing rewards; invalid stay 0
    np.testing.assert_allclose(got, want, rtol=0, atol=0)


def _batch(seed=0, n=4, t=5):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-1.5, 0.3, (n, t)).astype(np.float32)
    old = (logp + rng.normal(0, 0.3, (n, t))).astype(np.float32)
    adv = rng.normal(0, 1, n).astype(np.float32)
    mask = (rng.random((n, t)) < 0.7).astype(np.float32)
    mask[:, 0] = 1
    return logp, old, adv, mask


def test_the_example_objective_values_and_gradients_against_numpy():
    _readme_example()
    logp, old, adv, mask = _batch()

    def loss(lp):
        return losses.policy_loss(lp, old, adv, mask, objective="unclipped")[0]

    value, grad = jax.value_and_grad(loss)(jnp.asarray(logp))
    ratio = np.exp(np.float64(logp) - old)
    per_token = -ratio * adv[:, None]
    want = np.sum(mask * per_token) / np.sum(mask)  # token-mean
    want_grad = mask * per_token / np.sum(mask)  # d(−ρA)/dlogp = −ρA
    np.testing.assert_allclose(float(value), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-8)
    # The batch has ratios outside the clip range, so the default objective reads otherwise.
    assert abs(float(losses.policy_loss(logp, old, adv, mask)[0]) - want) > 1e-3


def test_the_default_objective_is_ppo_clip_bit_for_bit():
    logp, old, adv, mask = _batch(1)
    for level in losses.RATIO_LEVELS:
        kw = dict(ratio_level=level, clip_eps_low=0.1, clip_eps_high=0.15)
        a = jax.value_and_grad(lambda lp, kw=kw: losses.policy_loss(lp, old, adv, mask, **kw)[0])
        b = jax.value_and_grad(
            lambda lp, kw=kw: losses.policy_loss(lp, old, adv, mask, objective="ppo_clip", **kw)[0]
        )
        (va, ga), (vb, gb) = a(jnp.asarray(logp)), b(jnp.asarray(logp))
        assert float(va) == float(vb) and np.array_equal(np.asarray(ga), np.asarray(gb))


def test_a_registered_kl_estimator_reaches_the_loss():
    @losses.register_kl_estimator("abs")
    def _abs(x):
        return jnp.abs(x)

    logp, old, adv, mask = _batch(2)
    ref = logp - 0.25
    _, m = losses.policy_loss(logp, logp, adv, mask, ref_logp=ref, kl_coef=0.1, kl_estimator="abs")
    np.testing.assert_allclose(float(m["kl_ref"]), 0.25, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(losses.kl_penalty(logp, ref, "abs")), 0.25, rtol=1e-6)


def test_the_config_names_the_valid_choices():
    valid = r"\['ppo_clip', 'dual_clip', 'cispo'\]"
    with pytest.raises(ValueError, match=rf"loss.objective='vapo' is not one of {valid}"):
        GRPOConfig(
            loss=dict(objective="vapo"),
        )
    with pytest.raises(
        ValueError, match="unknown policy objective 'vapo'; valid: 'ppo_clip', 'dual_clip', 'cispo'"
    ):
        losses.policy_loss(*_batch(), objective="vapo")
    with pytest.raises(ValueError, match="loss.advantage_estimator='median' is not one of"):
        GRPOConfig(
            loss=dict(advantage_estimator="median"),
        )


def test_registration_errors():
    reg = Registry("widget")

    @reg.register("a")
    def a(x):
        return x

    def other(x):
        return -x

    with pytest.raises(ValueError, match=r"widget 'a' is registered already \(by .*\.a\)"):
        reg.register("a", other)
    reg.register("a", other, replace=True)
    assert reg["a"] is other
    with pytest.raises(TypeError, match="must be a function"):
        reg.register("b", 3)
    with pytest.raises(ValueError, match="non-empty string name"):
        reg.register("")
    with pytest.raises(ValueError, match="unknown widget 'c'; valid: 'a'"):
        reg.check("c")


def test_a_registered_objective_reaches_the_jitted_update():
    import optax

    from tests.test_train_step import _batch as train_batch
    from tests.test_train_step import _fns, _rollout

    @losses.register_policy_objective("twice_ppo_clip")
    def twice(x):
        return 2 * losses.ppo_clip(x)

    graphdef, params, out = _rollout()
    batch = train_batch(out)
    metrics = {}
    for name in ("ppo_clip", "twice_ppo_clip"):
        fns = _fns(graphdef, params, optax.sgd(1.0), LossOptions(objective=name))
        p = jax.tree.map(jnp.copy, params)
        _, _, metrics[name] = fns.update(p, fns.init_opt_state(p), batch)
    one, two = metrics["ppo_clip"], metrics["twice_ppo_clip"]
    assert abs(float(one["loss"])) > 1e-4 and float(one["grad_norm"]) > 0
    np.testing.assert_allclose(float(two["loss"]), 2 * float(one["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(two["grad_norm"]), 2 * float(one["grad_norm"]), rtol=1e-5)
