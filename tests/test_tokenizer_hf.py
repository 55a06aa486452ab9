"""rl_reason.infra.tokenizer for Hugging Face tokenizer.json files: the same ids, texts,
special ids and
chat-template renderings as transformers' AutoTokenizer, on byte-level BPE tokenizers trained
here with the `tokenizers` library (a ChatML-style one without bos, like Qwen's, and one whose
post-processor adds a bos, like Llama's)."""

import json

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")

from rl_reason.infra.chat_template import render_chat_template  # noqa: E402
from rl_reason.infra.hf_tokenizer import HFTokenizer  # noqa: E402
from rl_reason.infra.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "Solve 3x + 5 = 20. Step 1: subtract 5. Step 2: divide by 3, so x = 5.",
    "def add(a, b):\n    return a + b\n",
    "naïve café — 日本語のテキスト, émigré, Größe",
    "<think> reasoning goes here </think> <answer> 42 </answer>",
] * 40
TEXTS = [
    "Hello world",
    "  leading spaces and trailing  ",
    "Numbers: 1234567890 and 3.14159",
    "Line one\nLine two\n\n\tTabbed",
    "naïve café — 日本語 Größe",
    "A question?<|im_end|> then more <|im_start|>user",
    "",
]

# ChatML with a default system prompt, a system-first rule and an optional empty think block.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou solve problems.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and not loop.first %}"
    "{{ raise_exception('the system message must come first') }}"
    "{%- elif message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
# bos_token in the text, a filter, tojson of a structured field (non-ASCII kept), loop controls.
BOS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role == 'ignored' %}{% continue %}{% endif %}"
    "[{{ m.role | upper }}] {{ m.content | trim }}"
    "{% if m.tool_calls is defined %} {{ m.tool_calls | tojson }}{% endif %}"
    "{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)
CHATS = [
    [{"role": "user", "content": "What is 6 x 7?"}],
    [
        {"role": "system", "content": "Think step by step."},
        {"role": "user", "content": "naïve question: 2 + 2?"},
        {"role": "assistant", "content": "  4  ", "tool_calls": None},
        {"role": "ignored", "content": "skipped"},
        {"role": "user", "content": "And 3 + 3?"},
    ],
    [
        {"role": "user", "content": "Call it"},
        {"role": "assistant", "content": "ok", "tool_calls": [{"name": "café", "args": [1, 2]}]},
    ],
]


def _train(directory, *, bos: bool):
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + (["<s>", "</s>"] if bos else [])
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        tokens = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<|endoftext|>"}
        template = BOS_TEMPLATE
    else:
        tokens = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        template = CHATML_TEMPLATE
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "chat_template": template,
        **tokens,
    }
    if bos:  # the AddedToken form some checkpoints use
        config["eos_token"] = {"content": "</s>", "special": True, "__type": "AddedToken"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module", params=["chatml", "bos"])
def pair(request, tmp_path_factory):
    """(our tokenizer, its directory, whether it has a bos)."""
    bos = request.param == "bos"
    directory = _train(tmp_path_factory.mktemp("tok") / request.param, bos=bos)
    return load_tokenizer(directory), directory, bos


@pytest.fixture(scope="module")
def theirs(pair):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(pair[1])


def test_special_ids_and_sizes(pair):
    tok, _, bos = pair
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == 400
    assert tok.eos_id == tok.piece_to_id("</s>" if bos else "<|im_end|>")
    assert tok.pad_id == tok.piece_to_id("<|endoftext|>") == 0
    assert tok.special_ids["<|im_start|>"] == 1
    if bos:
        assert tok.bos_id == tok.piece_to_id("<s>") == 3
    else:
        with pytest.raises(ValueError, match="defines no bos_token"):
            _ = tok.bos_id
    with pytest.raises(KeyError, match="not a token"):
        tok.piece_to_id("<no such token>")
    tok.assert_fits(400)
    tok.assert_fits(512)  # padded embedding rows are fine
    with pytest.raises(ValueError, match="has 400 pieces"):
        tok.assert_fits(399)


def test_round_trips_and_decoding_rules(pair):
    tok, _, bos = pair
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids, stop_at_eos=False) == text
        assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.encode_batch(TEXTS, add_bos=True) == [tok.encode(t, add_bos=True) for t in TEXTS]
    with_eos = tok.encode("two words", add_eos=True)
    assert with_eos[-1] == tok.eos_id
    bos_ids = [tok.bos_id] if bos else []  # ChatML tokenizers define no bos: nothing to add
    assert tok.encode("two words", add_bos=True) == bos_ids + tok.encode("two words")
    # The first eos ends the text; pad is dropped wherever it is.
    row = np.array([tok.pad_id, *tok.encode("kept"), tok.eos_id, *tok.encode("dropped")])
    assert tok.decode(row) == "kept"
    assert tok.decode_batch(np.stack([row, row])) == ["kept", "kept"]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, 400])
    with pytest.raises(TypeError, match="encode takes one str"):
        tok.encode(["a"])


