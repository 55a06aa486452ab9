"""Tests for rl_reason.checkpoint: exact round trips, retention, the pre-restore shape/dtype check,
and restoring onto a NamedSharding.

The state mixes an nnx model's params (as a pure dict) with a real optax Adam state, because
optax states are namedtuples that orbax writes back as dicts: the path check must see through it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rl_reason.checkpoint import Checkpointer


class Tiny(nnx.Module):
    def __init__(self, d_in: int, d_out: int, dtype=jnp.float32):
        self.proj = nnx.Linear(d_in, d_out, param_dtype=dtype, rngs=nnx.Rngs(0))
        self.scale = nnx.Param(jnp.full((d_out,), 0.5, dtype))


def make_state(d_in=3, d_out=4, dtype=jnp.float32, step=7):
    params = nnx.to_pure_dict(nnx.state(Tiny(d_in, d_out, dtype), nnx.Param))
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    # One real update so the moments are non-zero and the count is not its initial value.
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.25, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return {"params": params, "opt_state": opt_state, "step": jnp.asarray(step, jnp.int32)}


def assert_bitwise_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_round_trip_is_bitwise_and_keeps_meta(tmp_path):
    state = make_state()
    meta = {"config": {"lr": 0.01, "model": "tiny"}, "data_position": 123}
    with Checkpointer(tmp_path, save_every=5, async_save=True) as ckpt:
        assert ckpt.save(10, state, meta=meta)
        ckpt.wait()
        assert ckpt.latest_step() == 10
        step, restored, got_meta = ckpt.restore(jax.eval_shape(lambda: state))
    assert step == 10
    assert got_meta == meta
    # Same container types (optax namedtuples included) as the abstract tree, same bits.
    assert_bitwise_equal(restored, state)
    assert float(np.abs(np.asarray(restored["opt_state"][0].mu["proj"]["kernel"])).sum()) > 0


def test_save_rule_force_and_repeated_step(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, save_every=3, async_save=False) as ckpt:
        saved = [s for s in range(1, 8) if ckpt.save(s, state)]
        assert saved == [3, 6]
        assert ckpt.save(7, state, force=True)
        # A forced final save at a step already written is a no-op, not an orbax error.
        assert not ckpt.save(7, state, force=True)
        assert ckpt.all_steps() == [3, 6, 7]


def test_max_to_keep_and_reopen_from_disk(tmp_path):
    with Checkpointer(tmp_path, save_every=1, max_to_keep=2, async_save=True) as ckpt:
        for s in range(4):
            ckpt.save(s, make_state(step=s))
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3]
    # A new process (here: a new Checkpointer) sees the same steps and restores older ones.
    with Checkpointer(tmp_path, save_every=1, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() == 3
        step, restored, meta = ckpt.restore(jax.eval_shape(make_state), step=2)
    assert step == 2 and meta == {}
    assert int(restored["step"]) == 2


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint in"):
            ckpt.restore(jax.eval_shape(make_state))
        ckpt.save(1, make_state())
        with pytest.raises(FileNotFoundError, match=r"step 5 .*saved steps: \[1\]"):
            ckpt.restore(jax.eval_shape(make_state), step=5)


def test_shape_mismatch_names_the_parameter(tmp_path):
    with Checkpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        ckpt.save(1, make_state(d_out=4))
        wrong = jax.eval_shape(lambda: make_state(d_out=6))
        with pytest.raises(ValueError) as e:
            ckpt.restore(wrong)
    msg = str(e.value)
    # Flatten order is sorted dict keys: 'opt_state' comes before 'params'.
    assert "'opt_state/0/mu/proj/bias'" in msg
    assert "saved shape (4,) dtype float32, expected shape (6,) dtype float32" in msg
    assert "config the checkpoint was written with" in msg


def test_dtype_mismatch_is_caught_before_orbax_casts(tmp_path):
    with Checkpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        ckpt.save(1, make_state(dtype=jnp.float32))
        wrong = jax.eval_shape(lambda: make_state(dtype=jnp.bfloat16))
        with pytest.raises(
            ValueError,
            match=r"saved shape \(4,\) dtype float32, expected shape "
            r"\(4,\) dtype bfloat16",
        ):
            ckpt.restore(wrong)


def test_structure_mismatch(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        ckpt.save(1, state)
        missing = jax.eval_shape(lambda: {**state, "ema": state["params"]})
        with pytest.raises(ValueError, match="no parameter 'ema/proj/bias'"):
            ckpt.restore(missing)
        extra = jax.eval_shape(lambda: {k: v for k, v in state.items() if k != "step"})
        with pytest.raises(ValueError, match=r"lacks, first 'step' \(1 in all\)"):
            ckpt.restore(extra)


def test_restore_onto_named_sharding(tmp_path):
    state = make_state()
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1), ("data",))
    with Checkpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        ckpt.save(1, state)

        def abstract(x):
            spec = P("data") if x.ndim >= 1 else P()
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

        target = jax.tree.map(abstract, state)
        _, restored, _ = ckpt.restore(target)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True):
        assert isinstance(got.sharding, NamedSharding)
        assert got.sharding == want.sharding
    assert_bitwise_equal(restored, state)


def test_meta_must_be_json(tmp_path):
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        with pytest.raises(TypeError, match="JSON-serialisable"):
            ckpt.save(1, make_state(), meta={"x": np.zeros(2)})
        assert ckpt.all_steps() == []


def test_async_save_survives_donation_of_the_saved_arrays(tmp_path):
    # The trainer donates its state to the next step right after `save` returns; orbax must
    # have copied the arrays to host memory by then. Deleting them stands in for donation.
    w = jax.device_put(jnp.arange(4096, dtype=jnp.float32) * 3)
    want = np.asarray(w).copy()
    with Checkpointer(tmp_path, save_every=1, async_save=True) as ckpt:
        ckpt.save(1, {"w": w})
        w.delete()
        _, restored, _ = ckpt.restore({"w": jax.ShapeDtypeStruct((4096,), jnp.float32)})
    np.testing.assert_array_equal(np.asarray(restored["w"]), want)


def test_nnx_state_round_trip_and_pure_dict_mismatch(tmp_path):
    state = {"params": nnx.state(Tiny(3, 4), nnx.Param)}
    with Checkpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        ckpt.save(1, state)
        _, restored, _ = ckpt.restore(jax.eval_shape(lambda: state))
        assert isinstance(restored["params"], nnx.State)
        assert_bitwise_equal(restored, state)
        # A pure-dict abstract tree lacks the Variable '.value' level: named, not misread.
        pure = {"params": nnx.to_pure_dict(state["params"])}
        with pytest.raises(ValueError, match="no parameter 'params/proj/bias'"):
            ckpt.restore(jax.eval_shape(lambda: pure))
