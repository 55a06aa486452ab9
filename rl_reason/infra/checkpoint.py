"""Orbax checkpoints of the training state: checked before restore, resumable after a crash.

A checkpoint step directory holds composite items:

  state    a pytree of jax arrays (params, optax state, step counter, PRNG key, ...), written
           with StandardSave and restored onto an abstract tree that carries shardings, so a
           state saved on one mesh restores onto another.
  meta     a small JSON dict: the run config, the data iterator's state, anything a human
           wants to read. By convention ``meta["config"]`` and ``meta["data"]``.
  metrics  (only with ``best_metric``) the metric that ranks checkpoints, e.g. eval accuracy.

Params may be an ``nnx.State`` or its ``nnx.to_pure_dict``; the two lay out differently on disk
(a State has a ``value`` level under each variable), so restore with the same kind that was saved.
Typed PRNG keys (``jax.random.key``) are stored as their key data plus the implementation's name
and come back as typed keys; restoring one as another implementation is a mismatch.
``save`` returns once the arrays are copied to host memory, so the caller may donate or delete
them while an asynchronous write is still in progress.

Orbax restores an array of another dtype by casting it silently, and restores nothing useful
when the shapes differ, so every restore compares the saved tree's shapes and dtypes with the
abstract one first and names the first parameter that disagrees (``CheckpointMismatchError``).

Orbax writes a step into a temporary directory and renames it when complete, so a process killed
mid-save leaves the previous steps intact (the temporary directory is removed when the next
``Checkpointer`` opens the directory). A complete-looking step can still be unreadable (files
removed or truncated by hand or by a disk problem): ``restore_latest`` then logs a warning naming
it, moves it aside to ``<step>.unreadable`` once an older step restored (so the run can save that
step again), and resumes from the newest step that reads.

Typical use in a trainer::

    ckpt = Checkpointer(workdir / "checkpoints", save_every=50, best_metric="eval_accuracy")
    params = abstract_on(abstract_params, sharding.state_shardings(abstract_params, mesh))
    abstract = {"params": params, "opt_state": abstract_opt_state(optimizer, params),
                "step": ..., "key": ...}       # ShapeDtypeStructs, e.g. from jax.eval_shape
    resumed = ckpt.restore_latest(abstract)
    if resumed is None:
        start, state = 0, init_state()
    else:
        start, state, meta = resumed
        data_iter.set_state(meta["data"])
    with PreemptionGuard() as guard:            # rl_reason.infra.preemption
        for step in range(start, total):
            ...
            stop = guard.should_stop(step + 1)
            ckpt.save(step + 1, state, meta={"config": cfg, "data": data_iter.get_state()},
                      metrics=eval_metrics, force=stop or step + 1 == total)
            if stop:
                break
    ckpt.close()
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from rl_reason.infra.sharding import opt_state_shardings

log = logging.getLogger(__name__)

STATE = "state"
META = "meta"
# Key of the StandardSave custom metadata that records which leaves were typed PRNG keys.
_KEY_IMPLS = "prng_key_impls"
UNREADABLE_SUFFIX = ".unreadable"
DIVERGED_SUFFIX = ".diverged"  # written inside a failing streak of a diverging run


class CheckpointMismatchError(ValueError):
    """The saved state has other parameters, shapes or dtypes than the abstract state."""


class CheckpointReadError(RuntimeError):
    """A checkpoint's files cannot be read (missing, truncated, corrupt)."""


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


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _to_abstract(x: Any) -> Any:
    """ShapeDtypeStruct for a leaf; concrete arrays are accepted as restore targets."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return jax.ShapeDtypeStruct(np.shape(x), np.result_type(x))


def _key_data_abstract(key: jax.ShapeDtypeStruct) -> tuple[jax.ShapeDtypeStruct, str]:
    """The uint32 key-data struct of an abstract typed key [*S] -> [*S, W], and its impl name."""
    impl: list[str] = []

    def data(k):
        impl.append(str(jax.random.key_impl(k)))
        return jax.random.key_data(k)

    out = jax.eval_shape(data, key)
    sharding = key.sharding
    if isinstance(sharding, NamedSharding):
        # The key-data words are one trailing axis, kept whole on every device.
        spec = tuple(sharding.spec) + (None,) * (len(key.shape) - len(sharding.spec))
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec, None))
    return jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=sharding), impl[0]


def abstract_on(abstract: Any, shardings: Any) -> Any:
    """``abstract`` with every leaf a ShapeDtypeStruct placed by ``shardings``.

    ``shardings`` is a tree prefix of ``abstract``, as for jit's ``out_shardings``: e.g.
    ``sharding.state_shardings(abstract_params, mesh)`` holds one NamedSharding per nnx Variable.
    """
    return jax.tree.map(
        lambda s, sub: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), sub
        ),
        shardings,
        abstract,
    )


def abstract_opt_state(optimizer: optax.GradientTransformation, abstract_params: Any) -> Any:
    """Restore target for ``optimizer.init(params)``: moments sharded like their parameters.

    ``abstract_params`` carries NamedShardings on one mesh (``abstract_on``); leaves of the
    optimizer state that mirror a parameter (Adam's mu and nu) take that parameter's sharding,
    the rest (step counters) are replicated on the same mesh.
    """
    leaves = jax.tree.leaves(abstract_params)
    named = [x.sharding for x in leaves if isinstance(getattr(x, "sharding", None), NamedSharding)]
    if not named or len(named) != len(leaves):
        raise ValueError(
            "abstract_opt_state needs abstract params whose every leaf has a NamedSharding; "
            "build them with checkpoint.abstract_on(abstract_params, state_shardings(...))"
        )
    params_shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
    shardings = opt_state_shardings(optimizer, abstract_params, params_shardings)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(optimizer.init, abstract_params),
        shardings,
    )


@dataclasses.dataclass
class _BestByMetric:
    """Orbax preservation policy: keep the ``n`` best checkpoints that carry ``metric``.

    Checkpoints saved without the metric (steps with no evaluation) are left to the other
    policy; orbax's own BestN would rank a metrics dict that lacks the key by calling its
    metric function on it.
    """

    metric: str
    mode: Literal["max", "min"]
    n: int

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        sign = 1.0 if self.mode == "max" else -1.0
        scored = sorted(
            (
                (sign * float(info.metrics[self.metric]), info.step, i)
                for i, info in enumerate(checkpoints)
                if info.metrics and self.metric in info.metrics
            ),
            reverse=True,  # best first; among equal values the later step
        )
        keep = {i for _, _, i in scored[: self.n]}
        return [i in keep for i in range(len(checkpoints))]


class Checkpointer:
    """Periodic, bounded, optionally asynchronous checkpoints of ``state`` plus JSON ``meta``.

    Args:
      directory: where step directories are written (created if missing).
      save_every: ``save`` writes when ``step % save_every == 0`` (or when forced).
      max_to_keep: newest checkpoints kept; older ones are deleted after each save.
      async_save: write arrays in a background thread so the next step overlaps the disk write.
        Call ``wait()`` before reading the files from elsewhere; restores and ``close`` wait.
      best_metric: also keep the ``keep_best`` checkpoints with the best value of this entry of
        ``save(..., metrics=)``, however old (e.g. ``"eval_accuracy"``).
      best_mode: ``"max"`` or ``"min"``: which end of ``best_metric`` is best.
      keep_best: how many best checkpoints to keep besides the newest ``max_to_keep``.
      read_only: only restore (evaluation, export): the directory must exist, nothing is
        saved, and the temporary directory of a save in progress elsewhere (a running training
        job) is left alone instead of cleaned up.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        save_every: int,
        max_to_keep: int = 3,
        async_save: bool = True,
        best_metric: str | None = None,
        best_mode: Literal["max", "min"] = "max",
        keep_best: int = 1,
        read_only: bool = False,
    ) -> None:
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if keep_best < 1:
            raise ValueError(f"keep_best must be >= 1, got {keep_best}")
        self.directory = os.path.abspath(os.fspath(directory))
        if read_only and not os.path.isdir(self.directory):
            raise FileNotFoundError(
                f"no checkpoint directory {self.directory}; point at the workdir of a run that "
                "saved checkpoints"
            )
        self.read_only = read_only
        self.save_every = save_every
        self.best_metric = best_metric
        self.best_mode = best_mode
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(max_to_keep)]
        best_fn = None
        if best_metric is not None:
            policies.append(_BestByMetric(best_metric, best_mode, keep_best))
            worst = -math.inf if best_mode == "max" else math.inf
            # Only makes orbax write the metrics item; ranking is _BestByMetric's.
            best_fn = lambda m: float(m.get(best_metric, worst))  # noqa: E731
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=best_fn,
            best_mode=best_mode,
            # The save rule lives in `save`; orbax's own interval logic would also save the first
            # step it ever sees, whatever its number.
            save_interval_steps=1,
            enable_async_checkpointing=async_save,
            # A process killed mid-save leaves `<step>.orbax-checkpoint-tmp`; remove it on open.
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
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
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save ``state`` and ``meta`` at ``step`` if due; returns whether a save was started.

        ``metrics`` may hold ``best_metric`` (other entries are ignored); a step saved without
        it, or with a non-finite value, is never kept as a best one. Every JAX process must call
        this with the same arguments (orbax saves collectively). A step that is already saved is
        left as it is (False), so a forced final save may safely repeat the periodic one.
        """
        step = int(step)
        if self.read_only:
            raise ValueError(f"Checkpointer({self.directory!r}) was opened read_only")
        if not self.should_save(step, force=force) or step in self._manager.all_steps():
            return False
        meta = dict(meta or {})
        try:
            # Fail here, in the caller's frame, rather than in the background writer thread.
            json.dumps(meta)
        except TypeError as e:
            raise TypeError(
                f"checkpoint meta must be JSON-serialisable ({e}); convert configs with "
                "dataclasses.asdict / ConfigDict.to_dict, arrays with .tolist() and bytes "
                "with base64"
            ) from e
        arrays, key_impls = self._keys_to_data(state)
        args = {
            STATE: ocp.args.StandardSave(arrays, custom_metadata={_KEY_IMPLS: key_impls}),
            META: ocp.args.JsonSave(meta),
        }
        return self._manager.save(
            step,
            args=ocp.args.Composite(**args),
            metrics=self._rank_metrics(step, metrics),
            force=True,
        )

    def _rank_metrics(self, step: int, metrics: Mapping[str, Any] | None) -> dict | None:
        if self.best_metric is None:
            return None
        value = (metrics or {}).get(self.best_metric)
        if value is None:
            return {}
        try:
            value = float(np.asarray(value))
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"checkpoint metric {self.best_metric!r} must be a number, got {value!r}"
            ) from e
        if not math.isfinite(value):
            log.warning(
                "checkpoint step %d: %s is %s; it will not count as a best checkpoint",
                step,
                self.best_metric,
                value,
            )
            return {}
        return {self.best_metric: value}

    @staticmethod
    def _keys_to_data(state: Any) -> tuple[Any, dict[str, str]]:
        impls = {}

        def convert(path, x):
            if not _is_key(x):
                return x
            impls[_path_str(path)] = str(jax.random.key_impl(x))
            return jax.random.key_data(x)

        return jax.tree_util.tree_map_with_path(convert, state), impls

    def wait(self) -> None:
        """Block until an asynchronous save has reached the disk."""
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The kept step with the best ``best_metric`` (None without one or before any)."""
        if self.best_metric is None:
            return None
        self.wait()
        sign = 1.0 if self.best_mode == "max" else -1.0
        scored = [
            (sign * float(m[self.best_metric]), s)
            for s in self._manager.all_steps()
            if (m := self._manager.metrics(s)) and self.best_metric in m
        ]
        return max(scored)[1] if scored else None

    def restore(
        self, abstract_state: Any, step: int | None = None
    ) -> tuple[int, Any, dict[str, Any]]:
        """Restore ``(step, state, meta)`` onto ``abstract_state`` (latest step by default).

        ``abstract_state`` has the tree structure of the saved state with
        ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape`` output, or with ``sharding=`` set so
        arrays come back sharded, see ``abstract_on``); concrete arrays are accepted too.
        Raises CheckpointMismatchError (a ValueError) before reading any array if a path, shape
        or dtype differs from what was saved, and whatever orbax raises if the files cannot be
        read; ``restore_latest`` falls back to older steps instead.
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
        return self._restore_step(step, abstract_state)

    def restore_item(self, name: str, abstract_item: Any, step: int) -> tuple[Any, dict[str, Any]]:
        """Only ``state[name]`` of `step` (e.g. the params, for evaluation: no optimizer state
        is built or read) and the meta. Paths, shapes and dtypes are checked as in `restore`;
        the other saved arrays are left on disk."""
        self.wait()
        step = int(step)
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; saved steps: "
                f"{self.all_steps()}"
            )
        target = {name: jax.tree.map(_to_abstract, abstract_item)}
        self._check_matches(step, target, {}, partial=True)
        restore_args = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), target
        )
        with ocp.PyTreeCheckpointer() as reader:
            arrays = reader.restore(
                os.path.join(self._step_dir(step), STATE),
                args=ocp.args.PyTreeRestore(
                    item=target, restore_args=restore_args, partial_restore=True
                ),
            )
        meta = self._manager.restore(
            step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()})
        )
        return arrays[name], dict(meta[META] or {})

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """``(step, state, meta)`` of the newest readable checkpoint; None if there is none.

        A step whose files cannot be read is logged and skipped for the one before it; once an
        older step restored, the skipped ones are moved aside to ``<step>.unreadable`` (kept
        for inspection, no longer counted as saved). Raises CheckpointReadError if checkpoints
        exist but none can be read, and CheckpointMismatchError at once if the newest readable
        one holds another model or optimizer than ``abstract_state``.
        """
        self.wait()
        # Steps written or moved by another process since this one opened the directory.
        self._manager.reload()
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            return None
        failed: list[tuple[int, str]] = []
        for step in steps:
            try:
                result = self._restore_step(step, abstract_state)
                error = None
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001  (any read failure: try an older step)
                result, error = None, f"{type(e).__name__}: {_first_line(e)}"
            if not _all_processes_ok(error is None):
                error = error or "unreadable on another process"
                log.warning(
                    "checkpoint %s cannot be read (%s); trying the previous one",
                    self._step_dir(step),
                    error,
                )
                failed.append((step, error))
                continue
            if failed and not self.read_only:
                self._move_aside([s for s, _ in failed])
            return result
        listing = "; ".join(f"step {s}: {err}" for s, err in failed)
        raise CheckpointReadError(
            f"no checkpoint in {self.directory} can be read ({listing}). Inspect or remove these "
            "step directories, or start this run in a fresh workdir."
        )

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def discard_from(self, first_step: int, suffix: str = DIVERGED_SUFFIX) -> list[int]:
        """Move every checkpoint of step >= `first_step` aside to ``<step><suffix>`` (kept for
        inspection, no longer resumed from); returns their steps."""
        self.wait()
        self._manager.reload()
        steps = sorted(s for s in self._manager.all_steps() if s >= first_step)
        if steps:
            self._move_aside(steps, suffix)
        return steps

    def _move_aside(self, steps: Sequence[int], suffix: str = UNREADABLE_SUFFIX) -> None:
        if jax.process_index() == 0:
            for step in steps:
                src = self._step_dir(step)
                dst = src + suffix
                if os.path.exists(dst):
                    dst = f"{dst}.{time.strftime('%Y%m%dT%H%M%S')}.{os.getpid()}"
                os.rename(src, dst)
                log.warning("moved checkpoint %s aside to %s", src, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("rl_reason.infra.checkpoint.move_aside")
        self._manager.reload()

    def _restore_step(self, step: int, abstract_state: Any) -> tuple[int, Any, dict[str, Any]]:
        abstract_state = jax.tree.map(_to_abstract, abstract_state)
        # Typed keys travel as their uint32 key data; remember where, to wrap them again.
        key_impls: dict[str, str] = {}
        key_targets: dict[str, jax.ShapeDtypeStruct] = {}

        def key_to_data(path, x):
            if not _is_key(x):
                return x
            data, key_impls[_path_str(path)] = _key_data_abstract(x)
            key_targets[_path_str(path)] = x
            return data

        target = jax.tree_util.tree_map_with_path(key_to_data, abstract_state)
        self._check_matches(step, target, key_impls)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardRestore(target), META: ocp.args.JsonRestore()}
            ),
        )

        def data_to_key(path, x):
            name = _path_str(path)
            if name not in key_impls:
                return x
            key = jax.random.wrap_key_data(x, impl=key_impls[name])
            sharding = key_targets[name].sharding
            if sharding is None or key.sharding == sharding:
                return key
            # jit rather than device_put: the sharding may span other processes' devices.
            return jax.jit(lambda k: k, out_shardings=sharding)(key)

        state = jax.tree_util.tree_map_with_path(data_to_key, restored[STATE])
        meta = restored[META]
        if meta is not None and not isinstance(meta, dict):
            raise CheckpointReadError(f"meta of {self._step_dir(step)} is not a JSON object")
        return step, state, dict(meta or {})

    def _check_matches(
        self, step: int, target: Any, key_impls: Mapping[str, str], *, partial: bool = False
    ) -> None:
        where = self._step_dir(step)
        saved_meta = self._manager.item_metadata(step)[STATE]
        saved_tree = getattr(saved_meta, "tree", saved_meta)
        saved = {
            _path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(saved_tree)[0]
        }
        if not saved:
            raise CheckpointReadError(f"checkpoint {where} lists no arrays (metadata lost)")
        custom = getattr(saved_meta, "custom_metadata", None) or {}
        saved_impls = dict(custom.get(_KEY_IMPLS) or {})
        expected = {
            _path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]
        }
        advice = (
            "Restore with the model/optimizer config the checkpoint was written with (its meta "
            "holds the config), or start this run in a fresh workdir."
        )
        for path, want in expected.items():
            if path not in saved:
                raise CheckpointMismatchError(
                    f"checkpoint {where} has no parameter '{path}' that the abstract state "
                    f"expects (saved parameters include {sorted(saved)[:5]}). {advice}"
                )
            if saved_impls.get(path) != key_impls.get(path):
                raise CheckpointMismatchError(
                    f"checkpoint {where} holds at '{path}' "
                    f"{_describe_key(saved_impls.get(path))}, but the abstract state expects "
                    f"{_describe_key(key_impls.get(path))}. {advice}"
                )
            got = saved[path]
            got_shape, got_dtype = tuple(got.shape), np.dtype(got.dtype)
            want_shape, want_dtype = tuple(want.shape), np.dtype(want.dtype)
            if got_shape != want_shape or got_dtype != want_dtype:
                raise CheckpointMismatchError(
                    f"checkpoint {where} does not match the abstract state at '{path}': saved "
                    f"shape {got_shape} dtype {got_dtype}, expected shape {want_shape} dtype "
                    f"{want_dtype}. {advice} To change dtype on purpose, restore with the saved "
                    "dtype and cast afterwards."
                )
        extra = sorted(set(saved) - set(expected))
        if extra and not partial:
            raise CheckpointMismatchError(
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


def _describe_key(impl: str | None) -> str:
    return "a plain array" if impl is None else f"a typed PRNG key ({impl})"


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    return text if len(text) <= limit else text[:limit] + "..."


def _all_processes_ok(ok: bool) -> bool:
    """True when ``ok`` holds on every JAX process, so all of them restore the same step."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))
