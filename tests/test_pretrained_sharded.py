"""models.from_pretrained / save_pretrained without transformers: placement on 8 fake CPU devices,
bit-exact round trips, the safetensors format against the `safetensors` library, and the errors.

The mesh half (compute_on_meshes) runs in the shared process with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/multidevice/runner.py), since the test
process has one CPU device.
Shardings are read off the loaded arrays (`.sharding.spec`, each device's shard shape) and the
expected ones are written out by hand, not recomputed from the rules.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import (
    ModelConfig,
    Transformer,
    from_pretrained,
    load_config,
    safetensors_io,
    save_pretrained,
)

MESHES = {"1x4x2": (1, 4, 2), "2x2x2": (2, 2, 2)}
# Qwen3-shaped with an untied head (so lm_head is split too), and Gemma-2-shaped (tied, post
# norms, sliding window). 8 heads over 4 kv heads: both divide the tensor axis.
CONFIGS = {
    "qwen3": ModelConfig(
        vocab_size=128,
        embed_dim=64,
        num_layers=2,
        num_heads=8,
        num_kv_heads=4,
        head_dim=8,
        mlp_dim=96,
        qk_norm=True,
        tie_embeddings=False,
        max_seq_len=64,
    ),
    "gemma2": ModelConfig(
        vocab_size=128,
        embed_dim=64,
        num_layers=2,
        num_heads=8,
        num_kv_heads=4,
        head_dim=8,
        mlp_dim=96,
        mlp_activation="gelu_tanh",
        norm_scale_plus_one=True,
        scale_embeddings=True,
        post_norms=True,
        attn_logit_softcap=5.0,
        final_logit_softcap=10.0,
        query_scale=0.25,  # not 1/sqrt(head_dim)
        sliding_window=4,
        max_seq_len=64,
    ),
}


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """Weights drawn in numpy at O(1) scale (no init compiles), in cfg's param dtype."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(x):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        if x.ndim == 1:  # norm scales near 1, stored as w or as 1 + w
            value = 0.2 * noise + (0.0 if cfg.norm_scale_plus_one else 1.0)
        else:
            value = noise / np.sqrt(x.shape[0])
        return jnp.asarray(value, x.dtype)

    return nnx.merge(graphdef, jax.tree.map(draw, state))


def _ids_and_mask():
    ids = np.random.default_rng(1).integers(0, 128, (4, 12)).astype(np.int32)
    mask = np.arange(12)[None, :] >= np.array([0, 3, 0, 7])[:, None]
    return ids, mask


@nnx.jit
def _logits(model, ids, mask):
    return model(ids, mask_BT=mask)


