"""The published recipes (rl_reason/pipelines/recipe.py and the modules it is built from,
experiments/configs/*_qwen2_5_*.py).

Fast: prompts, bos handling and stop tokens against chat templates with and without a bos,
config sections that refuse bad values, and the tiny models of every family loading as they
were written (and, ref-marked, in transformers).

Slow: the :smoke variants of the GSM8K and countdown recipes run their 2 GRPO steps end to end
on tiny random Qwen2-family models (embedding rows padded past the vocabulary, as Qwen's are);
a LoRA run trains the adapters only, its merged export is base + (alpha / r) A B exactly where
the adapters are and the base bit for bit elsewhere, and it reproduces the adapted policy's
logits (and transformers' from the exported directory); a run stopped after step 1 resumes to
the same step-2 metrics and weights as an uninterrupted run.
"""

import json
import shutil
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from experiments.configs import countdown_qwen2_5_3b, gsm8k_qwen2_5_0_5b, math_qwen2_5_math_1_5b
from models import from_pretrained
from models.safetensors_io import open_checkpoint
from rl_reason.infra import launch, sharding
from rl_reason.infra.metrics import read_jsonl
from rl_reason.infra.tokenizer import TextTokenizer, load_tokenizer, train_sentencepiece
from rl_reason.pipelines import (
    chat_task,
    model_path,
    recipe,
    recipe_data,
    recipe_options,
    tiny_model,
)
from rl_reason.pipelines import evaluate as evaluate_run
from rl_reason.rollout.rounds import Rounds

TINY_TEXTS = [
    "Natalia sold clips to 48 of her friends in April, and then half as many in May.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "<think> 3 + 4 = 7 </think> <answer> 7 </answer>",
] * 20
# The Hugging Face names of the weights models.lora adapts (q, k, v, o, gate, up, down).
HF_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Metrics that depend only on the computation, not on wall-clock time.
EXACT_METRICS = (
    "reward_mean",
    "reward_std",
    "accuracy",
    "response_length_mean",
    "truncated_frac",
    "loss",
    "grad_norm",
    "kl_ref",
    "entropy",
    "clip_frac_low",
    "ratio_mean",
)


IDS = np.arange(30, dtype=np.int32).reshape(2, 15) * 11 % 512


def _smoke(module, workdir, **overrides) -> ml_collections.ConfigDict:
    config = module.get_config("smoke")
    with config.unlocked():
        config.workdir = str(workdir)
        for section, values in overrides.items():
            config[section].update(values)
    return config


def _logits(model, ids) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids)))


# -- fast ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model.build_tiny_model(
        tmp_path_factory.mktemp("tiny") / "qwen2", "qwen2", TINY_TEXTS
    )


