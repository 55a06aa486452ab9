"""Tests for rl_reason.infra.tokenizer: training, exact round trips, special tokens,
vocab checks."""

import io
import json
import logging
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from rl_reason.infra.tokenizer import Tokenizer, check_vocab, train_sentencepiece
from rl_reason.tasks import arithmetic, templates

# Whitespace the default SentencePiece normalisation would destroy.
TRICKY_TEXTS = [
    "two  spaces and   three",
    "  leading and trailing  ",
    "line one\nline two\n\nafter a blank line\n",
    "\n\nstarts with newlines",
    "tab\there",
    "12345 + 67890 = 80235",
]


def _corpus() -> list[str]:
    cfg = arithmetic.ArithmeticConfig()
    return arithmetic.pretraining_corpus(0, 400, cfg, frac_worked=0.5) + TRICKY_TEXTS * 5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "arith.model"
    tok = train_sentencepiece(
        _corpus(), path, vocab_size=160, user_defined_symbols=templates.SPECIAL_TOKENS
    )
    return tok, path


def test_fixed_ids_and_special_tokens(trained):
    tok, _ = trained
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.special_ids == {"<think>": 4, "</think>": 5, "<answer>": 6, "</answer>": 7, "\n": 8}
    assert tok.vocab_size == 160
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]


@pytest.mark.parametrize("tag", templates.SPECIAL_TOKENS)
def test_special_tokens_are_single_ids_in_any_context(trained, tag):
    tok, _ = trained
    tag_id = tok.special_ids[tag]
    assert tok.encode(tag) == [tag_id]
    for text in (f"a{tag}b", f"12{tag}34", f"  {tag}\n", f"{tag}{tag}"):
        ids = tok.encode(text)
        assert ids.count(tag_id) == text.count(tag)
        assert tok.decode(ids) == text


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_round_trip_keeps_whitespace_exactly(trained, text):
    tok, _ = trained
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_and_prompt_completion_split_on_task_texts(trained):
    tok, _ = trained
    problems = arithmetic.generate_problems(123, 200)
    for problem in problems:
        for style in arithmetic.STYLES:
            text = arithmetic.format_pretraining_example(problem, style)
            assert tok.decode(tok.encode(text)) == text
        # The policy sees the prompt's ids and continues them; that must be the same sequence
        # that pretraining saw for the joined text, or RL starts off-distribution.
        prompt = arithmetic.make_prompt(problem["question"])
        completion = arithmetic.target_completion(problem, worked=True)
        assert tok.encode(prompt) + tok.encode(completion) == tok.encode(prompt + completion)
    assert tok.unk_id not in tok.encode(arithmetic.format_pretraining_example(problems[0], "steps"))


def test_digits_are_single_tokens(trained):
    tok, _ = trained
    ids = tok.encode("9876543210")
    assert [tok.id_to_piece(i) for i in ids] == list("9876543210")
    for i in range(tok.vocab_size):
        piece = tok.id_to_piece(i)
        assert sum(ch.isdigit() for ch in piece) <= 1, piece


def test_encode_bos_eos_and_batch(trained):
    tok, _ = trained
    plain = tok.encode("Q: 1")
    assert tok.encode("Q: 1", add_bos=True, add_eos=True) == [2, *plain, 3]
    texts = ["Q: 1", "A: 22", ""]
    assert tok.encode_batch(texts, add_eos=True) == [tok.encode(t) + [3] for t in texts]
    with pytest.raises(TypeError, match="encode_batch"):
        tok.encode(["a"])
    with pytest.raises(TypeError, match="sequence of str"):
        tok.encode_batch("abc")


def test_decode_stops_at_eos_and_skips_pad(trained):
    tok, _ = trained
    a, b = tok.encode("A: 12"), tok.encode(" tail")
    ids = [2, *a, 3, *b, 0, 0]
    assert tok.decode(ids) == "A: 12"
    assert tok.decode(ids, stop_at_eos=False) == "A: 12 tail"
    assert tok.decode(np.array([*a, 0, 0, 0], dtype=np.int32)) == "A: 12"
    batch = np.zeros((2, 10), dtype=np.int32)
    batch[0, : len(a)] = a
    batch[1, : len(b) + 2] = [*b, 3, a[0]]
    assert tok.decode_batch(batch) == ["A: 12", " tail"]
    assert tok.decode_batch([a, b]) == ["A: 12", " tail"]


def test_decode_rejects_ids_outside_vocab(trained):
    tok, _ = trained
    with pytest.raises(ValueError, match=r"\[0, 160\)"):
        tok.decode([5, 160])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])
    # After the first eos nothing is decoded, so a padded-row id there is harmless.
    assert tok.decode([*tok.encode("ok"), 3, 999]) == "ok"


def test_piece_lookup(trained):
    tok, _ = trained
    assert tok.piece_to_id("<answer>") == 6
    assert tok.piece_to_id("<unk>") == 1
    assert tok.id_to_piece(tok.piece_to_id("\n")) == "\n"
    with pytest.raises(KeyError, match="not a piece"):
        tok.piece_to_id("<no-such-piece>")