def _params(model) -> dict[str, jax.Array]:
    return {
        "/".join(map(str, path)): v.get_value()
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


# --- the 8-device half --------------------------------------------------------------------------


class _Recorded(np.ndarray):
    """A checkpoint tensor that logs (name, elements) of every slice read from it."""

    log: list[tuple[str, int]] = []

    def __array_finalize__(self, obj):
        self.name = getattr(obj, "name", None)

    def __getitem__(self, index):
        out = super().__getitem__(index)
        _Recorded.log.append((self.name, int(np.size(out))))
        return out


def _recording_open_checkpoint(opener):
    def open_checkpoint(path):
        tensors = {}
        for name, array in opener(path).items():
            tensors[name] = array.view(_Recorded)
            tensors[name].name = name
        return tensors

    return open_checkpoint


def compute_on_meshes(family: str, out: str) -> None:
    """Loads one family's checkpoint on each mesh; OUT/record.json for the tests below."""
    from models import pretrained

    assert jax.device_count() == 8
    # The process is shared with other computations: the recording opener is put back after.
    opener = pretrained.safetensors_io.open_checkpoint
    pretrained.safetensors_io.open_checkpoint = _recording_open_checkpoint(opener)
    try:
        record = _on_meshes(family, CONFIGS[family], out)
    finally:
        pretrained.safetensors_io.open_checkpoint = opener
    with open(os.path.join(out, "record.json"), "w") as f:
        json.dump(record, f)


def _on_meshes(family: str, cfg: ModelConfig, out: str) -> dict[str, object]:
    from jax.sharding import Mesh

    from models import LoRAConfig, add_lora

    ids, mask = _ids_and_mask()
    record: dict[str, object] = {}
    ckpt = os.path.join(out, family)
    # Small shards: the sharded path also goes through the index.
    save_pretrained(random_model(cfg), ckpt, max_shard_bytes=30_000)
    single = from_pretrained(ckpt)
    record[f"{family}/logits"] = np.asarray(_logits(single, ids, mask)).tolist()
    for name, shape in MESHES.items():
        mesh = Mesh(np.asarray(jax.devices()).reshape(shape), ("data", "fsdp", "tensor"))
        _Recorded.log.clear()
        model = from_pretrained(ckpt, mesh=mesh)
        sizes = {k: int(v.size) for k, v in safetensors_io.open_checkpoint(ckpt).items()}
        reads: dict[str, dict] = {k: {"full": n, "reads": []} for k, n in sizes.items()}
        for tensor, size in _Recorded.log:
            reads[tensor]["reads"].append(size)
        record[f"{family}/{name}/reads"] = reads
        logits = _logits(model, ids, mask)
        record[f"{family}/{name}/logits"] = np.asarray(logits).tolist()
        for path, value in _params(model).items():
            shards = value.addressable_shards
            record[f"{family}/{name}/param/{path}"] = {
                "spec": [list(a) if isinstance(a, tuple) else a for a in value.sharding.spec],
                "mesh": value.sharding.mesh.devices.shape,
                "shape": value.shape,
                "shard_shapes": sorted({tuple(s.data.shape) for s in shards}),
                "devices": len(shards),
                "equal": bool(np.array_equal(np.asarray(value), np.asarray(_params(single)[path]))),
            }
        add_lora(model, LoRAConfig(rank=4, alpha=4.0), nnx.Rngs(0))
        for sub, attr in (("attn", "q_proj_lora"), ("mlp", "down_lora")):
            adapter = getattr(getattr(model.layers[0], sub), attr)
            for part in ("a", "b"):
                spec = getattr(adapter, part).get_value().sharding.spec
                record[f"{family}/{name}/lora/{sub}.{part}"] = [
                    list(a) if isinstance(a, tuple) else a for a in spec
                ]
    return record


# --- the tests ---------------------------------------------------------------------------------


def multidevice_needs(params: dict) -> list[str]:
    # One computation per family in the shared 8-device process (tests/multidevice/runner.py), so
    # a failure in one fails only that family's tests.
    return [f"pretrained/{params['family']}"]


@pytest.fixture(scope="module")
def records(multidevice):
    loaded = {}

    def get(family):
        if family not in loaded:
            out = multidevice.result(f"pretrained/{family}")
            loaded[family] = json.loads((out / "record.json").read_text())
        return loaded[family]

    return get


# (mesh, parameter) -> (spec, one device's shard shape), by hand from the rules: embed over
# fsdp; q/kv heads, MLP and vocab over tensor; head_dim and norms replicated. Full shapes:
# embedding [128, 64], lm_head [64, 128], q_proj [64, 8, 8], k_proj [64, 4, 8],
# o_proj [8, 8, 64], gate [64, 96], down [96, 64], norms [64], q_norm [8].
EXPECTED = {
    "1x4x2": {
        "embedding": (["tensor", "fsdp"], (64, 16)),
        "lm_head": (["fsdp", "tensor"], (16, 64)),
        "layers/0/attn/q_proj": (["fsdp", "tensor", None], (16, 4, 8)),
        "layers/1/attn/k_proj": (["fsdp", "tensor", None], (16, 2, 8)),
        "layers/0/attn/o_proj": (["tensor", None, "fsdp"], (4, 8, 16)),
        "layers/1/mlp/gate": (["fsdp", "tensor"], (16, 48)),
        "layers/0/mlp/down": (["tensor", "fsdp"], (48, 16)),
        "final_norm/scale": ([None], (64,)),
        "layers/0/attn/q_norm/scale": ([None], (8,)),
    },
    "2x2x2": {
        "embedding": (["tensor", "fsdp"], (64, 32)),
        "lm_head": (["fsdp", "tensor"], (32, 64)),
        "layers/0/attn/q_proj": (["fsdp", "tensor", None], (32, 4, 8)),
        "layers/1/attn/k_proj": (["fsdp", "tensor", None], (32, 2, 8)),
        "layers/0/attn/o_proj": (["tensor", None, "fsdp"], (4, 8, 32)),
        "layers/1/mlp/gate": (["fsdp", "tensor"], (32, 48)),
        "layers/0/mlp/down": (["tensor", "fsdp"], (48, 32)),
        "final_norm/scale": ([None], (64,)),
        "layers/0/attn/q_norm/scale": ([None], (8,)),
    },
}


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("mesh", list(MESHES))
def test_sharded_load_gives_the_unsharded_logits(records, family, mesh):
    record = records(family)
    _, mask = _ids_and_mask()
    single = np.asarray(record[f"{family}/logits"])[mask]
    sharded = np.asarray(record[f"{family}/{mesh}/logits"])[mask]
    assert np.abs(single).max() > 1.0
    # Sharded matmuls sum in another order: equal to float32 rounding, not bitwise.
    np.testing.assert_allclose(sharded, single, atol=1e-5, rtol=0)


def _trim(spec: list) -> list:
    # Arrays report their PartitionSpec without trailing (replicated) entries.
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return spec


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("mesh", list(MESHES))
def test_each_parameter_is_placed_by_the_rules(records, family, mesh):
    record = records(family)
    prefix = f"{family}/{mesh}/param/"
    params = {k[len(prefix) :]: v for k, v in record.items() if k.startswith(prefix)}
    for path, (spec, shard) in EXPECTED[mesh].items():
        if path not in params:  # lm_head / q_norm exist in one family only
            assert family == "gemma2" and path in ("lm_head", "layers/0/attn/q_norm/scale")
            continue
        got = params[path]
        assert got["spec"] == _trim(spec), path
        assert got["shard_shapes"] == [list(shard)], path
    for path, got in params.items():
        assert got["devices"] == 8 and got["equal"], path
        assert tuple(got["mesh"]) == MESHES[mesh]
        # No device holds a whole weight that the rules split (norms are the only replicas).
        (shard,) = got["shard_shapes"]
        if path.endswith("scale"):
            assert got["spec"] == [] and shard == got["shape"], path
        else:
            assert np.prod(shard) * 4 <= np.prod(got["shape"]), path


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("mesh", list(MESHES))
def test_each_device_reads_only_its_slice(records, family, mesh):
    record = records(family)
    # Each device reads its own slice of the memory-mapped (index-sharded) checkpoint, never a
    # whole tensor that the rules split: in total one copy per replica along the data axis.
    reads = record[f"{family}/{mesh}/reads"]
    replicas = MESHES[mesh][0]
    assert "model.layers.0.self_attn.q_proj.weight" in reads
    for tensor, got in reads.items():
        if "norm" in tensor:  # fully replicated: jax reads it once for all eight devices
            assert got["reads"] == [got["full"]], tensor
        else:  # every weight here is split over both fsdp and tensor
            assert len(got["reads"]) == 8, tensor
            assert max(got["reads"]) * 4 <= got["full"], tensor
            assert sum(got["reads"]) == replicas * got["full"], tensor


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("mesh", list(MESHES))
def test_lora_adapters_shard_like_their_base_weight(records, family, mesh):
    record = records(family)
    # A over the base weight's input axes, B over its output axes, the rank replicated.
    prefix = f"{family}/{mesh}/lora/"
    lora = {k[len(prefix) :]: _trim(v) for k, v in record.items() if k.startswith(prefix)}
    assert lora == {
        "attn.a": ["fsdp"],
        "attn.b": [None, "tensor"],
        "mlp.a": ["tensor"],
        "mlp.b": [None, "fsdp"],
    }


# --- single device -----------------------------------------------------------------------------


def test_round_trip_is_bit_exact_in_bfloat16(tmp_path):
    cfg = CONFIGS["gemma2"].replace(param_dtype="bfloat16", dtype="bfloat16")
    model = random_model(cfg)
    files = save_pretrained(model, tmp_path, extra_config={"eos_token_id": 1, "pad_token_id": 0})
    assert files == ["model.safetensors"]
    # Weights are as readable as config.json (plain files under the umask, not private temps).
    mode = lambda name: (tmp_path / name).stat().st_mode & 0o777
    assert mode("model.safetensors") == mode("config.json")
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["model_type"], config["torch_dtype"], config["eos_token_id"]) == (
        "gemma2",
        "bfloat16",
        1,
    )
    assert load_config(tmp_path) == cfg
    back = from_pretrained(tmp_path)
    assert back.cfg == cfg
    for path, value in _params(back).items():
        assert value.dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(
            np.asarray(value).view(np.uint16), np.asarray(_params(model)[path]).view(np.uint16)
        )
    ids, mask = _ids_and_mask()
    np.testing.assert_array_equal(
        np.asarray(_logits(back, ids, mask)), np.asarray(_logits(model, ids, mask))
    )