def _bos_tokenizer(directory, *, template_has_bos: bool):
    """A byte-level BPE tokenizer with bos <s> and eos </s> (Llama-like) and a chat template
    that writes the bos itself or not."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<|eot|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_TEXTS, trainer)
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    template = (
        ("{{ bos_token }}" if template_has_bos else "")
        + "{% for m in messages %}[{{ m.role }}] {{ m.content }}<|eot|>{% endfor %}"
        + "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(directory)


@pytest.mark.parametrize("template_has_bos", [True, False])
def test_chat_prompts_are_encoded_as_the_template_wrote_them(tmp_path, template_has_bos):
    tokenizer = _bos_tokenizer(tmp_path / "tok", template_has_bos=template_has_bos)
    task = recipe_data.make_task(gsm8k_qwen2_5_0_5b.get_config())
    options = recipe_options.PromptOptions(format="chat", system="Be brief.", suffix=" Reason.")
    encoder, chatted = chat_task.prompting(tokenizer, task, options)
    text = chatted.prompt({"question": "What is 3 + 4?"})
    bos = "<s>" if template_has_bos else ""
    assert text == f"{bos}[system] Be brief.<|eot|>[user] What is 3 + 4? Reason.<|eot|>[assistant] "
    # The template decides: one bos if it wrote one, else none. The chat task tells the
    # trainer to add none (the rounds' prompt encoding, called on a stand-in).
    assert encoder is tokenizer and chatted.prompt_add_bos is False
    stand_in = types.SimpleNamespace(
        tokenizer=encoder, task=chatted, cfg=types.SimpleNamespace(max_prompt_len=512)
    )
    (ids,) = Rounds.encode_prompts(stand_in, [{"question": "What is 3 + 4?"}])
    assert ids == tokenizer.encode(text)
    assert ids.count(tokenizer.bos_id) == int(template_has_bos)
    assert (ids[0] == tokenizer.bos_id) == template_has_bos
    # The plain format keeps the trainer's bos (for base models that were trained with one).
    encoder, plain_task = chat_task.prompting(tokenizer, task, recipe_options.PromptOptions())
    assert plain_task is task and encoder is tokenizer
    plain = types.SimpleNamespace(tokenizer=encoder, task=plain_task, cfg=stand_in.cfg)
    (ids,) = Rounds.encode_prompts(plain, [{"question": "What is 3 + 4?"}])
    assert ids[0] == tokenizer.bos_id
    # Stop tokens: eos and the template's end of turn (chat); eos alone when </answer> is not
    # one token (r1_zero).
    eot = tokenizer.piece_to_id("<|eot|>")
    assert chat_task.stop_token_ids(tokenizer, "chat") == (tokenizer.eos_id, eot)
    assert chat_task.stop_token_ids(tokenizer, "r1_zero") == (tokenizer.eos_id,)


def test_both_tokenizer_kinds_have_every_member_of_the_protocol(tiny_dir, tmp_path):
    members = {n for n in vars(TextTokenizer) if not n.startswith("_")}
    members |= set(TextTokenizer.__annotations__)
    assert {"encode_batch", "decode", "eos_id", "chat_template"} <= members
    spm = train_sentencepiece(TINY_TEXTS * 20, tmp_path / "spm", vocab_size=64)
    for tokenizer in (load_tokenizer(tiny_dir), spm):
        missing = {n for n in members if not hasattr(type(tokenizer), n)} - set(vars(tokenizer))
        assert not missing, (type(tokenizer).__name__, missing)


def test_tiny_tokenizer_chatml_stops_and_padded_rows(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    eos, im_end = tokenizer.piece_to_id("<|endoftext|>"), tokenizer.piece_to_id("<|im_end|>")
    assert tokenizer.eos_id == eos and tokenizer.chat_template
    assert chat_task.chat_end_token(tokenizer) == im_end
    assert chat_task.stop_token_ids(tokenizer, "chat") == (eos, im_end)
    assert chat_task.stop_token_ids(tokenizer, "r1_zero") == (eos,)
    assert tokenizer.vocab_size == tiny_model.TINY_VOCAB
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["vocab_size"] == tiny_model.TINY_EMBEDDING_ROWS > tokenizer.vocab_size
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is True
    chat = chat_task.ChatTask(recipe_data.make_task(gsm8k_qwen2_5_0_5b.get_config()), tokenizer)
    assert chat.prompt({"question": "2 + 2?"}) == (
        "<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen_boxed_prompt_of_the_gsm8k_recipe(tiny_dir):
    """The SimpleRL-Zoo prompt, rendered by a ChatML template, is Qwen2.5-Math's qwen-boxed."""
    config = gsm8k_qwen2_5_0_5b.get_config()
    _, prompt, _, _ = recipe_options.sections(config)
    _, task = chat_task.prompting(load_tokenizer(tiny_dir), recipe_data.make_task(config), prompt)
    assert task.prompt({"question": "Q?"}) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nQ?\nPlease reason step by step, and put your final answer within "
        "\\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_recipe_configs_are_complete_and_checked():
    assert launch.pipeline("recipe") is recipe.run
    for module in (gsm8k_qwen2_5_0_5b, math_qwen2_5_math_1_5b, countdown_qwen2_5_3b):
        for arg in (None, "smoke"):
            config = module.get_config(arg)
            assert config.pipeline == "recipe"
            recipe_options.sections(config)  # every section maps onto its dataclass
            recipe_data.make_task(config)
    with pytest.raises(ValueError, match="exactly one of path"):
        recipe_options.ModelOptions(path="/ckpt/x", tiny="qwen2")
    with pytest.raises(ValueError, match="exactly one of path"):
        recipe_options.ModelOptions()
    with pytest.raises(ValueError, match="tiny='mamba' is not one of"):
        recipe_options.ModelOptions(tiny="mamba")
    with pytest.raises(ValueError, match="chat format only"):
        recipe_options.PromptOptions(format="r1_zero", system="x")
    with pytest.raises(ValueError, match="needs its own eval_data_dir"):
        recipe_options.DataOptions(manual_dir="/a", eval_manual_dir="/b")
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\^16\]"):
        recipe_options.LoraOptions(rank=-1).lora_config()
    data = recipe_options.DataOptions(data_dir="{workdir}/tfds").in_workdir("/runs/x")
    assert data.data_dir == "/runs/x/tfds" and data.eval_dir == "/runs/x/tfds"
    config = gsm8k_qwen2_5_0_5b.get_config()
    with config.unlocked():
        config.model.path = "/nonexistent/Qwen2.5-0.5B"
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model directory"):
        recipe.setup(config, mesh=None)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {
        f: tiny_model.build_tiny_model(root / f, f, TINY_TEXTS, seed=1)
        for f in tiny_model.TINY_FAMILIES
    }


