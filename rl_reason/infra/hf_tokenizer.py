"""Hugging Face `tokenizer.json` files (run by the `tokenizers` library) behind the interface of
`rl_reason.infra.tokenizer`: the same ids, special ids and chat templates as transformers."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rl_reason.infra.chat_template import render_chat_template
from rl_reason.infra.tokenizer import IdSequence, as_int_list, check_vocab


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
        config = tokenizer_config(file.parent)
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
        ids = as_int_list(ids)
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


def tokenizer_config(directory: Path) -> dict[str, Any]:
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
