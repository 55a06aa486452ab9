"""Tokenizers: SentencePiece models and Hugging Face `tokenizer.json` files behind one interface
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

import functools
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import sentencepiece as spm

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
        ids = _as_int_list(ids)
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


class HFTokenizer:
    """A Hugging Face fast tokenizer (`tokenizer.json`, run by the `tokenizers` library) with the
    same interface as `Tokenizer`.

    Ids equal transformers' ``tokenizer(text, add_special_tokens=False)``; special tokens written
    in the text (e.g. ``<|im_end|>``) are encoded as themselves, as transformers does. bos/eos/pad
    come from tokenizer_config.json (or special_tokens_map.json); ``add_bos`` prepends bos when the
    tokenizer defines one (Qwen's define none: their models are trained without it) instead of
    running the file's post-processor, so that the same call works for every family. `pad_id`
    falls back to `eos_id`. Decoding is the `tokenizers` decoder's text: no
    ``clean_up_tokenization_spaces`` (transformers 5 skips it for BPE tokenizers too).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        source: str = "<memory>",
    ):
        self._tok = tokenizer
        self._source = source
        self.chat_template = chat_template
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1
        self._special_ids = {
            t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
        }
        self._tokens = {"bos": bos_token, "eos": eos_token, "pad": pad_token, "unk": unk_token}
        self._ids: dict[str, int | None] = {}
        for name, token in self._tokens.items():
            i = None if token is None else tokenizer.token_to_id(token)
            if token is not None and i is None:
                raise ValueError(f"{source}: {name}_token {token!r} is not in the vocabulary")
            self._ids[name] = i

    @classmethod
    def load(cls, path: str | os.PathLike) -> HFTokenizer:
        """Loads ``tokenizer.json`` (a file, or a directory holding it) and, beside it,
        tokenizer_config.json / special_tokens_map.json / chat_template.jinja if present."""
        from tokenizers import Tokenizer as RustTokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"No tokenizer.json at {path}")
        try:
            tokenizer = RustTokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises its own exception type
            raise ValueError(f"{file} is not a tokenizers JSON file: {e}") from None
        config = _tokenizer_config(file.parent)
        return cls(
            tokenizer,
            **{f"{k}_token": _token_content(config.get(f"{k}_token")) for k in _SPECIAL},
            chat_template=config.get("chat_template"),
            source=str(file),
        )

    def __repr__(self) -> str:
        return f"HFTokenizer({self._source!r}, vocab_size={self._vocab_size})"

    @property
    def source(self) -> str:
        return self._source

    @property
    def vocab_size(self) -> int:
        """One past the largest id (added tokens included); every id emitted is below it."""
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self._required("bos")

    @property
    def eos_id(self) -> int:
        return self._required("eos")

    @property
    def pad_id(self) -> int:
        """The pad token's id, or `eos_id` if the tokenizer has no pad token."""
        pad = self._ids["pad"]
        return pad if pad is not None else self.eos_id

    @property
    def unk_id(self) -> int | None:
        return self._ids["unk"]

    @property
    def special_ids(self) -> dict[str, int]:
        """Added special tokens (e.g. ``<|im_start|>``) and their ids."""
        return dict(self._special_ids)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes one str, got {type(text).__name__}; see encode_batch")
        return self._wrap(self._tok.encode(text, add_special_tokens=False).ids, add_bos, add_eos)

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of str; for one text use encode")
        texts = list(texts)
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"encode_batch: expected str items, got {type(text).__name__}")
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos) for e in encodings]

    def decode(self, ids: IdSequence, *, stop_at_eos: bool = True) -> str:
        """Text of `ids`; pad ids are skipped and, with `stop_at_eos`, the first eos ends it.

        Ids outside ``[0, vocab_size)`` raise ValueError (see `Tokenizer.decode`).
        """
        return self._tok.decode(self._strip(ids, stop_at_eos), skip_special_tokens=False)

    def decode_batch(
        self, batch: Sequence[IdSequence] | np.ndarray, *, stop_at_eos: bool = True
    ) -> list[str]:
        rows = [self._strip(row, stop_at_eos) for row in batch]
        return self._tok.decode_batch(rows, skip_special_tokens=False)

    def piece_to_id(self, piece: str) -> int:
        """Id of the token `piece`; KeyError if the vocabulary has no such token."""
        i = self._tok.token_to_id(piece)
        if i is None:
            raise KeyError(f"{piece!r} is not a token of {self._source}")
        return i

    def id_to_piece(self, i: int) -> str:
        self._check_ids([int(i)])
        piece = self._tok.id_to_token(int(i))
        if piece is None:
            raise ValueError(f"id {i} is unused in {self._source}")
        return piece

    def assert_fits(self, embedding_rows: int) -> None:
        """Same as ``check_vocab(self, embedding_rows)``."""
        check_vocab(self, embedding_rows)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs
    ) -> str:
        """`messages` rendered with this tokenizer's chat template (see `render_chat_template`)."""
        special = {f"{k}_token": t for k, t in self._tokens.items() if t is not None}
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=special,
            source=self._source,
            **kwargs,
        )

    def _required(self, name: str) -> int:
        i = self._ids[name]
        if i is None:
            raise ValueError(
                f"{self._source} defines no {name}_token (tokenizer_config.json); set one there"
            )
        return i

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        bos = self._ids["bos"]
        prefix = [bos] if add_bos and bos is not None else []
        return prefix + list(ids) + ([self.eos_id] if add_eos else [])

    def _strip(self, ids: IdSequence, stop_at_eos: bool) -> list[int]:
        ids = _as_int_list(ids)
        eos = self._ids["eos"]
        if stop_at_eos and eos is not None and eos in ids:
            ids = ids[: ids.index(eos)]
        pad = self._ids["pad"] if self._ids["pad"] is not None else eos
        if pad is not None:
            ids = [i for i in ids if i != pad]
        self._check_ids(ids)
        return ids

    def _check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise ValueError(
                f"ids {bad[:5]} are outside the vocabulary [0, {self._vocab_size}) of "
                f"{self._source}; mask logits of padded embedding rows when sampling"
            )


