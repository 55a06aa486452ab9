"""models/hf.py and models/pretrained.py against transformers, for the Llama, Qwen2, Qwen3 and
Gemma-2 families: a tiny random HF model is saved with HF's own `save_pretrained` and loaded with
our `from_pretrained`; logits and greedy generation must match token for token, and our
`save_pretrained` must give a directory that transformers loads back to the same logits.

The HF weights are re-drawn at O(1) scale (norm scales and biases too) so that a wrong axis,
a missing bias or a wrong RoPE convention moves logits by far more than the 1e-4 tolerance;
`test_tolerance_discriminates` checks that it does. Gemma-2's window (8) is shorter than the
test sequences (40) and its soft-caps are small enough to bend the scores, so the sliding
window and both caps change the logits (checked there too).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models import Transformer, from_pretrained, get_config, hf, save_pretrained  # noqa: E402
from rl_reason.rollout.sampling import SamplingConfig, sample  # noqa: E402

pytestmark = pytest.mark.ref

VOCAB = 128
ATOL = 1e-4
SHAPE = (3, 40)
WINDOW = 8


@dataclasses.dataclass(frozen=True)
class Variant:
    family: str  # "llama" | "qwen2" | "qwen3" | "gemma2"
    tied: bool
    llama3: bool = False


VARIANTS = {
    "llama-untied": Variant("llama", tied=False),
    "llama-tied": Variant("llama", tied=True),
    # original_max_position_embeddings 16 puts some of the 8 frequencies in each of the
    # kept / smoothed / divided bands of the llama3 rule for the 40-token sequences below.
    "llama3-rope": Variant("llama", tied=False, llama3=True),
    "qwen2-tied": Variant("qwen2", tied=True),
    "qwen2-untied": Variant("qwen2", tied=False),
    "qwen3-tied": Variant("qwen3", tied=True),
    "qwen3-untied": Variant("qwen3", tied=False),
    "gemma2-tied": Variant("gemma2", tied=True),
    "gemma2-untied": Variant("gemma2", tied=False),
}
GEMMA2 = dict(
    sliding_window=WINDOW,
    # Not head_dim (16), so that using 1/sqrt(head_dim) instead would show.
    query_pre_attn_scalar=24,
    attn_logit_softcapping=5.0,
    final_logit_softcapping=10.0,
    hidden_activation="gelu_pytorch_tanh",
)


def _hf_model(v: Variant, seed: int = 0):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        tie_word_embeddings=v.tied,
        attn_implementation="eager",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    if v.family == "llama":
        rope = dict(rope_theta=10_000.0)
        if v.llama3:
            rope = dict(
                rope_theta=500_000.0,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
            )
        config = transformers.LlamaConfig(**common, **rope)
    elif v.family == "qwen2":
        config = transformers.Qwen2Config(**common, rope_theta=1_000_000.0)
    elif v.family == "qwen3":
        config = transformers.Qwen3Config(**common, rope_theta=1_000_000.0)
    else:
        config = transformers.Gemma2Config(**common, **GEMMA2)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed)
    # A tied head scores the input token's own embedding highest unless the embeddings are
    # small next to what the layers add: shrink them, and scale the final norm back up.
    embed_std, head_gain = (0.2, 5.0) if v.tied else (1.0, 1.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name == "model.norm.weight":
                p.copy_(head_gain * (1.0 + 0.3 * noise))
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.5 * noise)
            elif "embed_tokens" in name or name.startswith("lm_head"):
                p.copy_(embed_std * noise)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """name -> (variant, HF model, our model loaded from the HF-saved directory, that dir)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            v = VARIANTS[name]
            ref = _hf_model(v)
            directory = tmp_path_factory.mktemp(name)
            ref.save_pretrained(directory)
            cache[name] = v, ref, from_pretrained(directory), directory
        return cache[name]

    return get


@pytest.fixture(params=list(VARIANTS))
def pair(request, pairs):
    return pairs(request.param)[:3]


