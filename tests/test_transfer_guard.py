"""The device side of an RL step runs with no implicit host transfers.

Under `jax.transfer_guard("disallow")` any implicit host <-> device copy raises: a Python
scalar or numpy array fed to a jitted step, a device value read back on the host (`float(x)`,
`np.asarray(x)`, `if x:`) in the middle of it. The sampler, the log-prob pass, the batch
assembly and the update run here on device-resident inputs (or, for the sampler, inputs it
transfers explicitly), so none of them waits on the host between its parts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from models import Transformer, get_config
from rl_reason import losses
from rl_reason.core import update as train_step
from rl_reason.core.config import LossOptions
from rl_reason.core.record import RolloutArrays
from rl_reason.infra import sharding
from rl_reason.rollout import sampling

CFG = get_config("tiny").replace(vocab_size=64, num_layers=1)


def test_sample_logprobs_batch_and_update_need_no_implicit_transfer():
    graphdef, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
    mesh = sharding.mesh_of(params)
    fns = train_step.StepFns(
        graphdef, params, optax.adamw(1e-3), LossOptions(logprob_chunk_size=4), mesh
    )
    params = jax.device_put(params, fns.param_shardings)
    opt_state = fns.init_opt_state(params)
    rewards = jax.device_put(jnp.asarray([1.0, 0.0, 0.0, 1.0, 0.5, 0.0]))
    key = jax.random.key(0)
    jax.block_until_ready((params, opt_state, rewards))
    with jax.transfer_guard("disallow"):
        out = sampling.sample(
            (graphdef, params),
            [[5, 6, 7], [8, 9]],
            key,
            group_size=3,
            max_new_tokens=10,
            config=sampling.SamplingConfig(stop_token_ids=(3,)),
        )
        args = (out.prompt_ids, out.prompt_mask, out.tokens, out.mask)
        old = fns.logprobs(params, *args)
        advantages = jax.jit(losses.compute_advantages, static_argnums=1)(rewards, 3)
        rollout = RolloutArrays.from_sample(out, old_logprobs=old)
        batch = fns.make_batch([rollout], None, advantages)
        new_params, _, metrics = fns.update(params, opt_state, batch)
        jax.block_until_ready((new_params, metrics))
    metrics = jax.device_get(metrics)
    assert metrics["finite"] == 1.0 and np.isfinite(metrics["loss"])
    # The sampler's own log-probs are those of the log-prob pass (same weights).
    mask = np.asarray(out.mask)
    np.testing.assert_allclose(
        np.asarray(old) * mask, np.asarray(out.policy_logprobs) * mask, atol=1e-5
    )


def test_the_guard_catches_an_implicit_transfer():
    # The check above can fail: a numpy argument to a jitted function is refused.
    double = jax.jit(lambda x: 2 * x)
    with jax.transfer_guard("disallow"), pytest.raises(Exception, match="[Dd]isallowed"):
        double(np.ones(3, np.float32))
