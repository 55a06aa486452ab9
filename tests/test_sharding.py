"""Sharding is real on CPU: the same sampling call and GRPO update on 8 fake devices in several
mesh shapes give the one-device results, and every parameter is split as the rules say.

The computations (tests/multidevice/mesh_equivalence.py) run in the shared process with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/multidevice/runner.py), since the test
process has one CPU device.
Shardings are read off the arrays themselves (`.sharding.spec` and the shape of a device's
shard), and the expected ones are written out by hand below, not recomputed from the rules.
"""

import types

import numpy as np
import pytest

from rl_reason.infra import sharding
from tests.multidevice.mesh_equivalence import COMPUTED, MESHES

pytestmark = pytest.mark.slow

SHARDED = [name for name in MESHES if name != "1x1x1"]
SHARDED_COMPUTED = [name for name in SHARDED if name in COMPUTED]


def multidevice_needs(params: dict) -> list[str]:
    # One computation per mesh in the shared 8-device process (tests/multidevice/runner.py), so
    # a failure on one mesh fails only the tests that read it, and `-k 1x4x2` runs two of them.
    return [f"sharding/{params['mesh']}", "sharding/1x1x1"]


@pytest.fixture(scope="module")
def results(multidevice):
    loaded = {}

    def get(mesh):
        if mesh not in loaded:
            out = multidevice.result(f"sharding/{mesh}")
            loaded[mesh] = dict(np.load(out / f"{mesh}.npz"))
        return loaded[mesh]

    return get


def _params(record, prefix):
    return {k[len(prefix) :]: v for k, v in record.items() if k.startswith(prefix + "[")}


# (mesh, parameter) -> (PartitionSpec as a tuple, shape of one device's shard), by hand from
# the rules: embed over fsdp; heads, kv heads, MLP and vocab over tensor; the rest replicated.
# Shapes: embedding [512, 128], q_proj [128, 4, 32], k_proj [128, 2, 32], o_proj [4, 32, 128],
# gate [128, 384], down [384, 128], norm scales [128].
Q = "['layers'][0]['attn']['q_proj'].value"
K = "['layers'][1]['attn']['k_proj'].value"
OPROJ = "['layers'][0]['attn']['o_proj'].value"
GATE = "['layers'][1]['mlp']['gate'].value"
DOWN = "['layers'][0]['mlp']['down'].value"
EMB = "['embedding'].value"
NORM = "['final_norm']['scale'].value"
EXPECTED = {
    "8x1x1": {
        EMB: ((None, None), (512, 128)),
        Q: ((None, None, None), (128, 4, 32)),
        NORM: ((None,), (128,)),
    },
    "1x8x1": {
        EMB: ((None, "fsdp"), (512, 16)),
        Q: (("fsdp", None, None), (16, 4, 32)),
        OPROJ: ((None, None, "fsdp"), (4, 32, 16)),
        DOWN: ((None, "fsdp"), (384, 16)),
        NORM: ((None,), (128,)),
    },
    "1x4x2": {
        EMB: (("tensor", "fsdp"), (256, 32)),
        Q: (("fsdp", "tensor", None), (32, 2, 32)),
        K: (("fsdp", "tensor", None), (32, 1, 32)),
        OPROJ: (("tensor", None, "fsdp"), (2, 32, 32)),
        GATE: (("fsdp", "tensor"), (32, 192)),
        DOWN: (("tensor", "fsdp"), (192, 32)),
        NORM: ((None,), (128,)),
    },
    "2x2x2": {
        EMB: (("tensor", "fsdp"), (256, 64)),
        Q: (("fsdp", "tensor", None), (64, 2, 32)),
        K: (("fsdp", "tensor", None), (64, 1, 32)),
        GATE: (("fsdp", "tensor"), (64, 192)),
        NORM: ((None,), (128,)),
    },
}


@pytest.mark.parametrize("mesh", SHARDED)
def test_parameter_shardings_are_the_rules(results, mesh):
    record = results(mesh)
    for path, (spec, shard) in EXPECTED[mesh].items():
        got_spec = eval(str(record["spec" + path]))  # repr of a tuple of str / None
        # PartitionSpec drops trailing Nones in its repr on some versions; compare padded.
        got_spec = tuple(got_spec) + (None,) * (len(spec) - len(got_spec))
        assert got_spec == spec, (mesh, path, got_spec)
        assert tuple(record["shard" + path]) == shard, (mesh, path)
        if "updated_spec" + path in record:  # the update keeps them where they were
            assert eval(str(record["updated_spec" + path])) == eval(str(record["spec" + path]))
    # Momentum is sharded like its parameter, the schedule counter replicated.
    momentum = [k for k in record if k.startswith("opt_spec") and Q in k]
    assert momentum and all(str(record[k]) == str(record["spec" + Q]) for k in momentum)