@pytest.mark.parametrize("family", sorted(tiny_model.TINY_FAMILIES))
def test_tiny_models_of_every_family_load_back(family_dirs, family):
    directory = family_dirs[family]
    model = from_pretrained(directory)
    assert json.loads((directory / "config.json").read_text())["model_type"] == family
    logits = _logits(model, IDS)
    assert logits.shape == (2, 15, tiny_model.TINY_EMBEDDING_ROWS) and np.isfinite(logits).all()
    eos = load_tokenizer(directory).eos_id
    # The sharpened eos row: eos is likelier than an average token, not certain.
    probs = jax.nn.softmax(logits, axis=-1)
    assert 1 / tiny_model.TINY_EMBEDDING_ROWS < float(probs[..., eos].mean()) < 0.5


@pytest.mark.ref
@pytest.mark.parametrize("family", sorted(tiny_model.TINY_FAMILIES))
def test_tiny_models_of_every_family_match_transformers(family_dirs, family):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(family_dirs[family]).eval()
    with torch.no_grad():
        ref = theirs(torch.as_tensor(IDS, dtype=torch.long)).logits.numpy()
    ours = _logits(from_pretrained(family_dirs[family]), IDS)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


# -- slow: end-to-end smoke runs ----------------------------------------------------------------


def _check_run(workdir, summary, config):
    assert summary["preempted"] is False and summary["rl_steps"] == 2
    rows = read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    # The overlong penalty gives an untrained model's groups reward variance: both steps update.
    assert all(r["grad_norm"] > 0 and np.isfinite(r["loss"]) for r in rows)
    assert summary["rl_param_change_l2"] > 0
    # RL rewards short completions here, and greedy decoding follows: the policy really moved.
    assert summary["after"]["mean_response_tokens"] < summary["before"]["mean_response_tokens"]
    written = json.loads((workdir / "summary.json").read_text())
    assert written["after"] == summary["after"]
    assert (workdir / "curves.png").stat().st_size > 1000
    export = workdir / recipe.EXPORT_DIR
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in export.iterdir()
    }
    assert from_pretrained(export).cfg == from_pretrained(workdir / model_path.TINY_DIR).cfg
    return rows


@pytest.fixture(scope="module")
def countdown_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("countdown")
    config = _smoke(countdown_qwen2_5_3b, workdir)
    return config, workdir, recipe.run(config)


@pytest.mark.slow
def test_countdown_smoke(countdown_run):
    config, workdir, summary = countdown_run
    _check_run(workdir, summary, config)
    # Plain R1-Zero prompts; "</answer>" is several tokens in this tokenizer: eos only.
    assert summary["stop_token_ids"] == [load_tokenizer(workdir / model_path.TINY_DIR).eos_id]
    assert summary["task"] == "countdown" and summary["eval_size"] == 8
    assert summary["num_trained_params"] == summary["num_params"]  # full fine-tuning