def test_check_vocab(trained):
    tok, _ = trained
    check_vocab(tok, 160)
    check_vocab(tok, 256)  # padded embedding rows are fine
    tok.assert_fits(160)
    with pytest.raises(ValueError) as err:
        check_vocab(tok, 159)
    message = str(err.value)
    assert "160" in message and "159" in message and "vocab_size" in message
    with pytest.raises(ValueError, match="159"):
        tok.assert_fits(159)
    with pytest.raises(ValueError, match="positive"):
        check_vocab(tok, 0)


def test_load_paths_and_errors(trained, tmp_path):
    tok, path = trained
    again = Tokenizer.load(path)
    assert again.vocab_size == tok.vocab_size and again.encode("Q: 7") == tok.encode("Q: 7")
    (tmp_path / "tokenizer.model").write_bytes(path.read_bytes())
    assert Tokenizer.load(tmp_path).special_ids == tok.special_ids
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer.load(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"definitely not a protobuf")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.load(junk)


def test_training_is_deterministic_across_processes(tmp_path):
    texts = _corpus()[:200]
    a = tmp_path / "a.model"
    train_sentencepiece(texts, a, vocab_size=120, user_defined_symbols=templates.SPECIAL_TOKENS)
    # A second interpreter rules out state that a single process might share between runs.
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    code = (
        "import json, sys; from rl_reason.tasks import templates; "
        "from rl_reason.infra.tokenizer import train_sentencepiece; "
        "train_sentencepiece(json.load(open(sys.argv[1])), sys.argv[2], vocab_size=120, "
        "user_defined_symbols=templates.SPECIAL_TOKENS)"
    )
    b = tmp_path / "b.model"
    repo_root = pathlib.Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "texts.json"), str(b)],
        check=True,
        cwd=repo_root,
    )
    assert a.read_bytes() == b.read_bytes()
    c = tmp_path / "c.model"
    train_sentencepiece(
        texts[:150], c, vocab_size=120, user_defined_symbols=templates.SPECIAL_TOKENS
    )
    assert c.read_bytes() != a.read_bytes()  # the comparison above can tell models apart


def test_unigram_is_deterministic_too(tmp_path):
    texts = _corpus()[:200]
    kw = dict(vocab_size=100, model_type="unigram", user_defined_symbols=templates.SPECIAL_TOKENS)
    a = train_sentencepiece(texts, tmp_path / "a.model", **kw)
    train_sentencepiece(texts, tmp_path / "b.model", **kw)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a.decode(a.encode(TRICKY_TEXTS[2])) == TRICKY_TEXTS[2]


def test_small_corpus_gets_smaller_vocab_unless_hard_limit(tmp_path, caplog):
    texts = ["aaa bbb", "ab ba"] * 3
    with caplog.at_level(logging.WARNING):
        tok = train_sentencepiece(texts, tmp_path / "small.model", vocab_size=200)
    assert 9 < tok.vocab_size < 200
    assert "asked for 200" in caplog.text
    with pytest.raises(ValueError, match="Vocabulary size too high"):
        train_sentencepiece(texts, tmp_path / "hard.model", vocab_size=200, hard_vocab_limit=True)


def test_byte_fallback_round_trips_unseen_characters(tmp_path):
    tok = train_sentencepiece(
        ["plain ascii text 123"] * 5, tmp_path / "bytes.model", vocab_size=300, byte_fallback=True
    )
    text = "naïve ✓ 𝛑"
    assert tok.unk_id not in tok.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_training_argument_errors(tmp_path):
    out = tmp_path / "x.model"
    with pytest.raises(ValueError, match="no texts"):
        train_sentencepiece([], out, vocab_size=50)
    # pad, unk, bos, eos, "<a>", "\n" and at least one learned piece.
    with pytest.raises(ValueError, match="at least 7"):
        train_sentencepiece(["abc"], out, vocab_size=6, user_defined_symbols=["<a>"])
    with pytest.raises(ValueError, match="reserved"):
        train_sentencepiece(["abc"], out, vocab_size=50, user_defined_symbols=["</s>"])
    with pytest.raises(ValueError, match="duplicates"):
        train_sentencepiece(["abc"], out, vocab_size=50, user_defined_symbols=["<a>", "<a>"])
    with pytest.raises(ValueError, match="model_type"):
        train_sentencepiece(["abc"], out, vocab_size=50, model_type="wordpiece")
    with pytest.raises(TypeError, match="str"):
        train_sentencepiece([b"bytes"], out, vocab_size=50)
    assert not out.exists()


def test_long_texts_skipped_with_warning(tmp_path, caplog):
    texts = ["short text"] * 5 + ["x" * 300]
    with caplog.at_level(logging.WARNING):
        train_sentencepiece(texts, tmp_path / "m.model", vocab_size=30, max_sentence_length=100)
    assert "skipped 1 of 6" in caplog.text


def test_model_without_pad_falls_back_to_eos():
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["hello world", "world of words"] * 5),
        model_writer=model,
        vocab_size=20,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    tok = Tokenizer.from_bytes(model.getvalue())
    assert tok.pad_id == tok.eos_id == 2
    ids = tok.encode("hello")
    assert tok.decode([*ids, 2, 2, 2]) == "hello"
    assert tok.decode([*ids, 2, *ids], stop_at_eos=False) == "hello hello"  # default dummy prefix
    assert tok.special_ids == {}