def test_safetensors_format_matches_the_reference_library(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = random_model(CONFIGS["qwen3"])
    save_pretrained(model, tmp_path)
    theirs = load_file(tmp_path / "model.safetensors")
    ours = safetensors_io.open_checkpoint(tmp_path)
    assert theirs.keys() == ours.keys() and "lm_head.weight" in theirs
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name], name)
    # And we read what the library writes (f16 and int tensors, odd shapes, a scalar).
    arrays = {
        "a": np.arange(12, dtype=np.float16).reshape(3, 4),
        "b": np.array([[1, -2, 3]], dtype=np.int64),
        "c": np.array(2.5, np.float32),
        "d": np.zeros((0, 3), np.float32),
    }
    save_file(arrays, tmp_path / "lib.safetensors")
    read = safetensors_io.open_file(tmp_path / "lib.safetensors")
    for name, array in arrays.items():
        assert read[name].dtype == array.dtype
        np.testing.assert_array_equal(read[name], array)


def test_resaving_with_other_shards_removes_the_stale_files(tmp_path):
    model = random_model(CONFIGS["qwen3"])
    sharded = save_pretrained(model, tmp_path, max_shard_bytes=20_000)
    assert len(sharded) > 3 and (tmp_path / "model.safetensors.index.json").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(sharded)
    assert save_pretrained(model, tmp_path) == ["model.safetensors"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["config.json", "model.safetensors"]
    assert from_pretrained(tmp_path).cfg == model.cfg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_pretrained(random_model(CONFIGS["qwen3"]), path)
    return path


def _copy(src, dst, tensors=None, config=None):
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(cfg) if config else cfg))
    arrays = {k: np.asarray(v) for k, v in safetensors_io.open_checkpoint(src).items()}
    if tensors:
        arrays = tensors(arrays)
    entries = [(k, v.shape, v.dtype, lambda v=v: v) for k, v in arrays.items()]
    safetensors_io.write_checkpoint(dst, entries, max_shard_bytes=10**9)
    return dst