@pytest.mark.parametrize("mesh", SHARDED)
def test_every_parameter_follows_the_rules_table(results, mesh):
    # Beyond the hand-picked ones: every parameter's spec is what the table gives its names,
    # and a parameter the rules split really is split (its shard is smaller than the whole).
    record = results(mesh)
    shape = dict(zip(sharding.AXES, MESHES[mesh], strict=True))
    for path, value in _params(record, "init").items():
        spec = eval(str(record["spec" + path]))
        expect = list(value.shape)
        for i, axes in enumerate(spec):
            for axis in (axes,) if isinstance(axes, str) else axes or ():
                expect[i] //= shape[axis]
        assert tuple(record["shard" + path]) == tuple(expect), (mesh, path)


@pytest.mark.parametrize("mesh", SHARDED_COMPUTED)
def test_sampling_matches_one_device(results, mesh):
    ref, got = results("1x1x1"), results(mesh)
    assert got["tokens_spec"] == ref["tokens_spec"]
    assert eval(str(got["tokens_spec"]))[0] == ("data", "fsdp")
    np.testing.assert_array_equal(got["tokens"], ref["tokens"])
    np.testing.assert_array_equal(got["lengths"], ref["lengths"])
    np.testing.assert_allclose(got["policy_logprobs"], ref["policy_logprobs"], atol=1e-5)
    # The stop tokens make lengths vary, so equality is over real samples, not padding.
    assert len(set(ref["lengths"].tolist())) > 3


@pytest.mark.parametrize("mesh", SHARDED_COMPUTED)
def test_engine_matches_the_static_sampler_and_one_device(results, mesh):
    ref, got = results("1x1x1"), results(mesh)
    assert eval(str(got["engine_tokens_spec"]))[0] == ("data", "fsdp")
    for record in (ref, got):
        np.testing.assert_array_equal(record["engine_tokens"], record["tokens"])
        np.testing.assert_array_equal(record["engine_lengths"], record["lengths"])
        np.testing.assert_allclose(
            record["engine_policy_logprobs"], record["policy_logprobs"], atol=1e-5
        )
    # 16 slots held the 32 samples (each sample's first token comes from the prefill).
    assert int(got["engine_decode_steps"]) >= int(got["lengths"].max()) - 1


@pytest.mark.parametrize("mesh", SHARDED_COMPUTED)
def test_grpo_update_matches_one_device(results, mesh):
    ref, got = results("1x1x1"), results(mesh)
    init = _params(ref, "init")
    for path, value in _params(got, "init").items():
        np.testing.assert_array_equal(value, init[path])  # sharded init draws the same weights
    assert float(ref["grad_norm"]) > 0.1
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-5)
    updated = _params(ref, "updated")
    moved = 0
    for path, value in _params(got, "updated").items():
        np.testing.assert_allclose(value, updated[path], rtol=1e-5, atol=2e-6, err_msg=path)
        moved += not np.allclose(updated[path], init[path])
    assert moved == len(updated)  # every parameter took a real step


def test_rules_replicate_an_indivisible_axis():
    # logical_to_spec reads only the mesh's axis sizes. 2 kv heads over a tensor axis of 4 are
    # replicated (with a warning) rather than an error; the embed axis still goes over fsdp.
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 2, "tensor": 4})
    spec = sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (128, 2, 32), mesh)
    assert tuple(spec) == ("fsdp", None, None)
    spec = sharding.logical_to_spec(("embed", "q_heads", "head_dim"), (128, 8, 32), mesh)
    assert tuple(spec) == ("fsdp", "tensor", None)
    # Batch goes over data x fsdp together; an axis of size 1 is left out.
    assert tuple(sharding.logical_to_spec(("batch", None), (8, 3), mesh)) == ("fsdp", None)


def test_mesh_config_errors_say_what_to_do():
    assert sharding.MeshConfig(data=-1, fsdp=2, tensor=2).shape(8) == (2, 2, 2)
    with pytest.raises(ValueError, match="at most one"):
        sharding.MeshConfig(data=-1, fsdp=-1).shape(8)
    with pytest.raises(ValueError, match="needs 12 devices, but 8"):
        sharding.MeshConfig(data=3, fsdp=2, tensor=2).shape(8)
    with pytest.raises(ValueError, match="do not divide"):
        sharding.MeshConfig(data=-1, fsdp=3).shape(8)


def test_distributed_flags_must_come_together(monkeypatch):
    for key in ("TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID", "TPU_WORKER_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="needs num_processes and process_id"):
        sharding.initialize_distributed("127.0.0.1:1234", num_processes=2)
    with pytest.raises(ValueError, match=r"process_id 2 is not in \[0, 2\)"):
        sharding.initialize_distributed("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="needs a coordinator_address"):
        sharding.initialize_distributed(None, num_processes=2, process_id=0)
    assert sharding.initialize_distributed() == (0, 1)  # one process: nothing started