@pytest.mark.slow
def test_countdown_resumes_after_step_1_to_the_same_step_2(countdown_run, tmp_path):
    """As if killed after step 1's checkpoint: a copy of the run without step 2 reruns."""
    config, straight, summary = countdown_run
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for name in ("checkpoints/2", "summary.json", "curves.png", recipe.EXPORT_DIR):
        shutil.rmtree(resumed / name) if (resumed / name).is_dir() else (resumed / name).unlink()
    with config.unlocked():
        config.workdir = str(resumed)
    again = recipe.run(config)
    assert again["resumed"] is True and again["before"] == summary["before"]
    assert again["after"] == summary["after"]
    rows = read_jsonl(resumed / "metrics.jsonl")
    rows_straight = read_jsonl(straight / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for key in EXACT_METRICS:
        assert rows[1][key] == rows_straight[1][key], key
    ours, theirs = (open_checkpoint(d / recipe.EXPORT_DIR) for d in (resumed, straight))
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        np.testing.assert_array_equal(np.asarray(ours[name]), np.asarray(theirs[name]), name)


@pytest.mark.slow
def test_gsm8k_smoke(tmp_path):
    summary = recipe.run(_smoke(gsm8k_qwen2_5_0_5b, tmp_path))
    rows = _check_run(tmp_path, summary, None)
    # The recipe samples with the continuous-batching engine: 16 slots, some ending early.
    assert all(0 < r["slot_occupancy"] < 1 for r in rows)
    tokenizer = load_tokenizer(tmp_path / model_path.TINY_DIR)
    ends = [tokenizer.eos_id, tokenizer.piece_to_id("<|im_end|>")]
    assert summary["stop_token_ids"] == ends and summary["eval_size"] == 2


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA math smoke run, and its final adapters restored onto the base from the path."""
    workdir = tmp_path_factory.mktemp("lora")
    config = _smoke(math_qwen2_5_math_1_5b, workdir, lora=dict(rank=4, alpha=8.0))
    summary = recipe.run(config)
    mesh = sharding.make_mesh(sharding.MeshConfig())
    pol, setup, _ = evaluate_run.restore(
        config, evaluate_run.Source(workdir / "checkpoints", 2), mesh
    )
    adapted = nnx.merge(pol.graphdef, pol.params, pol.frozen)
    return workdir, summary, setup, pol.params, adapted


@pytest.mark.slow
def test_lora_run_trains_adapters_only_and_exports_the_adapted_policy(lora_run):
    workdir, summary, setup, adapters, adapted = lora_run
    assert summary["lora"]["rank"] == 4
    assert 0 < summary["num_trained_params"] < summary["num_params"] / 5
    # setup.policy holds freshly initialised adapters (B = 0): training moved every B.
    fresh_b = [v for p, v in nnx.to_flat_state(setup.policy.params) if p[-1] == "b"]
    trained_b = [v for p, v in nnx.to_flat_state(adapters) if p[-1] == "b"]
    assert len(fresh_b) == len(trained_b) > 0
    for f, t in zip(fresh_b, trained_b, strict=True):
        assert not np.any(np.asarray(f.get_value()))
        assert np.abs(np.asarray(t.get_value())).max() > 0
    # The export is the base bit for bit where no adapter is (embedding, norms, biases) and
    # differs where the adapters were folded in.
    base_dir, export_dir = workdir / model_path.TINY_DIR, workdir / recipe.EXPORT_DIR
    base, exported = open_checkpoint(base_dir), open_checkpoint(export_dir)
    assert sorted(base) == sorted(exported)
    for name in base:
        same = np.array_equal(np.asarray(exported[name]), np.asarray(base[name]))
        assert same == (not any(f".{t}.weight" in name for t in HF_LORA_TARGETS)), name
    # ... and computes the adapted policy: the final adapters over the base read from the path
    # (had training touched the base, the two would differ).
    merged = from_pretrained(export_dir)
    np.testing.assert_allclose(_logits(merged, IDS), _logits(adapted, IDS), atol=1e-5, rtol=0)
    assert np.abs(_logits(merged, IDS) - _logits(from_pretrained(base_dir), IDS)).max() > 1e-3


@pytest.mark.slow
@pytest.mark.ref
def test_lora_export_matches_transformers(lora_run):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    workdir, _, _, _, adapted = lora_run
    theirs = transformers.AutoModelForCausalLM.from_pretrained(workdir / recipe.EXPORT_DIR)
    with torch.no_grad():
        ref = theirs.eval()(torch.as_tensor(IDS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(_logits(adapted, IDS), ref, atol=1e-4, rtol=0)