def test_errors_name_what_is_wrong(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="No config.json"):
        from_pretrained(tmp_path)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((checkpoint / "config.json").read_text())
    (no_weights / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin.*safe_serialization"):
        from_pretrained(no_weights)

    unknown = _copy(checkpoint, tmp_path / "unknown", config=lambda c: {**c, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        from_pretrained(unknown)

    def edit(arrays):
        arrays.pop("model.layers.1.mlp.up_proj.weight")
        arrays["model.layers.0.self_attn.q_proj.weight"] = np.zeros((64, 63), np.float32)
        arrays["model.extra.weight"] = np.zeros(3, np.float32)
        return arrays

    broken = _copy(checkpoint, tmp_path / "broken", tensors=edit)
    with pytest.raises(ValueError) as err:
        from_pretrained(broken)
    msg = str(err.value)
    assert str(broken) in msg
    assert "missing keys ['model.layers.1.mlp.up_proj.weight']" in msg
    assert "unexpected keys ['model.extra.weight']" in msg
    assert "model.layers.0.self_attn.q_proj.weight: got (64, 63), expected (64, 64)" in msg
    # An override that changes a weight's shape fails naming the tensor.
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight: got \(128, 64\), expected"):
        from_pretrained(checkpoint, vocab_size=256)
    with pytest.raises(ValueError, match="not a dtype"):
        from_pretrained(checkpoint, dtype="floaty")

    truncated = _copy(checkpoint, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        from_pretrained(truncated)

    missing_shard = _copy(checkpoint, tmp_path / "missing_shard")
    (missing_shard / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        from_pretrained(missing_shard)

    with pytest.raises(ValueError, match="architecture keys \\['vocab_size'\\]"):
        save_pretrained(from_pretrained(checkpoint), tmp_path / "x", extra_config={"vocab_size": 9})