def _abstract(cfg) -> Transformer:
    # Loading into an abstract model skips the random init (seconds of eager compiles here).
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


@nnx.jit
def _logits(model, ids, mask):
    return model(ids, mask_BT=mask)


def _ours(model, ids, mask=None):
    assert ids.shape == SHAPE  # one compiled forward per variant keeps the module fast
    mask = np.ones(ids.shape, bool) if mask is None else mask
    return np.asarray(_logits(model, jnp.asarray(ids), jnp.asarray(mask)))


def _theirs(model, ids, mask=None):
    with torch.inference_mode():
        if mask is None:
            return model(torch.as_tensor(ids)).logits.numpy()
        m = torch.as_tensor(mask.astype(np.int64))
        positions = (m.cumsum(-1) - 1).clamp(min=0)
        return model(torch.as_tensor(ids), attention_mask=m, position_ids=positions).logits.numpy()


def _random_ids(shape, seed=0):
    return np.random.default_rng(seed).integers(1, VOCAB, shape).astype(np.int32)


def test_config_from_hf_reads_the_family(pair):
    v, _, ours = pair
    cfg = ours.cfg
    assert (cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (64, 4, 2, 16)
    assert cfg.qkv_bias == (v.family == "qwen2")
    assert cfg.qk_norm == (v.family == "qwen3")
    assert cfg.tie_embeddings == v.tied
    assert (cfg.param_dtype, cfg.dtype) == ("float32", "float32")
    assert (
        cfg.rope_theta
        == {
            "llama": 500_000.0 if v.llama3 else 10_000.0,
            "qwen2": 1_000_000.0,
            "qwen3": 1_000_000.0,
            "gemma2": 10_000.0,
        }[v.family]
    )
    assert cfg.rope_llama3_scaling == ((8.0, 1.0, 4.0, 16) if v.llama3 else None)
    gemma = v.family == "gemma2"
    assert cfg.mlp_activation == ("gelu_tanh" if gemma else "silu")
    assert cfg.norm_scale_plus_one == cfg.scale_embeddings == cfg.post_norms == gemma
    if gemma:
        assert (cfg.sliding_window, cfg.sliding_window_every) == (WINDOW, 2)
        assert [cfg.layer_window(i) for i in range(2)] == [WINDOW, None]  # HF: layer 0 slides
        assert (cfg.attn_logit_softcap, cfg.final_logit_softcap) == (5.0, 10.0)
        assert cfg.query_scale == pytest.approx(24**-0.5)
    else:
        assert cfg.sliding_window is cfg.attn_logit_softcap is cfg.final_logit_softcap is None


def test_logits_match(pair):
    _, ref, ours = pair
    ids = _random_ids(SHAPE)
    expected = _theirs(ref, ids)
    assert np.abs(expected).max() > 1.0  # the weights are at a scale where mistakes show
    np.testing.assert_allclose(_ours(ours, ids), expected, atol=ATOL, rtol=0)


def test_left_padded_logits_match(pair):
    _, ref, ours = pair
    ids = _random_ids(SHAPE, seed=1)
    lengths = np.array([40, 23, 5])
    mask = np.arange(40)[None, :] >= (40 - lengths)[:, None]
    ids = np.where(mask, ids, 0)
    got, expected = _ours(ours, ids, mask), _theirs(ref, ids, mask)
    np.testing.assert_allclose(got[mask], expected[mask], atol=ATOL, rtol=0)
    # A padded row's real positions equal the same prompt run alone.
    alone = _theirs(ref, ids[2:, -5:])
    np.testing.assert_allclose(got[2, -5:], alone[0], atol=ATOL, rtol=0)


# Decoding runs the same projections as the full forward; one variant per family takes tied and
# untied heads, llama3 RoPE, QK-norm, soft-caps and the sliding window (9 + 32 tokens > 8)
# through the cache path without compiling the sampler nine times.
@pytest.mark.parametrize("name", ["llama3-rope", "qwen2-tied", "qwen3-untied", "gemma2-tied"])
def test_greedy_generation_matches(name, pairs):
    _, ref, ours, _ = pairs(name)
    new = 32
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(1, VOCAB, n)) for n in (9, 4, 9)]
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    with torch.inference_mode():
        out = ref.generate(
            torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
        )
    expected = out[:, width:].numpy()
    # Our sampler pads prompts to a bucketed width: padding must not change the result either.
    got = sample(
        ours,
        prompts,
        jax.random.key(0),
        group_size=1,
        max_new_tokens=new,
        config=SamplingConfig(temperature=0.0),
    )
    assert expected.shape == (3, new)
    np.testing.assert_array_equal(np.asarray(got.tokens)[:, :new], expected)
    assert len(np.unique(expected)) > 4  # not one repeated token