@pytest.mark.ref
def test_ids_and_text_match_transformers(pair, theirs):
    tok, _, _ = pair
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (
        theirs.eos_token_id,
        theirs.pad_token_id,
        len(theirs),
    )
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == theirs(text, add_special_tokens=False).input_ids, text
        # add_bos does what the file's post-processor does: prepend bos, or nothing (ChatML).
        assert tok.encode(text, add_bos=True) == theirs(text).input_ids, text
        assert tok.decode(ids, stop_at_eos=False) == theirs.decode(ids), text
        assert [tok.id_to_piece(i) for i in ids] == theirs.convert_ids_to_tokens(ids), text


@pytest.mark.ref
@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_as_transformers(pair, theirs, chat, add_generation_prompt):
    tok, _, _ = pair
    messages = CHATS[chat]
    expected = theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert tok.apply_chat_template(messages, add_generation_prompt) == expected
    # Template variables pass through (Qwen3's enable_thinking switch).
    expected = theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert tok.apply_chat_template(messages, enable_thinking=False) == expected


def test_chat_template_golden():
    # Independent of transformers: the ChatML template by hand.
    tok_text = render_chat_template(
        CHATML_TEMPLATE,
        [{"role": "user", "content": "What is 6 x 7?"}],
        add_generation_prompt=True,
        special_tokens={"eos_token": "<|im_end|>"},
        enable_thinking=False,
    )
    assert tok_text == (
        "<|im_start|>system\nYou solve problems.<|im_end|>\n"
        "<|im_start|>user\nWhat is 6 x 7?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    bos_text = render_chat_template(
        BOS_TEMPLATE, CHATS[2], special_tokens={"bos_token": "<s>", "eos_token": "</s>"}
    )
    assert bos_text == (
        '<s>[USER] Call it</s>\n[ASSISTANT] ok [{"name": "café", "args": [1, 2]}]</s>\n[ASSISTANT] '
    )
    import jinja2

    late_system = [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="must come first"):
        render_chat_template(CHATML_TEMPLATE, late_system)
    with pytest.raises(ValueError, match="no chat template"):
        render_chat_template(None, CHATS[0], source="x/tokenizer.json")
    # The sandbox refuses attribute access that escapes to Python internals.
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{{ messages.__class__.__mro__ }}", CHATS[0])


def test_load_tokenizer_picks_the_format(tmp_path, pair):
    tok, directory, _ = pair
    assert isinstance(load_tokenizer(directory / "tokenizer.json"), HFTokenizer)
    spm_dir = tmp_path / "spm"
    spm = train_sentencepiece(CORPUS, spm_dir / "tokenizer.model", vocab_size=200)
    (spm_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": BOS_TEMPLATE}))
    loaded = load_tokenizer(spm_dir)
    assert isinstance(loaded, Tokenizer)
    assert loaded.encode("Hello world") == spm.encode("Hello world")
    assert loaded.apply_chat_template(CHATS[0]) == "<s>[USER] What is 6 x 7?</s>\n[ASSISTANT] "
    # tokenizer.json wins over tokenizer.model when a directory has both (as transformers'
    # fast tokenizers do).
    both = tmp_path / "both"
    both.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (both / name).write_bytes((directory / name).read_bytes())
    (both / "tokenizer.model").write_bytes((spm_dir / "tokenizer.model").read_bytes())
    assert load_tokenizer(both).encode("Hello world") == tok.encode("Hello world")
    # transformers 5 saves the template beside the config as chat_template.jinja.
    (both / "chat_template.jinja").write_text("{{ messages[0].content }}!")
    assert load_tokenizer(both).apply_chat_template(CHATS[0]) == "What is 6 x 7?!"
    with pytest.raises(FileNotFoundError, match="tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizers JSON file"):
        load_tokenizer(tmp_path / "bad.json")
