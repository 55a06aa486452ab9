"""models/hf.py against transformers: tiny random Llama and Qwen2 models, logits and greedy
generation token for token, and the weight mapping both ways.

The HF weights are re-drawn at O(1) scale (norm scales and biases too) so that a wrong axis,
a missing bias or a wrong RoPE convention moves logits by far more than the 1e-4 tolerance;
`test_tolerance_discriminates` checks that it does.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models import Transformer, get_config, hf  # noqa: E402
from rl_reason.sampling import SamplingConfig, sample  # noqa: E402

pytestmark = pytest.mark.ref

VOCAB = 128
ATOL = 1e-4
SHAPE = (3, 40)


@dataclasses.dataclass(frozen=True)
class Variant:
    family: str  # "llama" | "qwen2"
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
}


def _hf_model(v: Variant, seed: int = 0):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
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
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.Qwen2Config(**common, rope_theta=1_000_000.0)
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = cls(config).eval()
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


@functools.cache
def _pair(name: str):
    """(variant, HF model, our model with the HF weights loaded)."""
    v = VARIANTS[name]
    ref = _hf_model(v)
    ours = _abstract(hf.config_from_hf(ref.config))
    hf.load_hf_state_dict(ours, ref.state_dict())
    return v, ref, ours


def _abstract(cfg) -> Transformer:
    # Loading into an abstract model skips the random init (seconds of eager compiles here).
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


@pytest.fixture(params=list(VARIANTS))
def pair(request):
    return _pair(request.param)


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
    assert cfg.tie_embeddings == v.tied
    assert (
        cfg.rope_theta
        == {"llama": 500_000.0 if v.llama3 else 10_000.0, "qwen2": 1_000_000.0}[v.family]
    )
    assert cfg.rope_llama3_scaling == ((8.0, 1.0, 4.0, 16) if v.llama3 else None)


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


# Decoding runs the same projections as the full forward; these two variants take both families,
# tied and untied heads and llama3 RoPE through the cache path without compiling the sampler
# five times.
@pytest.mark.parametrize("name", ["llama3-rope", "qwen2-tied"])
def test_greedy_generation_matches(name):
    _, ref, ours = _pair(name)
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
            max_new_tokens=16,
            min_new_tokens=16,
        )
    expected = out[:, width:].numpy()
    # Our sampler pads to a bucketed width of 16: padding must not change the result either.
    got = sample(
        ours,
        prompts,
        jax.random.key(0),
        group_size=1,
        max_new_tokens=16,
        config=SamplingConfig(temperature=0.0),
    )
    assert expected.shape == (3, 16)
    np.testing.assert_array_equal(np.asarray(got.tokens)[:, :16], expected)
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
    if v.llama3:
        unscaled = _abstract(ours.cfg.replace(rope_llama3_scaling=None))
        hf.load_hf_state_dict(unscaled, ref.state_dict())
        assert np.abs(_ours(unscaled, ids) - expected).max() > 100 * ATOL


def test_bfloat16_weights_load_bit_exact():
    ref = _hf_model(VARIANTS["qwen2-untied"]).to(torch.bfloat16)
    # What save_pretrained writes for these weights (the in-memory config keeps float32).
    cfg = hf.config_from_hf({**ref.config.to_dict(), "dtype": "bfloat16"})
    assert (cfg.param_dtype, cfg.dtype) == ("bfloat16", "bfloat16")
    ours = _abstract(cfg)
    hf.load_hf_state_dict(ours, ref.state_dict())
    exported = hf.to_hf_state_dict(ours)
    for k, t in ref.state_dict().items():
        assert exported[k].dtype == jnp.bfloat16
        np.testing.assert_array_equal(exported[k].astype(np.float32), t.float().numpy(), k)


@pytest.mark.parametrize("preset", ["llama-20m", "llama-3.2-1b", "qwen2.5-0.5b"])
def test_hf_config_round_trips_through_transformers(preset):
    cfg = get_config(preset)
    d = hf.hf_config(cfg)
    assert d["architectures"] == ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"]
    assert hf.config_from_hf(d) == cfg
    # transformers reads our dict (4.x Hub layout) and its own to_dict() maps back to cfg.
    loaded = transformers.AutoConfig.for_model(**d)
    assert hf.config_from_hf(loaded.to_dict()) == cfg


def test_hf_model_from_hf_config_has_our_parameter_count():
    tiny = get_config("tiny").replace(vocab_size=VOCAB)
    for cfg in (tiny, tiny.replace(qkv_bias=True, tie_embeddings=False)):
        hf_cfg = transformers.AutoConfig.for_model(**hf.hf_config(cfg))
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
        assert type(model).__name__ == hf.hf_config(cfg)["architectures"][0]
        assert model.num_parameters() == cfg.num_params()


def _values(model) -> dict:
    return {
        path: np.asarray(v.get_value())
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def test_load_errors_name_the_keys_and_change_nothing():
    ref = _hf_model(VARIANTS["qwen2-untied"])
    ours = _abstract(hf.config_from_hf(ref.config.to_dict()))
    hf.load_hf_state_dict(ours, ref.state_dict())
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
    devices = {p: v.get_value().sharding for p, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    hf.load_hf_state_dict(ours, good)
    for path, v in nnx.to_flat_state(nnx.state(ours, nnx.Param)):
        assert not np.array_equal(np.asarray(v.get_value()), before[path]), path
        assert v.get_value().sharding == devices[path]
    assert hf.to_hf_state_dict(ours).keys() == good.keys()

    # Tied config: an lm_head that is not the embedding is refused rather than dropped.
    tied = _abstract(ours.cfg.replace(tie_embeddings=True))
    with pytest.raises(ValueError, match="lm_head.weight: the config ties"):
        hf.load_hf_state_dict(tied, ref.state_dict())


def test_unsupported_configs_are_refused():
    with pytest.raises(ValueError, match="no Llama/Qwen2 equivalent"):
        hf.hf_config(get_config("gemma-2-2b"))
    with pytest.raises(ValueError, match="model_type 'gemma2' is not supported"):
        hf.config_from_hf({"model_type": "gemma2"})
    d = hf.hf_config(get_config("llama-20m"))
    with pytest.raises(ValueError, match="attention_bias"):
        hf.config_from_hf({**d, "attention_bias": True})
    with pytest.raises(ValueError, match="'yarn'"):
        hf.config_from_hf({**d, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