def test_export_round_trip(pair):
    v, ref, ours = pair
    exported = hf.to_hf_state_dict(ours)
    original = {k: t.numpy() for k, t in ref.state_dict().items()}
    if v.tied:
        assert "lm_head.weight" not in exported
        original.pop("lm_head.weight")
    assert exported.keys() == original.keys()
    for k in original:
        np.testing.assert_array_equal(exported[k], original[k], err_msg=k)

    fresh = _hf_model(v, seed=7)
    result = fresh.load_state_dict({k: torch.tensor(a) for k, a in exported.items()}, strict=False)
    assert list(result.unexpected_keys) == []
    assert list(result.missing_keys) == (["lm_head.weight"] if v.tied else [])
    ids = _random_ids((2, 16), seed=3)
    np.testing.assert_allclose(_theirs(fresh, ids), _theirs(ref, ids), atol=0, rtol=0)


@pytest.mark.parametrize(
    "name, max_shard_bytes",
    [("llama3-rope", None), ("qwen2-tied", None), ("qwen3-tied", 40_000), ("gemma2-untied", None)],
)
def test_save_pretrained_loads_in_transformers(name, max_shard_bytes, pairs, tmp_path):
    v, ref, ours, _ = pairs(name)
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    files = save_pretrained(ours, tmp_path, **kwargs)
    if max_shard_bytes is None:
        assert files == ["model.safetensors"]
    else:
        assert len(files) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [type(ref).__name__]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(back) is type(ref)
    assert back.config.tie_word_embeddings == v.tied
    if v.family == "gemma2":
        assert back.config.layer_types == ref.config.layer_types
        assert back.config.query_pre_attn_scalar == 24
    ids = _random_ids((2, 16), seed=5)
    np.testing.assert_array_equal(_theirs(back, ids), _theirs(ref, ids))


def test_hf_sharded_checkpoint_loads(pairs, tmp_path):
    _, ref, single, _ = pairs("gemma2-untied")
    ref.save_pretrained(tmp_path, max_shard_size="30KB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    assert not (tmp_path / "model.safetensors").exists()
    sharded = from_pretrained(tmp_path)
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(single)), nnx.to_flat_state(nnx.state(sharded)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), path)


