"""Log-probs from hidden states never form whole [N, T, V] float32 logits for big vocabularies,
without being asked to."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from rl_reason import losses as L


def _float32_sizes(fn, *args):
    """Element counts of every float32 value in fn's jaxpr, nested ones (map, remat) included."""

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (v.aval for v in eqn.outvars)
            for p in eqn.params.values():
                for sub in p if isinstance(p, tuple | list) else (p,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        yield from walk(inner)

    avals = walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return [math.prod(a.shape) for a in avals if getattr(a, "dtype", None) == jnp.float32]


def test_auto_chunk_size():
    budget = L.AUTO_CHUNK_BYTES
    assert L.auto_chunk_size(8, 128, 512) is None  # 2 MiB of logits: one pass
    v = 151_936  # Qwen2.5's vocabulary
    chunk = L.auto_chunk_size(64, 1024, v)
    assert 4 * 64 * chunk * v <= budget < 4 * 64 * (chunk + 1) * v
    assert L.auto_chunk_size(1024, 8, 10**6) == 1  # not even one position fits: one at a time


def test_big_vocabulary_is_chunked_by_default_forward_and_backward():
    n, t, d, v = 4, 256, 16, 300_000  # whole logits: 1.2 GB > AUTO_CHUNK_BYTES
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(n, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float32)
    tokens = jnp.asarray(rng.integers(0, v, (n, t)), jnp.int32)

    def loss(h, w):
        lp, ent = L.token_logprobs_from_hidden(h, tokens, unembed_DV=w, return_entropy=True)
        return jnp.sum(lp) + jnp.sum(ent)

    grad = jax.grad(loss, argnums=(0, 1))
    sizes = _float32_sizes(grad, hidden, w)
    assert max(sizes) * 4 <= L.AUTO_CHUNK_BYTES, max(sizes)
    assert max(sizes) < n * t * v / 4

    # And the values are the plain formula's, at a few positions (float64 numpy reference).
    lp = np.asarray(
        jax.jit(lambda h, w: L.token_logprobs_from_hidden(h, tokens, unembed_DV=w))(hidden, w)
    )
    for i, j in [(0, 0), (1, 17), (3, 63)]:
        z = np.asarray(hidden[i, j], np.float64) @ np.asarray(w, np.float64)
        want = z[int(tokens[i, j])] - (z.max() + np.log(np.exp(z - z.max()).sum()))
        np.testing.assert_allclose(lp[i, j], want, rtol=1e-4, atol=1e-4)
