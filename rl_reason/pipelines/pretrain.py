"""Next-token pretraining (or SFT) of a policy on a text corpus: the base model before RL.

Documents are packed several to a row; segment ids keep attention inside each document and
positions restart at 0 for each, so a packed row trains exactly like its documents apart.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from rl_reason.core import update as train_step
from rl_reason.core.config import MAX_LEARNING_RATE, OptimOptions, broken_rules, finite
from rl_reason.infra import sharding
from rl_reason.infra.checkpoint import Checkpointer
from rl_reason.infra.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    steps: int = 500
    batch_size: int = 32
    seq_len: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = broken_rules(self, _PRETRAIN_RULES)
        if problems:
            raise ValueError("PretrainConfig: " + "; ".join(problems))


_PRETRAIN_RULES = {
    "steps": (lambda v, c: v >= 0, ">= 0", "0 skips pretraining"),
    "batch_size": (lambda v, c: v >= 1, ">= 1", "rows per update"),
    "seq_len": (lambda v, c: v >= 2, ">= 2", "next-token targets need two tokens"),
    "learning_rate": (
        lambda v, c: finite(v) and 0 < v <= MAX_LEARNING_RATE,
        f"in (0, {MAX_LEARNING_RATE:g}]",
        "a negative rate climbs the loss and a huge one diverges",
    ),
    "warmup_steps": (lambda v, c: v >= 0, ">= 0", "updates of linear warmup"),
    "weight_decay": (lambda v, c: finite(v) and v >= 0, ">= 0", "decay, not growth"),
    "max_grad_norm": (lambda v, c: finite(v) and v > 0, "> 0", "the clipping norm"),
    "seed": (lambda v, c: v >= 0, ">= 0", "numpy seeds are non-negative"),
}


@dataclasses.dataclass
class PackedRows:
    """Documents packed into rows of `seq_len` tokens."""

    ids: np.ndarray  # [R, T] int32
    segments: np.ndarray  # [R, T] int32, 0 = padding, 1.. = document within the row
    positions: np.ndarray  # [R, T] int32, restarting per document


def pack_documents(docs: Sequence[Sequence[int]], seq_len: int, pad_id: int) -> PackedRows:
    """Greedy first-fit packing in the given order; a document longer than a row is an error."""
    rows: list[list[Sequence[int]]] = []
    used: list[int] = []
    for doc in docs:
        if len(doc) > seq_len:
            raise ValueError(
                f"a document has {len(doc)} tokens > seq_len {seq_len}: raise "
                "seq_len or shorten the corpus texts"
            )
        if used and used[-1] + len(doc) <= seq_len:
            rows[-1].append(doc)
            used[-1] += len(doc)
        else:
            rows.append([doc])
            used.append(len(doc))
    ids = np.full((len(rows), seq_len), pad_id, np.int32)
    segments = np.zeros((len(rows), seq_len), np.int32)
    positions = np.zeros((len(rows), seq_len), np.int32)
    for r, row in enumerate(rows):
        start = 0
        for s, doc in enumerate(row, start=1):
            ids[r, start : start + len(doc)] = doc
            segments[r, start : start + len(doc)] = s
            positions[r, start : start + len(doc)] = np.arange(len(doc))
            start += len(doc)
    return PackedRows(ids, segments, positions)


def lm_loss(model, ids, segments, positions):
    """Mean next-token cross-entropy over real tokens that have a successor in their document."""
    logits = model(ids, mask_BT=segments > 0, positions_BT=positions, segment_ids_BT=segments)
    targets = ids[:, 1:]
    valid = (segments[:, 1:] > 0) & (segments[:, 1:] == segments[:, :-1])
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1)


def _lm_update(graphdef, optimizer, params, opt_state, ids, segments, positions):
    def loss_fn(p):
        return lm_loss(nnx.merge(graphdef, p), ids, segments, positions)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def pretrain(
    graphdef,
    params,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    cfg: PretrainConfig,
    log_fn: Callable[[int, float, float], None] | None = None,
    *,
    mesh: Mesh | None = None,
    should_stop: Callable[[int], bool] | None = None,
    checkpointer: Checkpointer | None = None,
):
    """Train on `texts` (each wrapped in bos/eos) for cfg.steps; returns (params, losses).

    The update is jitted over `mesh` (default: the params' own) with params and optimizer state
    sharded by the rules and rows over data x fsdp; every process packs the same corpus and
    feeds its rows of each batch. `should_stop(step)` is asked after each step (preemption):
    True ends training early.

    With a `checkpointer`, training starts from its newest checkpoint (if any) and saves every
    `checkpointer.save_every` steps and when stopped: params, optimizer state, the data order
    and cursor, the numpy generator's state and the losses so far, so a resumed run is the
    straight run bit for bit. `losses` then covers every step, the resumed ones included.
    """
    mesh = sharding.mesh_of(params) if mesh is None else mesh
    if cfg.batch_size % sharding.batch_shards(mesh):
        raise ValueError(
            f"pretrain batch_size {cfg.batch_size} must split over the "
            f"{sharding.batch_shards(mesh)} batch shards of mesh {dict(mesh.shape)}"
        )
    docs = tokenizer.encode_batch(list(texts), add_bos=True, add_eos=True)
    packed = pack_documents(docs, cfg.seq_len, tokenizer.pad_id)
    optim = OptimOptions(
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        lr_schedule="cosine",
        weight_decay=cfg.weight_decay,
        adam_b1=0.9,
        adam_b2=0.98,
        max_grad_norm=cfg.max_grad_norm,
    )
    optimizer = train_step.make_optimizer(optim, total_steps=cfg.steps)
    param_sh = sharding.state_shardings(params, mesh)
    opt_sh = sharding.opt_state_shardings(optimizer, params, param_sh)
    rows = sharding.batch_sharding(mesh, 2)
    update = jax.jit(
        functools.partial(_lm_update, graphdef, optimizer),
        in_shardings=(param_sh, opt_sh, rows, rows, rows),
        out_shardings=(param_sh, opt_sh, sharding.replicated(mesh)),
        donate_argnums=(0, 1),
    )
    opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(params)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(packed.ids))
    start, cursor, history, t0 = 0, 0, [], time.perf_counter()
    if checkpointer is not None:
        restored = checkpointer.restore_latest({"params": params, "opt_state": opt_state})
        if restored is not None:
            start, state, meta = restored
            params, opt_state = state["params"], state["opt_state"]
            order = np.asarray(meta["order"], dtype=order.dtype)
            cursor, history = meta["cursor"], [float(x) for x in meta["losses"]]
            rng.bit_generator.state = meta["rng_state"]
            t0 -= meta["seconds"]  # log_fn's elapsed time counts the earlier runs' steps too

    def save(done: int, force: bool = False) -> None:
        # Checked first: the meta copies the whole data order, not worth doing on every step.
        if checkpointer is None or not checkpointer.should_save(done, force=force):
            return
        meta = {
            "order": order.tolist(),
            "cursor": cursor,
            "losses": history,
            "rng_state": rng.bit_generator.state,
            "seconds": time.perf_counter() - t0,
        }
        state = {"params": params, "opt_state": opt_state}
        checkpointer.save(done, state, meta, force=force)

    for step in range(start, cfg.steps):
        if cursor + cfg.batch_size > len(order):
            order, cursor = rng.permutation(len(packed.ids)), 0
        idx = order[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        batch = [
            sharding.from_global_full(x[idx], mesh)
            for x in (packed.ids, packed.segments, packed.positions)
        ]
        params, opt_state, loss = update(params, opt_state, *batch)
        history.append(float(loss))  # blocks each step: honest timing, bounded queue
        if log_fn is not None:
            log_fn(step + 1, history[-1], time.perf_counter() - t0)
        stop = should_stop is not None and should_stop(step + 1)
        save(step + 1, force=stop)
        if stop:
            break
    if checkpointer is not None:
        checkpointer.wait()
    return params, history
