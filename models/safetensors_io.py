"""Safetensors files read lazily and written tensor by tensor, with numpy only (no torch).

The format: an 8-byte little-endian header length N, N bytes of JSON header
``{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the raw little-endian bytes, offsets counted from the end of the header. Each file is mapped
once (`np.memmap`) and every tensor is a read-only view into it, so opening a checkpoint reads
only its headers and a loader that slices a view reads only the pages of that slice. bfloat16 is
the `ml_dtypes` type that jax uses.

A directory checkpoint is ``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors``
listed by ``model.safetensors.index.json`` (``{"weight_map": {tensor: file}}``), as Hugging Face
writes them.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
# A header is JSON for a few thousand tensors at most; anything larger is not a safetensors file.
_MAX_HEADER_BYTES = 100 * 2**20


def dtype_code(dtype: np.dtype) -> str:
    """The safetensors dtype name ("BF16", "F32", ...) of a numpy dtype."""
    try:
        return _CODES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no safetensors equivalent") from None


def open_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{name: read-only array view} of one safetensors file; no tensor data is read yet."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file: only {size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError(
                f"{path} is not a safetensors file: header length {n} exceeds the file size {size}"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors file: bad JSON header ({e})") from None
    header.pop("__metadata__", None)
    start = 8 + n
    raw = np.memmap(path, np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        code, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if code not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {code}")
        dtype = DTYPES[code]
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0 or start + end > size:
            raise ValueError(
                f"{path}: tensor {name!r} ({code}, shape {list(shape)}) has data offsets "
                f"[{begin}, {end}] that do not fit its {nbytes} bytes in a {size}-byte file "
                "(truncated or corrupt file?)"
            )
        out[name] = raw[start + begin : start + end].view(dtype).reshape(shape)
    return out


def open_checkpoint(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """{name: lazy array} over a directory's single-file or index-sharded safetensors."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a safetensors index (no weight_map): {e}") from None
        tensors: dict[str, np.ndarray] = {}
        for file in sorted(set(weight_map.values())):
            if not (directory / file).is_file():
                raise FileNotFoundError(f"{index} lists {file}, which is not in {directory}")
            in_file = open_file(directory / file)
            listed = {name for name, f in weight_map.items() if f == file}
            if listed - in_file.keys():
                raise ValueError(
                    f"{index} places tensors {sorted(listed - in_file.keys())[:5]} in {file}, "
                    "which does not contain them"
                )
            tensors.update({name: in_file[name] for name in listed})
        return tensors
    if (directory / SINGLE_FILE).is_file():
        return open_file(directory / SINGLE_FILE)
    others = sorted(p.name for p in directory.glob("*.bin")) if directory.is_dir() else []
    hint = (
        f" (found {others}: PyTorch pickles are not read here; re-save the model with "
        "safe_serialization=True)"
        if others
        else ""
    )
    raise FileNotFoundError(f"No {SINGLE_FILE} or {INDEX_FILE} in {directory}{hint}")


# Entry to write: (name, shape, dtype, fetch) where fetch() returns the array when its turn comes,
# so that only one tensor at a time is materialised on the host.
Entry = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


def write_file(
    path: str | os.PathLike, entries: Iterable[Entry], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes one safetensors file, fetching each tensor only when its bytes are written.

    The file appears under `path` only once complete (written beside it, then renamed).
    """
    path = Path(path)
    entries = list(entries)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype, _ in entries:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": dtype_code(dtype),
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the reference writer keeps the data 8-byte aligned
    # Not mkstemp: its files are private (0600); a checkpoint gets the umask's usual 0644.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, shape, dtype, fetch in entries:
                array = np.ascontiguousarray(fetch(), dtype=dtype)
                if array.shape != tuple(shape):
                    raise ValueError(f"{name}: fetched shape {array.shape}, declared {shape}")
                f.write(array.reshape(-1).view(np.uint8).data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_checkpoint(
    directory: str | os.PathLike, entries: Iterable[Entry], *, max_shard_bytes: int
) -> list[str]:
    """Writes `entries` as model.safetensors, or as shards plus an index past `max_shard_bytes`.

    Tensors are packed in order; one larger than the limit gets a shard of its own. Earlier
    model*.safetensors / index files in `directory` that this save does not rewrite are removed,
    so that a loader never mixes two saves. Returns the file names written.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[1]) * np.dtype(entry[2]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [shard_name(i, n) for i in range(n)]
    for name, shard in zip(names, shards, strict=True):
        write_file(directory / name, shard)
    written = set(names)
    if len(shards) > 1:
        total = sum(math.prod(e[1]) * np.dtype(e[2]).itemsize for shard in shards for e in shard)
        weight_map = {e[0]: name for name, shard in zip(names, shards, strict=True) for e in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        written.add(INDEX_FILE)
    for stale in directory.iterdir():
        is_ours = stale.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_RE.fullmatch(stale.name)
        if is_ours and stale.name not in written:
            stale.unlink()
    return names