_SPECIAL = ("bos", "eos", "pad", "unk")


def _token_content(token: Any) -> str | None:
    # tokenizer_config.json writes a special token as a string or as an AddedToken dict.
    if isinstance(token, Mapping):
        return token.get("content")
    return token


def _tokenizer_config(directory: Path) -> dict[str, Any]:
    """tokenizer_config.json merged over special_tokens_map.json, chat_template.jinja winning."""
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = directory / name
        if file.is_file():
            try:
                config.update(json.loads(file.read_text()))
            except json.JSONDecodeError as e:
                raise ValueError(f"{file} is not valid JSON: {e}") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t["name"]: t["template"] for t in template}
        config["chat_template"] = named.get("default")
    if (directory / "chat_template.jinja").is_file():
        config["chat_template"] = (directory / "chat_template.jinja").read_text()
    return config


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """The tokenizer at `path`: a model directory, a tokenizer.json, or a SentencePiece .model.

    A directory with tokenizer.json gives an `HFTokenizer`; otherwise its tokenizer.model gives
    a SentencePiece `Tokenizer` (with the chat template of tokenizer_config.json, if any).
    """
    path = Path(path)
    if path.is_file():
        if path.suffix == ".json":
            return HFTokenizer.load(path)
        tokenizer = Tokenizer.load(path)
        tokenizer.chat_template = _tokenizer_config(path.parent).get("chat_template")
        return tokenizer
    if (path / "tokenizer.json").is_file():
        return HFTokenizer.load(path)
    if (path / "tokenizer.model").is_file():
        tokenizer = Tokenizer.load(path)
        tokenizer.chat_template = _tokenizer_config(path).get("chat_template")
        return tokenizer
    raise FileNotFoundError(
        f"No tokenizer at {path}: expected a directory with tokenizer.json or tokenizer.model, "
        "or the path of such a file"
    )


def render_chat_template(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str] | None = None,
    source: str = "<memory>",
    **kwargs: Any,
) -> str:
    """A Jinja chat template rendered as transformers' ``apply_chat_template(tokenize=False)``.

    Same sandboxed environment (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
    `strftime_now`, a `tojson` that keeps non-ASCII), with ``messages``,
    ``add_generation_prompt``, the special tokens (``bos_token``, ``eos_token``, ...) and
    `kwargs` (e.g. ``enable_thinking=False``) in scope; message keys whose value is None are
    dropped. The text may already contain the bos token: encode it with ``add_bos=False``.
    """
    if template is None:
        raise ValueError(
            f"{source} has no chat template (tokenizer_config.json 'chat_template' or "
            "chat_template.jinja); use a plain prompt template instead"
        )
    if not messages:
        raise ValueError("apply_chat_template needs at least one message")
    chat = []
    for m in messages:
        if not isinstance(m, Mapping):
            raise TypeError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
        chat.append({k: v for k, v in m.items() if v is not None})
    return _compile_template(template).render(
        messages=chat,
        add_generation_prompt=add_generation_prompt,
        **{"tools": None, "documents": None, **dict(special_tokens or {}), **kwargs},
    )


@functools.cache
def _compile_template(template: str):
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2: pip install 'jinja2>=3.1'") from None

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


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


def _as_int_list(ids: IdSequence) -> list[int]:
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