def test_tolerance_discriminates(pair):
    """Plausible mapping mistakes move logits far beyond ATOL, so the parity checks can fail."""
    v, ref, ours = pair
    ids = _random_ids(SHAPE, seed=4)
    expected = _theirs(ref, ids)
    sd = {k: t.clone() for k, t in ref.state_dict().items()}
    # Interleaved instead of half-split RoPE = permuting q and k within each head identically.
    perm = np.concatenate([np.arange(0, 16, 2), np.arange(1, 16, 2)])
    for name, heads in (("q_proj", 4), ("k_proj", 2)):
        for layer in range(2):
            key = f"model.layers.{layer}.self_attn.{name}.weight"
            w = sd[key].reshape(heads, 16, 64)
            sd[key] = w[:, perm].reshape(heads * 16, 64)
    wrong = _abstract(ours.cfg)
    hf.load_hf_state_dict(wrong, sd)
    assert np.abs(_ours(wrong, ids) - expected).max() > 100 * ATOL
    # Each family feature, switched off or set wrong, changes the logits.
    cfg = ours.cfg
    mistakes = []
    if v.llama3:
        mistakes.append(cfg.replace(rope_llama3_scaling=None))
    if v.family == "gemma2" and v.tied:  # one Gemma-2 variant: seven compiles each
        mistakes += [
            cfg.replace(sliding_window=None),
            cfg.replace(sliding_window_every=1),  # both layers sliding
            cfg.replace(attn_logit_softcap=None),
            cfg.replace(final_logit_softcap=None),
            cfg.replace(query_scale=None),
        ]
    for mistake in mistakes:
        model = _abstract(mistake)
        hf.load_hf_state_dict(model, ref.state_dict())
        assert np.abs(_ours(model, ids) - expected).max() > 100 * ATOL, mistake
    if v.family == "gemma2" and v.tied:
        # erf GELU for the tanh approximation is a subtler slip; still well past the tolerance.
        model = _abstract(cfg.replace(mlp_activation="gelu"))
        hf.load_hf_state_dict(model, ref.state_dict())
        assert np.abs(_ours(model, ids) - expected).max() > 10 * ATOL
    if v.family == "qwen3":  # the q/k norm weights are used, not just loaded
        model = _abstract(cfg)
        hf.load_hf_state_dict(model, ref.state_dict())
        for block in model.layers:
            block.attn.q_norm.scale.set_value(jnp.ones(16))
        assert np.abs(_ours(model, ids) - expected).max() > 100 * ATOL


def test_gemma2_norm_names_are_not_llamas(pairs):
    """Gemma-2's post_attention_layernorm is the norm after attention, not the MLP's pre-norm."""
    _, ref, ours, _ = pairs("gemma2-tied")
    sd = dict(ref.state_dict())
    for i in range(2):
        post_attn = f"model.layers.{i}.post_attention_layernorm.weight"
        pre_mlp = f"model.layers.{i}.pre_feedforward_layernorm.weight"
        sd[post_attn], sd[pre_mlp] = sd[pre_mlp], sd[post_attn]
    swapped = _abstract(ours.cfg)
    hf.load_hf_state_dict(swapped, sd)
    ids = _random_ids(SHAPE, seed=6)
    assert np.abs(_ours(swapped, ids) - _theirs(ref, ids)).max() > 100 * ATOL


def test_bfloat16_weights_load_bit_exact(tmp_path):
    ref = _hf_model(VARIANTS["gemma2-untied"]).to(torch.bfloat16)
    ref.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert (ours.cfg.param_dtype, ours.cfg.dtype) == ("bfloat16", "bfloat16")
    exported = hf.to_hf_state_dict(ours)
    assert exported.keys() == ref.state_dict().keys()
    for k, t in ref.state_dict().items():
        assert exported[k].dtype == jnp.bfloat16
        np.testing.assert_array_equal(exported[k].astype(np.float32), t.float().numpy(), k)
    # Computing in float32 from bfloat16 storage: the checkpoint's dtype stays the param dtype.
    wide = from_pretrained(tmp_path, dtype=jnp.float32)
    assert (wide.cfg.param_dtype, wide.cfg.dtype) == ("bfloat16", "float32")
    upcast = from_pretrained(tmp_path, param_dtype="float32", dtype="float32")
    assert upcast.embedding.get_value().dtype == jnp.float32
    np.testing.assert_array_equal(
        np.asarray(upcast.embedding.get_value()),
        ref.state_dict()["model.embed_tokens.weight"].float().numpy(),
    )


