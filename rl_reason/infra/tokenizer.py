"""Tokenizers: SentencePiece models and Hugging Face `tokenizer.json` files (hf_tokenizer.py)
behind one interface
(encode/decode, bos/eos/pad ids, a vocabulary check against the model's embedding, chat
templates), plus training small SentencePiece models in memory.

    tokenizer = load_tokenizer("/ckpt/Qwen2.5-0.5B")   # tokenizer.json or tokenizer.model
    tokenizer.assert_fits(model.cfg.vocab_size)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}])

Host-side only (no jax): prompts are encoded here before they go to the device, and sampled ids
come back here to be decoded for the verifiers.

Models trained by `train_sentencepiece` have fixed ids pad=0, unk=1, bos=2, eos=3, then the
user-defined symbols in the order given, then "\\n" (always a user-defined symbol, see below).
They reproduce text exactly: ``decode(encode(x)) == x`` for any text made of characters seen in
training (with ``byte_fallback=True``, for any text).
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import sentencepiece as spm

from rl_reason.infra.chat_template import render_chat_template

_log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_RESERVED_PIECES = ("<pad>", "<unk>", "<s>", "</s>")
_MODEL_TYPES = ("bpe", "unigram", "char", "word")

IdSequence = Sequence[int] | np.ndarray


class TextTokenizer(Protocol):
    """What the pipelines use of a tokenizer; `Tokenizer` (SentencePiece) and `HFTokenizer`
    (``tokenizer.json``) both are one, so code takes a ``TextTokenizer`` and either works.

    A typing protocol, not an isinstance check: `HFTokenizer.bos_id` raises for a tokenizer
    without a bos token, which an isinstance check would call."""

    chat_template: str | None

    @property
    def source(self) -> str: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def bos_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    @property
    def special_ids(self) -> dict[str, int]: ...

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...
    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]: ...
    def decode(self, ids: IdSequence, *, stop_at_eos: bool = True) -> str: ...
    def decode_batch(
        self, batch: Sequence[IdSequence] | np.ndarray, *, stop_at_eos: bool = True
    ) -> list[str]: ...
    def piece_to_id(self, piece: str) -> int: ...
    def id_to_piece(self, i: int) -> str: ...
    def assert_fits(self, embedding_rows: int) -> None: ...
    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs
    ) -> str: ...


class Tokenizer:
    """A SentencePiece model with the ids and conventions the RL loop needs.

    `pad_id` falls back to `eos_id` when the model defines no pad piece (common for pretrained
    LM tokenizers): padding after an eos then decodes to nothing either way.
    """

    def __init__(
        self,
        processor: spm.SentencePieceProcessor,
        *,
        source: str = "<memory>",
        chat_template: str | None = None,
    ):
        self._sp = processor
        self._source = source
        self._vocab_size = processor.get_piece_size()
        self._special_ids = _user_defined_pieces(processor.serialized_model_proto())
        self.chat_template = chat_template

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a SentencePiece ``.model`` file (or a directory holding ``tokenizer.model``)."""
        path = Path(path)
        if path.is_dir() and (path / "tokenizer.model").is_file():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(
                f"No tokenizer model at {path}: expected a SentencePiece .model file "
                "(or a directory containing tokenizer.model)."
            )
        return cls.from_bytes(path.read_bytes(), source=str(path))

    @classmethod
    def from_bytes(cls, model_proto: bytes, *, source: str = "<bytes>") -> Tokenizer:
        """Builds a tokenizer from a serialized SentencePiece model."""
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(model_proto)
        except RuntimeError as e:
            hint = (
                " (tokenizer.json files are not supported here)" if source.endswith(".json") else ""
            )
            raise ValueError(
                f"{source} is not a SentencePiece model{hint}: sentencepiece said: {e}"
            ) from e
        return cls(processor, source=source)

    def __repr__(self) -> str:
        return f"Tokenizer({self._source!r}, vocab_size={self._vocab_size})"

    @property
    def source(self) -> str:
        """Where the model came from (a path), for error messages."""
        return self._source

    @property
    def vocab_size(self) -> int:
        """Number of pieces; every id this tokenizer emits is in ``[0, vocab_size)``."""
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self._required_id(self._sp.bos_id(), "bos")

    @property
    def eos_id(self) -> int:
        return self._required_id(self._sp.eos_id(), "eos")

    @property
    def pad_id(self) -> int:
        """The pad piece's id, or `eos_id` if the model has no pad piece."""
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def special_ids(self) -> dict[str, int]:
        """User-defined pieces (e.g. ``<think>``) and their ids.

        SentencePiece matches these before any other segmentation, so each is always encoded as
        exactly one token wherever it appears in a text.
        """
        return dict(self._special_ids)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes one str, got {type(text).__name__}; see encode_batch")
        return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of str; for one text use encode")
        texts = list(texts)
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"encode_batch: expected str items, got {type(text).__name__}")
        return self._sp.encode(texts, add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids: IdSequence, *, stop_at_eos: bool = True) -> str:
        """Text of `ids`; pad ids are skipped and, with `stop_at_eos`, the first eos ends it.

        Ids outside ``[0, vocab_size)`` raise ValueError: they come from padded embedding rows
        that the sampler should have masked, and decoding them as anything would hide that bug.
        """
        ids = as_int_list(ids)
        eos = self._sp.eos_id()
        if stop_at_eos and eos >= 0 and eos in ids:
            ids = ids[: ids.index(eos)]
        pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else eos
        if pad >= 0:
            ids = [i for i in ids if i != pad]
        self._check_ids(ids)
        return self._sp.decode(ids)

    def decode_batch(
        self, batch: Sequence[IdSequence] | np.ndarray, *, stop_at_eos: bool = True
    ) -> list[str]:
        """Decodes each row of `batch` (a list of id lists or a 2-D array ``[B, T]``)."""
        return [self.decode(row, stop_at_eos=stop_at_eos) for row in batch]

    def piece_to_id(self, piece: str) -> int:
        """Id of `piece`; KeyError if the vocabulary has no such piece (no silent unk)."""
        i = self._sp.piece_to_id(piece)
        if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i):
            raise KeyError(f"{piece!r} is not a piece of {self._source}")
        return i

    def id_to_piece(self, i: int) -> str:
        self._check_ids([int(i)])
        return self._sp.id_to_piece(int(i))

    def assert_fits(self, embedding_rows: int) -> None:
        """Same as ``check_vocab(self, embedding_rows)``."""
        check_vocab(self, embedding_rows)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs
    ) -> str:
        """`messages` rendered with this tokenizer's chat template (see `render_chat_template`)."""
        pieces = {"bos": self._sp.bos_id(), "eos": self._sp.eos_id(), "pad": self._sp.pad_id()}
        pieces["unk"] = self._sp.unk_id()
        special = {f"{k}_token": self._sp.id_to_piece(i) for k, i in pieces.items() if i >= 0}
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=special,
            source=self._source,
            **kwargs,
        )

    def _required_id(self, i: int, name: str) -> int:
        if i < 0:
            raise ValueError(
                f"{self._source} defines no {name} piece; train or pick a model with one"
            )
        return i

    def _check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise ValueError(
                f"ids {bad[:5]} are outside the vocabulary [0, {self._vocab_size}) of "
                f"{self._source}; mask logits of padded embedding rows when sampling"
            )


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """The tokenizer at `path`: a model directory, a tokenizer.json, or a SentencePiece .model.

    A directory with tokenizer.json gives an `HFTokenizer`; otherwise its tokenizer.model gives
    a SentencePiece `Tokenizer` (with the chat template of tokenizer_config.json, if any).
    """
    from rl_reason.infra.hf_tokenizer import HFTokenizer, tokenizer_config

    path = Path(path)
    if path.is_file():
        if path.suffix == ".json":
            return HFTokenizer.load(path)
        tokenizer = Tokenizer.load(path)
        tokenizer.chat_template = tokenizer_config(path.parent).get("chat_template")
        return tokenizer
    if (path / "tokenizer.json").is_file():
        return HFTokenizer.load(path)
    if (path / "tokenizer.model").is_file():
        tokenizer = Tokenizer.load(path)
        tokenizer.chat_template = tokenizer_config(path).get("chat_template")
        return tokenizer
    raise FileNotFoundError(
        f"No tokenizer at {path}: expected a directory with tokenizer.json or tokenizer.model, "
        "or the path of such a file"
    )


