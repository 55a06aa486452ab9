"""Stage 1 done once per seed: the pretrained base model cached for every arm that shares it.

Pretraining the base model costs minutes; the arms of an experiment differ only after it. The
cache directory holds one entry per distinct stage-1 setting::

    <cache>/<key>/tokenizer.model   the sentencepiece model
    <cache>/<key>/params.npz        every parameter, keyed by its path in the nnx.State
    <cache>/<key>/stage1.json       the settings the key was made from, and the pretraining log

The key is a hash of everything stage 1 depends on (seed, task, data, tokenizer, model and
pretraining sections of the config), so changing any of them trains a new base model, and an
entry is written to `<cache>/.<key>.partial` and renamed into place: a killed run leaves no half
entry behind. Pretraining checkpoints into that directory as it goes, so the next run of the
same key continues where a killed one stopped, bit for bit the straight run. A lock file
(`<cache>/.<key>.lock`) keeps two processes off the same key: the second waits, then finds
the entry made.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from models import get_config as model_preset
from rl_reason.infra import sharding
from rl_reason.infra.tokenizer import Tokenizer
from rl_reason.pipelines.base_model import stage1_settings, train_base


def stage1_key(config) -> str:
    blob = json.dumps(stage1_settings(config), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(_flatten(v, path + "/"))
        else:
            flat[path] = np.asarray(v)
    return flat


def _unflatten_into(tree: Mapping[str, Any], flat: Mapping[str, np.ndarray], prefix: str = ""):
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out[k] = _unflatten_into(v, flat, path + "/")
            continue
        if path not in flat:
            raise ValueError(f"cached base model has no parameter {path!r}: delete the entry")
        saved = flat[path]
        if saved.shape != v.shape or saved.dtype != v.dtype:
            raise ValueError(
                f"cached parameter {path!r} is {saved.dtype}{list(saved.shape)}, the model "
                f"wants {v.dtype}{list(v.shape)}: delete the entry (the key missed a change)"
            )
        out[k] = saved
    return out


def save_params(params: nnx.State, path: str | os.PathLike) -> None:
    """Every parameter of `params` (gathered to the host) as one .npz."""
    pure = jax.device_get(nnx.to_pure_dict(params))
    np.savez(path, **_flatten(pure))


def load_params(params: nnx.State, path: str | os.PathLike, mesh) -> nnx.State:
    """The values saved at `path` put into `params` (a freshly made state of the right
    structure, overwritten in place), sharded over `mesh` by the rules."""
    with np.load(path) as f:
        flat = {k: f[k] for k in f.files}
    loaded = _unflatten_into(nnx.to_pure_dict(params), flat)
    extra = sorted(set(flat) - set(_flatten(nnx.to_pure_dict(params))))
    if extra:
        raise ValueError(f"cached base model has parameters the model lacks: {extra[:5]}")
    nnx.replace_by_pure_dict(params, loaded)
    return jax.device_put(params, sharding.state_shardings(params, mesh))


def load_or_train(
    config,
    make_corpus: Callable[[], list[str]],
    mesh,
    cache_dir: str | os.PathLike,
    echo: Callable[[str], None] = print,
    should_stop: Callable[[int], bool] | None = None,
) -> tuple[Tokenizer, Any, nnx.State, dict[str, Any]] | None:
    """(tokenizer, graphdef, params, info) of the base model, trained unless cached.

    `make_corpus()` gives the pretraining texts; it is called only on a cache miss.

    `info` has the cache key, whether it was a hit, and the pretraining facts (steps, final
    loss, seconds). Returns None when `should_stop` interrupted pretraining: nothing is cached
    and its checkpoint is kept for the next call.
    """
    key = stage1_key(config)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(cache_dir) / f".{key}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            echo(f"[stage 1] another process is pretraining base model {key}: waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _load_or_train_locked(config, key, make_corpus, mesh, cache_dir, echo, should_stop)


def _load_or_train_locked(config, key, make_corpus, mesh, cache_dir, echo, should_stop):
    entry = Path(cache_dir) / key
    if (entry / "params.npz").exists():
        tokenizer = Tokenizer.load(entry / "tokenizer.model")
        stage1 = json.loads((entry / "stage1.json").read_text())
        model_cfg = model_preset(
            config.model.preset, vocab_size=tokenizer.vocab_size, **dict(config.model.overrides)
        )
        graphdef, params = sharding.create_model(model_cfg, mesh, seed=config.seed)
        params = load_params(params, entry / "params.npz", mesh)
        echo(f"[stage 1] base model {key} from the cache {cache_dir}")
        return tokenizer, graphdef, params, {"key": key, "cache_hit": True, **stage1["log"]}

    corpus = make_corpus()
    tmp = Path(cache_dir) / f".{key}.partial"
    tmp.mkdir(exist_ok=True)
    echo(f"[stage 1] base model {key}: not cached, pretraining (checkpoints in {tmp})")
    ckpt = tmp / "checkpoints"
    base = train_base(config, corpus, mesh, tmp, echo, should_stop, checkpoint_dir=ckpt)
    if base is None:  # stopped: its checkpoint stays for the next run to continue from
        return None
    tokenizer, graphdef, params, facts = base
    shutil.rmtree(ckpt, ignore_errors=True)
    save_params(params, tmp / "params.npz")
    (tmp / "stage1.json").write_text(
        json.dumps({"settings": stage1_settings(config), "log": facts}, indent=2)
    )
    try:
        os.rename(tmp, entry)
    except OSError:  # an entry made meanwhile outside the lock (another cache root?): keep it
        shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = Tokenizer.load(entry / "tokenizer.model")
    return tokenizer, graphdef, params, {"key": key, "cache_hit": False, **facts}