def test_gemma_embedding_normaliser_is_rounded_to_the_weight_dtype():
    """HF multiplies bfloat16 embeddings by sqrt(D) rounded to bfloat16 (59.75 for D=3584)."""
    cfg = get_config("gemma-2-2b").replace(
        vocab_size=8, embed_dim=3584, num_layers=1, num_heads=1, num_kv_heads=1, mlp_dim=8
    )
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    model.embedding.set_value(jnp.ones((8, 3584), jnp.bfloat16))
    x = model.embed(jnp.zeros((1, 1), jnp.int32))
    hf_embed = transformers.models.gemma2.modeling_gemma2.Gemma2TextScaledWordEmbedding(
        8, 3584, 0, embed_scale=3584**0.5
    ).to(torch.bfloat16)
    with torch.no_grad():
        hf_embed.weight.fill_(1.0)
        expected = hf_embed(torch.zeros((1, 1), dtype=torch.long)).float().numpy()
    assert float(expected[0, 0, 0]) == 59.75
    np.testing.assert_array_equal(np.asarray(x, np.float32), expected)


PRESET_CONFIGS = {
    "llama-20m": get_config("llama-20m"),
    "llama-3.2-1b": get_config("llama-3.2-1b"),
    "qwen2.5-0.5b": get_config("qwen2.5-0.5b"),
    "gemma-2-2b": get_config("gemma-2-2b"),
    # Qwen3-0.6B's published shape.
    "qwen3-0.6b": get_config("qwen2.5-0.5b").replace(
        embed_dim=1024,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        mlp_dim=3072,
        qkv_bias=False,
        qk_norm=True,
        max_seq_len=40_960,
    ),
}


@pytest.mark.parametrize("preset", list(PRESET_CONFIGS))
def test_hf_config_round_trips_through_transformers(preset):
    cfg = PRESET_CONFIGS[preset]
    d = hf.hf_config(cfg)
    assert hf.config_from_hf(d) == cfg
    # transformers reads our dict (4.x Hub layout) and its own to_dict() maps back to cfg.
    loaded = transformers.AutoConfig.for_model(**d)
    assert type(loaded).__name__ == d["architectures"][0].replace("ForCausalLM", "Config")
    assert hf.config_from_hf(loaded.to_dict()) == cfg


def test_hf_model_from_hf_config_has_our_parameter_count():
    tiny = get_config("tiny").replace(vocab_size=VOCAB)
    gemma = get_config("gemma-2-2b").replace(
        vocab_size=VOCAB, embed_dim=64, num_layers=3, head_dim=16, mlp_dim=96, num_kv_heads=2
    )
    configs = {
        "LlamaForCausalLM": tiny,
        "Qwen2ForCausalLM": tiny.replace(qkv_bias=True, tie_embeddings=False),
        "Qwen3ForCausalLM": tiny.replace(qk_norm=True),
        "Gemma2ForCausalLM": gemma,
    }
    for architecture, cfg in configs.items():
        assert hf.hf_config(cfg)["architectures"] == [architecture]
        hf_cfg = transformers.AutoConfig.for_model(**hf.hf_config(cfg))
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
        assert type(model).__name__ == architecture
        assert model.num_parameters() == cfg.num_params()


def test_gemma2_without_a_window_exports_as_all_global_layers():
    cfg = get_config("gemma-2-2b").replace(
        vocab_size=VOCAB, embed_dim=64, num_layers=2, head_dim=16, mlp_dim=96, num_kv_heads=2
    )
    cfg = cfg.replace(sliding_window=None, max_seq_len=256)
    d = hf.hf_config(cfg)
    assert d["layer_types"] == ["full_attention"] * 2
    assert hf.config_from_hf(d) == cfg
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**d), attn_implementation="eager"
    )
    with torch.inference_mode():
        assert model(torch.zeros((1, 4), dtype=torch.long)).logits.shape == (1, 4, VOCAB)


