"""A plugin module as a user would write one (imported by tests/test_plugins.py through a
config's ``plugins``): it registers a verifier and an advantage estimator."""

import jax.numpy as jnp

from rl_reason import losses, verifiers
from rl_reason.verifiers import VerifyResult


def ends_with_gold(response: str, example: dict) -> VerifyResult:
    ok = response.rstrip().endswith(str(example["answer"]))
    return VerifyResult(float(ok), ok, "ends with the gold" if ok else "does not end with it")


verifiers.register("ends_with_gold", ends_with_gold)


@losses.register_advantage_estimator("plugin_zero")
def plugin_zero(r_PG, w_PG, n_P1, eps):
    # No learning signal at all: a run with it makes updates of exactly zero gradient.
    return jnp.zeros_like(r_PG)
