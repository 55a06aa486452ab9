"""ModelConfig.remat: the same gradients, fewer activations kept for the backward pass."""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from models import Transformer, get_config

CFG = get_config("tiny").replace(num_layers=3, qkv_bias=True, post_norms=True)
_BYTES = {"f32": 4, "i32": 4, "bool": 1, "bf16": 2}


def _loss_fn(cfg):
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    ids = jax.random.randint(jax.random.key(1), (2, 48), 0, cfg.vocab_size)
    weights = jax.random.normal(jax.random.key(2), (2, 48, cfg.vocab_size))

    def loss(params):
        return jnp.mean(nnx.merge(graphdef, params)(ids) * weights)

    return loss, params


def _residual_bytes(loss, params) -> int:
    """Bytes of the forward values the backward pass keeps (jax's own accounting)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(loss, params)
    total = 0
    for line in out.getvalue().splitlines():
        m = re.match(r"(\w+)\[([\d,]*)\]", line.strip())
        if m:
            dims = [int(d) for d in m.group(2).split(",") if d]
            total += int(np.prod(dims)) * _BYTES.get(m.group(1), 4)
    return total


def test_remat_keeps_the_gradient_and_saves_fewer_activations():
    grads, kept = {}, {}
    for policy in ("none", "full", "dots"):
        loss, params = _loss_fn(CFG.replace(remat=policy))
        grads[policy] = jax.jit(jax.grad(loss))(params)
        kept[policy] = _residual_bytes(loss, params)
    for policy in ("full", "dots"):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
            grads[policy],
            grads["none"],
        )
    # Full remat keeps each block's input only; "dots" also its matmul outputs.
    assert kept["full"] < kept["dots"] < kept["none"], kept
    assert kept["full"] < kept["none"] / 2, kept


def test_unknown_remat_policy_is_refused():
    with pytest.raises(ValueError, match="remat"):
        CFG.replace(remat="offload")