def _values(model) -> dict:
    return {
        path: np.asarray(v.get_value())
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def test_load_errors_name_the_keys_and_change_nothing(pairs):
    _, ref, ours, _ = pairs("qwen2-untied")
    before = _values(ours)
    sd = dict(_hf_model(VARIANTS["qwen2-untied"], seed=5).state_dict())
    good = dict(sd)
    sd.pop("model.layers.1.self_attn.k_proj.bias")
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"][:, :10]
    sd["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    with pytest.raises(ValueError) as err:
        hf.load_hf_state_dict(ours, sd)
    msg = str(err.value)
    assert "missing keys ['model.layers.1.self_attn.k_proj.bias']" in msg
    assert "unexpected keys ['model.layers.0.self_attn.o_proj.bias']" in msg
    assert "model.layers.0.mlp.up_proj.weight: got (96, 10), expected (96, 64)" in msg
    after = _values(ours)
    for path in before:
        np.testing.assert_array_equal(after[path], before[path])

    # Loading over concrete weights replaces them all (and keeps their placement).
    fresh = from_pretrained(pairs("qwen2-untied")[3])
    devices = {p: v.get_value().sharding for p, v in nnx.to_flat_state(nnx.state(fresh, nnx.Param))}
    hf.load_hf_state_dict(fresh, good)
    for path, v in nnx.to_flat_state(nnx.state(fresh, nnx.Param)):
        assert not np.array_equal(np.asarray(v.get_value()), before[path]), path
        assert v.get_value().sharding == devices[path]
    assert hf.to_hf_state_dict(fresh).keys() == good.keys()

    # Tied config: an lm_head that is not the embedding is refused rather than dropped.
    tied = _abstract(ours.cfg.replace(tie_embeddings=True))
    with pytest.raises(ValueError, match="lm_head.weight: the config ties"):
        hf.load_hf_state_dict(tied, ref.state_dict())
    # Qwen3 without its q/k norms is named tensor by tensor.
    qwen3 = pairs("qwen3-tied")[1].state_dict()
    no_norms = {k: v for k, v in qwen3.items() if "_norm." not in k or "layers.1" not in k}
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.self_attn.k_norm"):
        hf.load_hf_state_dict(_abstract(pairs("qwen3-tied")[2].cfg), no_norms)


def test_unsupported_configs_are_refused():
    tiny = get_config("tiny")
    # Each config has no HF architecture that computes the same function.
    for cfg in (
        tiny.replace(post_norms=True),  # Gemma-2 needs (1 + w) norms and embedding scaling
        tiny.replace(query_scale=0.5),  # only Gemma-2 has query_pre_attn_scalar
        tiny.replace(final_logit_softcap=30.0),
        tiny.replace(qk_norm=True, qkv_bias=True),
        tiny.replace(sliding_window=16),
    ):
        with pytest.raises(ValueError, match="no Hugging Face equivalent"):
            hf.hf_config(cfg)
    with pytest.raises(ValueError, match="model_type 'mistral' is not supported"):
        hf.config_from_hf({"model_type": "mistral"})
    llama = hf.hf_config(get_config("llama-20m"))
    qwen3 = hf.hf_config(PRESET_CONFIGS["qwen3-0.6b"])
    gemma = hf.hf_config(get_config("gemma-2-2b"))
    refused = {
        "attention_bias": {**llama, "attention_bias": True},
        "'yarn'": {**llama, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
        "use_sliding_window": {**qwen3, "use_sliding_window": True, "sliding_window": 64},
        "only full_attention": {**qwen3, "layer_types": ["sliding_attention"] * 28},
        "o_proj": {**qwen3, "attention_bias": True},
        "not every k-th layer": {
            **gemma,
            "layer_types": ["full_attention", "sliding_attention"] * 13,
        },
        "'relu'": {**gemma, "hidden_activation": "relu"},
        "causal": {**gemma, "use_bidirectional_attention": True},
    }
    for match, d in refused.items():
        with pytest.raises(ValueError, match=match):
            hf.config_from_hf(d)
    # Gemma-2 checkpoints written before transformers had layer_types slide on even layers.
    old = {k: v for k, v in gemma.items() if k != "layer_types"}
    assert hf.config_from_hf(old) == get_config("gemma-2-2b")
    every_third = ["sliding_attention", "full_attention", "full_attention"] * 9
    cfg = hf.config_from_hf({**gemma, "layer_types": every_third[:26]})
    assert cfg.sliding_window_every == 3
    assert [i for i in range(26) if cfg.layer_window(i)] == list(range(0, 26, 3))
