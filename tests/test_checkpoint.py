"""Tests for rl_reason.infra.checkpoint: exact round trips, retention (last K plus the best), the
pre-restore shape/dtype check, restoring onto a NamedSharding, typed PRNG keys and iterator
state, and resuming past damaged checkpoints or a process killed mid-save.

The state mixes an nnx model's params (as a pure dict) with a real optax Adam state, because
optax states are namedtuples that orbax writes back as dicts: the path check must see through it.
"""

import logging
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rl_reason.infra.checkpoint import Checkpointer, CheckpointMismatchError, CheckpointReadError

# A failed tensorstore read leaves a callback that fires after orbax closed its event loop, and
# the garbage collector reports it during whichever test runs next: orbax's noise, not a failure.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


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


# -- resume: the newest readable checkpoint ------------------------------------------------------


def _break_arrays_removed(step_dir):
    for sub in ("d", "ocdbt.process_0"):
        shutil.rmtree(step_dir / "state" / sub)


def _break_meta_corrupt(step_dir):
    (step_dir / "meta" / "metadata").write_text('{"config": {"lr": 0.')


def _break_chunks_truncated(step_dir):
    for f in (step_dir / "state" / "d").iterdir():
        f.write_bytes(f.read_bytes()[:7])


def _break_array_metadata_lost(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


@pytest.mark.parametrize(
    "damage",
    [
        _break_arrays_removed,
        _break_meta_corrupt,
        _break_chunks_truncated,
        _break_array_metadata_lost,
    ],
)
def test_restore_latest_falls_back_past_unreadable_steps(tmp_path, caplog, damage):
    with Checkpointer(tmp_path, save_every=1, max_to_keep=5) as ckpt:
        for s in (1, 2, 3):
            ckpt.save(s, make_state(step=s), meta={"data": {"position": s}})
    damage(tmp_path / "3")

    with Checkpointer(tmp_path, save_every=1, max_to_keep=5) as ckpt:
        # Orbax still lists the damaged step as the latest one.
        assert ckpt.latest_step() == 3
        with caplog.at_level(logging.WARNING, logger="rl_reason.infra.checkpoint"):
            step, state, meta = ckpt.restore_latest(jax.eval_shape(make_state))
        assert step == 2 and int(state["step"]) == 2
        assert meta == {"data": {"position": 2}}
        assert_bitwise_equal(state, make_state(step=2))
        warned = [r.getMessage() for r in caplog.records]
        assert any(f"{tmp_path / '3'} cannot be read" in m for m in warned), warned
        # Moved aside for inspection, so the resumed run can save step 3 again.
        assert (tmp_path / "3.unreadable").is_dir()
        assert ckpt.all_steps() == [1, 2]
        assert ckpt.save(3, make_state(step=3), meta={"data": {"position": 3}})
    with Checkpointer(tmp_path, save_every=1, max_to_keep=5) as ckpt:
        step, state, meta = ckpt.restore_latest(jax.eval_shape(make_state))
    assert step == 3 and meta == {"data": {"position": 3}}


def test_restore_latest_skips_several_and_errors_when_none_reads(tmp_path):
    assert Checkpointer(tmp_path / "empty", save_every=1).restore_latest({}) is None
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        for s in (1, 2, 3):
            ckpt.save(s, make_state(step=s))
    _break_arrays_removed(tmp_path / "3")
    _break_meta_corrupt(tmp_path / "2")
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        step, _, _ = ckpt.restore_latest(jax.eval_shape(make_state))
        assert step == 1 and ckpt.all_steps() == [1]
    _break_chunks_truncated(tmp_path / "1")
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        with pytest.raises(CheckpointReadError, match=r"can be read \(step 1: ") as e:
            ckpt.restore_latest(jax.eval_shape(make_state))
        assert "fresh workdir" in str(e.value)
        # Nothing is moved when there is nothing to resume from.
        assert ckpt.all_steps() == [1]


def test_restore_latest_raises_on_another_model_instead_of_falling_back(tmp_path):
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, make_state(d_out=4))
        ckpt.save(2, make_state(d_out=4))
        with pytest.raises(CheckpointMismatchError, match="'opt_state/0/mu/proj/bias'"):
            ckpt.restore_latest(jax.eval_shape(lambda: make_state(d_out=6)))
        assert ckpt.all_steps() == [1, 2]


# -- PRNG keys and data-iterator state ----------------------------------------------------------


def test_typed_keys_and_iterator_state_round_trip(tmp_path):
    import grain

    dataset = grain.MapDataset.range(100).shuffle(seed=3).batch(4)
    it = iter(dataset.to_iter_dataset())
    for _ in range(5):
        next(it)
    state = {
        "key": jax.random.key(42),
        "rbg": jax.random.key(7, impl="rbg"),
        "keys": jax.random.split(jax.random.key(1), 3),
        "params": make_state()["params"],
    }
    meta = {"config": {"seed": 42}, "data": it.get_state()}
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(5, state, meta=meta)
        step, got, got_meta = ckpt.restore_latest(jax.eval_shape(lambda: state))
    assert step == 5 and got_meta == meta
    for name in ("key", "rbg", "keys"):
        assert got[name].dtype == state[name].dtype, name  # a typed key again, same impl
        np.testing.assert_array_equal(
            jax.random.key_data(got[name]), jax.random.key_data(state[name])
        )
    np.testing.assert_array_equal(
        jax.random.normal(got["key"], (4,)), jax.random.normal(state["key"], (4,))
    )
    resumed = iter(dataset.to_iter_dataset())
    resumed.set_state(got_meta["data"])
    for _ in range(3):
        np.testing.assert_array_equal(next(resumed), next(it))


