"""Orbax checkpoints of the training state, with a shape/dtype check before every restore.

A checkpoint step directory holds composite items:

  state   a pytree of jax arrays (params as a pure dict, optax state, step counter, ...),
          written with StandardSave and restored onto an abstract tree that carries shardings.
  meta    a small JSON dict (the run config, data position, anything a human wants to read).

Params may be an ``nnx.State`` or its ``nnx.to_pure_dict``; the two lay out differently on disk
(a State has a ``value`` level under each variable), so restore with the same kind that was saved.
``save`` returns once the arrays are copied to host memory, so the caller may donate or delete
them while an asynchronous write is still in progress.

Orbax restores an array of another dtype by casting it silently, and restores nothing useful
when the shapes differ, so ``restore`` compares the saved tree's shapes and dtypes with the
abstract one first and names the first parameter that disagrees.

Typical use in a trainer::

    ckpt = Checkpointer(workdir / "checkpoints", save_every=50)
    abstract = jax.eval_shape(init_state)           # or with shardings from sharding.py
    if ckpt.latest_step() is not None:
        start, state, meta = ckpt.restore(abstract)
    for step in range(start, total):
        ...
        ckpt.save(step, state, meta={"config": cfg_dict}, force=step == total - 1)
    ckpt.close()
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

STATE = "state"
META = "meta"


def _path_str(path: tuple[Any, ...]) -> str:
    """'params/layers/0/kernel' from a jax key path; dict keys, attributes and indices alike.

    Orbax writes namedtuples (optax states) back as dicts, so an attribute on the abstract side
    and a dict key on the saved side must compare equal.
    """
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _to_abstract(x: Any) -> Any:
    """ShapeDtypeStruct for a leaf; concrete arrays are accepted as restore targets."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return jax.ShapeDtypeStruct(np.shape(x), np.result_type(x))


class Checkpointer:
    """Periodic, bounded, optionally asynchronous checkpoints of ``state`` plus JSON ``meta``.

    Args:
      directory: where step directories are written (created if missing).
      save_every: ``save`` writes when ``step % save_every == 0`` (or when forced).
      max_to_keep: newest checkpoints kept; older ones are deleted after each save.
      async_save: write arrays in a background thread so the next step overlaps the disk write.
        Call ``wait()`` before reading the files from elsewhere; ``restore`` and ``close`` wait.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        save_every: int,
        max_to_keep: int = 3,
        async_save: bool = True,
    ) -> None:
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            # The save rule lives in `save`; orbax's own interval logic would also save the first
            # step it ever sees, whatever its number.
            save_interval_steps=1,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            # Registered up front so item_metadata can read a step written by an earlier process.
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                META: ocp.JsonCheckpointHandler(),
            },
        )

    def should_save(self, step: int, *, force: bool = False) -> bool:
        return force or step % self.save_every == 0

    def save(
        self,
        step: int,
        state: Any,
        meta: Mapping[str, Any] | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Save ``state`` and ``meta`` at ``step`` if due; returns whether a save was started.

        Every JAX process must call this with the same arguments (orbax saves collectively).
        A step that is already saved is left as it is (False), so a forced final save may
        safely repeat the periodic one.
        """
        step = int(step)
        if not self.should_save(step, force=force) or step in self._manager.all_steps():
            return False
        meta = dict(meta or {})
        try:
            # Fail here, in the caller's frame, rather than in the background writer thread.
            json.dumps(meta)
        except TypeError as e:
            raise TypeError(
                f"checkpoint meta must be JSON-serialisable ({e}); convert configs with "
                "dataclasses.asdict / ConfigDict.to_dict and arrays with .tolist()"
            ) from e
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
            ),
            force=True,
        )

    def wait(self) -> None:
        """Block until an asynchronous save has reached the disk."""
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(
        self, abstract_state: Any, step: int | None = None
    ) -> tuple[int, Any, dict[str, Any]]:
        """Restore ``(step, state, meta)`` onto ``abstract_state`` (latest step by default).

        ``abstract_state`` has the tree structure of the saved state with
        ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape`` output, or with ``sharding=`` set so
        arrays come back sharded); concrete arrays are accepted too. Raises ValueError before
        reading any array if a path, shape or dtype differs from what was saved.
        """
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(
                    f"no checkpoint in {self.directory}; start from scratch or point the run at "
                    "the workdir that holds the checkpoints"
                )
        step = int(step)
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; saved steps: "
                f"{self.all_steps()}"
            )
        abstract_state = jax.tree.map(_to_abstract, abstract_state)
        self._check_matches(step, abstract_state)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
            ),
        )
        return step, restored[STATE], dict(restored[META] or {})

    def _check_matches(self, step: int, abstract_state: Any) -> None:
        saved_tree = self._manager.item_metadata(step)[STATE]
        saved = {
            _path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(saved_tree)[0]
        }
        expected = {
            _path_str(p): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
        }
        where = os.path.join(self.directory, str(step))
        advice = (
            "Restore with the model/optimizer config the checkpoint was written with (its meta "
            "holds the config), or start this run in a fresh workdir."
        )
        for path, want in expected.items():
            if path not in saved:
                raise ValueError(
                    f"checkpoint {where} has no parameter '{path}' that the abstract state "
                    f"expects (saved parameters include {sorted(saved)[:5]}). {advice}"
                )
            got = saved[path]
            got_shape, got_dtype = tuple(got.shape), np.dtype(got.dtype)
            want_shape, want_dtype = tuple(want.shape), np.dtype(want.dtype)
            if got_shape != want_shape or got_dtype != want_dtype:
                raise ValueError(
                    f"checkpoint {where} does not match the abstract state at '{path}': saved "
                    f"shape {got_shape} dtype {got_dtype}, expected shape {want_shape} dtype "
                    f"{want_dtype}. {advice} To change dtype on purpose, restore with the saved "
                    "dtype and cast afterwards."
                )
        extra = sorted(set(saved) - set(expected))
        if extra:
            raise ValueError(
                f"checkpoint {where} holds parameters the abstract state lacks, first "
                f"'{extra[0]}' ({len(extra)} in all). {advice}"
            )

    def close(self) -> None:
        """Finish any pending save and release the manager's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