def check_vocab(tokenizer: TextTokenizer, model_vocab_size: int) -> None:
    """Raises ValueError if `tokenizer` can emit an id that has no row in the model's embedding.

    A model with more rows than the vocabulary (rows padded to a multiple of 128, say) is fine.
    """
    if model_vocab_size <= 0:
        raise ValueError(f"model vocab_size must be positive, got {model_vocab_size}")
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"The tokenizer ({tokenizer.source}) has {tokenizer.vocab_size} pieces (ids up to "
            f"{tokenizer.vocab_size - 1}) but the model's embedding has only {model_vocab_size} "
            f"rows. Set the model's vocab_size to at least {tokenizer.vocab_size}, or use the "
            "tokenizer the model was trained with."
        )


def train_sentencepiece(
    texts: Iterable[str],
    out_path: str | os.PathLike,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    user_defined_symbols: Sequence[str] = (),
    split_digits: bool = True,
    hard_vocab_limit: bool = False,
    byte_fallback: bool = False,
    character_coverage: float = 1.0,
    max_sentence_length: int = 16384,
) -> Tokenizer:
    """Trains a SentencePiece model on in-memory `texts`, writes it to `out_path`, loads it.

    Each text is one training sentence and may contain newlines. The same texts and arguments
    give a byte-identical model file.

    Args:
      texts: the training corpus; iterated once.
      out_path: where to write the ``.model`` file (parent directories are created).
      vocab_size: requested number of pieces, including pad/unk/bos/eos and the user symbols.
      model_type: "bpe", "unigram", "char" or "word".
      user_defined_symbols: pieces that must always be single tokens (e.g. ``SPECIAL_TOKENS``
        from `rl_reason.tasks.templates`); they get ids 4, 5, ... in this order.
      split_digits: one token per digit, so numbers of any length share the ten digit tokens.
      hard_vocab_limit: if False, a corpus too small for `vocab_size` gives a smaller vocabulary
        (logged) instead of an error.
      byte_fallback: encode characters unseen in training as UTF-8 byte pieces instead of unk
        (adds 256 pieces).
      character_coverage: fraction of characters covered by single-character pieces.
      max_sentence_length: texts longer than this many UTF-8 bytes are skipped by the trainer;
        a warning says how many.
    """
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"model_type must be one of {_MODEL_TYPES}, got {model_type!r}")
    symbols = list(user_defined_symbols)
    for s in symbols:
        if not isinstance(s, str) or not s:
            raise ValueError(f"user_defined_symbols must be non-empty strings, got {s!r}")
        if s in _RESERVED_PIECES:
            raise ValueError(f"{s!r} is reserved for pad/unk/bos/eos; pick another symbol")
    if len(set(symbols)) != len(symbols):
        raise ValueError(f"user_defined_symbols has duplicates: {symbols}")
    # The default normalisation folds newlines into spaces; as a user-defined symbol "\n" is kept
    # verbatim and never merged with neighbours, so "<think>" + "\n..." tokenizes the same whether
    # the prompt and completion are encoded apart or together.
    if "\n" not in symbols:
        symbols.append("\n")
    minimum = len(_RESERVED_PIECES) + len(symbols) + (256 if byte_fallback else 0) + 1
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} leaves no room for learned pieces after the "
            f"{minimum - 1} fixed ones; use at least {minimum}"
        )

    counts = {"texts": 0, "too_long": 0}

    def sentences() -> Iterator[str]:
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"texts must be str, got {type(text).__name__}")
            counts["texts"] += 1
            counts["too_long"] += len(text.encode("utf-8")) > max_sentence_length
            yield text

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            user_defined_symbols=symbols,
            split_digits=split_digits,
            byte_fallback=byte_fallback,
            hard_vocab_limit=hard_vocab_limit,
            character_coverage=character_coverage,
            max_sentence_length=max_sentence_length,
            # Exact round trips: no Unicode normalisation, keep runs of spaces and leading or
            # trailing spaces, and no dummy "▁" before the text (it would make a completion's
            # first token depend on whether it is encoded alone or after its prompt).
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            # One thread: the merge order must not depend on scheduling.
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        if counts["texts"] == 0:
            raise ValueError("train_sentencepiece got no texts to train on") from e
        raise ValueError(f"SentencePiece training failed: {e}") from e
    if counts["too_long"]:
        _log.warning(
            "train_sentencepiece skipped %d of %d texts longer than max_sentence_length=%d bytes",
            counts["too_long"],
            counts["texts"],
            max_sentence_length,
        )

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Write-then-rename so a crash never leaves a truncated model where a run would load it.
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=out_path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.getvalue())
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

    tokenizer = Tokenizer.load(out_path)
    if tokenizer.vocab_size < vocab_size:
        _log.warning(
            "train_sentencepiece: corpus supports only %d pieces (asked for %d)",
            tokenizer.vocab_size,
            vocab_size,
        )
    return tokenizer


def as_int_list(ids: IdSequence) -> list[int]:
    array = np.asarray(ids)
    if array.ndim != 1:
        raise ValueError(f"expected a 1-D sequence of ids, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"ids must be integers, got dtype {array.dtype}")
    return array.astype(np.int64).tolist()


def _user_defined_pieces(model_proto: bytes) -> dict[str, int]:
    # The Python processor has no is_user_defined(); the piece types live only in the proto.
    # protobuf comes with orbax/grain/tfds, which the project already depends on.
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return {p.piece: i for i, p in enumerate(proto.pieces) if p.type == user_defined}