def test_key_impl_mismatch_is_named(tmp_path):
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, {"key": jax.random.key(0)})
        wrong = jax.eval_shape(lambda: {"key": jax.random.key(0, impl="rbg")})
        with pytest.raises(
            CheckpointMismatchError,
            match=r"at 'key' a typed PRNG key \(threefry2x32\), but the abstract state expects "
            r"a typed PRNG key \(rbg\)",
        ):
            ckpt.restore_latest(wrong)
        plain = {"key": jax.ShapeDtypeStruct((2,), jnp.uint32)}
        with pytest.raises(
            CheckpointMismatchError,
            match=r"at 'key' a typed PRNG key \(threefry2x32\), but the abstract state expects "
            "a plain array",
        ):
            ckpt.restore_latest(plain)


# -- retention: the last K plus the best by a metric ---------------------------------------------


def test_best_by_metric_is_kept_beyond_the_last_k(tmp_path):
    acc = {2: 0.9, 4: 0.5, 5: float("nan")}  # other steps had no evaluation

    def save(ckpt, s):
        metrics = {"loss": 1.0 / s} | ({"eval_accuracy": acc[s]} if s in acc else {})
        ckpt.save(s, make_state(step=s), metrics=metrics)

    kw = dict(save_every=1, max_to_keep=2, best_metric="eval_accuracy", async_save=False)
    with Checkpointer(tmp_path, **kw) as ckpt:
        for s in range(1, 7):
            save(ckpt, s)
        assert ckpt.all_steps() == [2, 5, 6]
        assert ckpt.best_step() == 2
    # A restarted run reads the metrics back from disk and keeps honouring them.
    with Checkpointer(tmp_path, **kw) as ckpt:
        save(ckpt, 7)
        assert ckpt.all_steps() == [2, 6, 7]
        acc[8] = 0.95
        save(ckpt, 8)
        save(ckpt, 9)
        assert ckpt.all_steps() == [8, 9]
        assert ckpt.best_step() == 8
        _, state, _ = ckpt.restore(jax.eval_shape(make_state), step=ckpt.best_step())
        assert int(state["step"]) == 8


def test_best_mode_min_and_bad_metric(tmp_path):
    kw = dict(save_every=1, max_to_keep=1, best_metric="eval_loss", best_mode="min")
    with Checkpointer(tmp_path, **kw) as ckpt:
        for s, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 5.0)]:
            ckpt.save(s, make_state(step=s), metrics={"eval_loss": loss})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 4] and ckpt.best_step() == 2
        with pytest.raises(TypeError, match="'eval_loss' must be a number"):
            ckpt.save(5, make_state(), metrics={"eval_loss": "low"})
    with pytest.raises(ValueError, match="best_mode must be 'max' or 'min'"):
        Checkpointer(tmp_path, save_every=1, best_metric="x", best_mode="best")


# -- a process killed while an asynchronous save writes ------------------------------------------

# ~128 MB of arrays: the background write takes long enough to be killed in the middle.
KILLED_WRITER = textwrap.dedent(
    """
    import pathlib, sys, time
    import jax.numpy as jnp
    from rl_reason.infra.checkpoint import Checkpointer

    ckpt = Checkpointer(sys.argv[1], save_every=1, async_save=True)
    state = lambda s: {f"w{i}": jnp.full((4_000_000,), float(s * 10 + i)) for i in range(8)}
    ckpt.save(1, state(1), meta={"step": 1})
    ckpt.wait()
    ckpt.save(2, state(2), meta={"step": 2})
    # The background write makes its temporary directory when it starts: wait for it, so the
    # kill comes mid-write however busy the machine is.
    root, deadline = pathlib.Path(sys.argv[1]), time.monotonic() + 60
    while not any(p.name.startswith("2.") for p in root.iterdir()):
        if time.monotonic() > deadline:
            raise SystemExit("orbax never started writing step 2")
        time.sleep(0.002)
    print("writing", flush=True)
    time.sleep(60)
    """
)


def test_sigkill_during_async_save_leaves_the_previous_step_resumable(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # The kill came mid-write: step 2 exists only as orbax's temporary directory.
    assert (tmp_path / "1").is_dir() and not (tmp_path / "2").exists()
    assert any(p.name.startswith("2.") for p in tmp_path.iterdir())

    abstract = {f"w{i}": jax.ShapeDtypeStruct((4_000_000,), jnp.float32) for i in range(8)}
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        step, state, meta = ckpt.restore_latest(abstract)
        assert step == 1 and meta == {"step": 1}
        for i in range(8):
            assert np.all(np.asarray(state[f"w{i}"]) == 10 + i)
        # The half-written step is gone and does not block writing that step again.
        assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]
        small = {f"w{i}": jnp.full((4_000_000,), -1.0) for i in range(8)}
        assert ckpt.save(2, small, meta={"step": 2})
        assert ckpt.save(3, small, meta={"step": 3})
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        step, state, meta = ckpt.restore_latest(abstract)
    assert step == 3 and meta == {"step": 3}
    assert float(np.asarray(state["w7"])[0]) == -1.0


def test_restore_item_reads_the_params_alone_and_checks_them(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, state, meta={"trainer": {"step": 1}})
    with Checkpointer(tmp_path, save_every=1, read_only=True) as ckpt:
        params, meta = ckpt.restore_item("params", jax.eval_shape(lambda: state["params"]), 1)
        assert_bitwise_equal(params, state["params"])
        assert meta == {"trainer": {"step": 1}}
        wrong = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((5, *x.shape[1:]), x.dtype), state["params"]
        )
        with pytest.raises(CheckpointMismatchError, match="saved shape"):
            ckpt.restore_item("params", wrong, 1)
        with pytest.raises(FileNotFoundError, match="saved steps: \\[1\\]"):
            ckpt.restore_item("params", jax.eval_shape(lambda: state["params"]), 2)
