"""Checkpoints: save and resume a whole run, or load a model's parameters alone, with Orbax.

A run's checkpoints live in `WORKDIR/checkpoints/STEP/`, one Orbax `CheckpointManager` step each, holding
three items written together as one composite checkpoint:

- `state`: the training state pytree (model parameters, optimizer state, step, RNG keys), any pytree whose
  leaves are arrays or scalars: a `TrainState`, a dict, an NNX module. Typed PRNG keys are stored as their
  raw key data and re-wrapped on restore.
- `data`: the data iterator state (a JSON dict), so a resumed run continues with the exact next batch.
- `meta`: JSON metadata: flaxlm version, config and its hash, tokenizer (its JSON dict or fingerprint), the
  shape and dtype of every state leaf, and a 64-bit fingerprint of every leaf and of the data state.

Guarantees:

- Atomic: Orbax writes a step into `STEP.orbax-checkpoint-tmp*` and renames it to `STEP` only when every
  item is written (where rename is not atomic, e.g. object stores, Orbax marks completion with a
  `commit_success.txt` file instead). `latest_step()` and `restore()` only ever see finalized steps, so a
  process killed mid-save leaves a temporary directory that is ignored (and removed when the next
  `Checkpointer` opens the directory).
- Async: `save` returns once the arrays are copied off the accelerator; files are written in a background
  thread. `wait_until_finished()` (or `close()`) blocks until the last save is on disk; the next `save`
  waits for the previous one. A failed background write surfaces as a `CheckpointError` from the next
  `save`, `wait_until_finished`, `close` or (without waiting) `check_for_errors`, and older checkpoints are
  never deleted for a failed one. A write failure (full disk, read-only directory) is that ONE line naming
  the directory and step: the tracebacks Orbax's threads log for it are dropped (see `_OrbaxErrorRecords`).
- Retention: the last `max_to_keep` steps are kept, plus the `keep_best` steps with the best value of
  `best_metric` (mode 'min' or 'max') among those saved with that metric: Orbax's `LatestN` and `BestN`
  preservation policies joined by `AnyPreservationPolicy`, so a step survives if either keeps it. Orbax
  records each step's metrics beside it, so a resumed run still knows which steps are best.
- Verified: restore compares the template with the recorded leaf shapes/dtypes before reading any array
  (a mismatch names the key path and both shapes), checks the flaxlm version and tokenizer fingerprint, and
  recomputes every leaf's fingerprint after reading, since Orbax/tensorstore do not detect flipped bytes in
  array data. Every problem is a one-line `CheckpointError` naming the checkpoint directory and step.

Sharding: restore places every array with the template's sharding (a concrete template's arrays, or the
`jax.ShapeDtypeStruct.sharding` of an abstract one from `jax.eval_shape`), so a checkpoint written on one
mesh restores onto another mesh or onto a single device.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import pathlib
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

import flaxlm
from flaxlm.errors import FlaxlmError

logger = logging.getLogger(__name__)


class _OrbaxErrorRecords(logging.Filter):
    """Drops the ERROR records (with tracebacks) that Orbax logs for a failed write or read.

    Every such failure reaches the caller as a one-line CheckpointError, so the multi-page tracebacks
    Orbax's background threads log through absl (and asyncio's "Task exception was never retrieved" for
    its aborted writes, or "Future exception was never retrieved" for the file writes its thread pool was
    still running) would only bury that line; they are kept at DEBUG level on this module's logger.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from_orbax = (f"{os.sep}orbax{os.sep}" in record.pathname or "orbax" in str(record.msg)
                      or _raised_in_orbax(record.exc_info))
        if record.levelno >= logging.ERROR and from_orbax:
            logger.debug("orbax: %s", record.getMessage().splitlines()[0])
            return False
        return True


def _is_cleanup_race(error: BaseException | None) -> bool:
    """Whether `error`, or an exception it was raised from, is a failed save's clean-up race."""
    while error is not None:
        if getattr(error, "errno", None) in _CLEANUP_RACE_ERRNOS:
            return True
        error = error.__cause__ or error.__context__
    return False


def _raised_in_orbax(exc_info) -> bool:
    """Whether the exception of a log record was raised from inside Orbax's code."""
    tb = exc_info[2] if exc_info else None
    while tb is not None:
        if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


for _name in ("absl", "asyncio"):
    logging.getLogger(_name).addFilter(_OrbaxErrorRecords())

_ABORTED_WRITE_NOISE = ("Event loop is closed", "cannot schedule new futures after shutdown")


def _drop_aborted_write_noise(previous):
    """A `sys.unraisablehook` that drops the echoes of Orbax's aborted concurrent writes.

    When one array write fails (full disk), Orbax closes the event loop of its save thread while tensorstore
    still completes the other writes; their callbacks then hit the closed loop and print "Event loop is
    closed" tracebacks through `sys.unraisablehook` (the failure itself reaches the caller as a
    CheckpointError). Any other unraisable exception goes to the `previous` hook.
    """

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) in _ABORTED_WRITE_NOISE):
            previous(unraisable)

    return hook


sys.unraisablehook = _drop_aborted_write_noise(sys.unraisablehook)
warnings.filterwarnings("ignore", message=r"coroutine '[^']*(serialize|write)[^']*' was never awaited",
                        category=RuntimeWarning)

CHECKPOINT_DIR = "checkpoints"
# After a failed background save (full disk), tensorstore may still be finishing that save's other writes
# while Orbax removes its temporary directory, so the next save can fail with "Directory not empty" or find
# a file of its own removed ("No such file or directory"): it is retried after a short wait.
_CLEANUP_RETRIES = 3
_CLEANUP_WAIT_S = 0.5
_CLEANUP_RACE_ERRNOS = (errno.ENOTEMPTY, errno.ENOENT)
MODEL_KEY = "model"
FORMAT_VERSION = 1
VERSION_CHECKS = ("major", "exact", "warn")

_STATE, _DATA, _META = "state", "data", "meta"


class CheckpointError(FlaxlmError):
    """A checkpoint cannot be written or does not match what is being restored into it."""


def checkpoint_dir(workdir: str | os.PathLike) -> pathlib.Path:
    """The directory holding a run's checkpoints: `workdir/checkpoints`."""
    return pathlib.Path(workdir) / CHECKPOINT_DIR


class Checkpointer:
    """Saves and restores a run's checkpoints in `workdir/checkpoints` (see the module docstring).

    Args:
      workdir: the run's directory; checkpoints go to `workdir/checkpoints`, created when missing.
      config: the run's config (a dict or dataclass of JSON values), recorded with its hash in each step.
      tokenizer: the tokenizer's JSON dict (recorded and fingerprinted) or a fingerprint string. On restore a
        checkpoint whose tokenizer fingerprint differs is an error; None skips the check.
      max_to_keep: keep the latest N steps (None keeps all).
      best_metric: name of a metric passed to `save(metrics=...)`; the `keep_best` steps with the best value
        are kept as well, whatever their age. None keeps only the latest steps.
      best_mode: 'min' (a loss) or 'max' (an accuracy).
      keep_best: how many best steps to keep.
      async_save: write in a background thread (True) or block in `save` (False).
      version_check: 'major' (default) raises on a checkpoint from another flaxlm major version and warns on
        any other version difference; 'exact' raises on any difference; 'warn' only warns.
      read_only: never create, write or delete anything (for eval and sampling).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        config: Any = None,
        tokenizer: Mapping[str, Any] | str | None = None,
        max_to_keep: int | None = 3,
        best_metric: str | None = None,
        best_mode: str = "min",
        keep_best: int = 1,
        async_save: bool = True,
        version_check: str = "major",
        read_only: bool = False,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be None or >= 1, got {max_to_keep}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        if keep_best < 1:
            raise ValueError(f"keep_best must be >= 1, got {keep_best}")
        _check_version_policy(version_check)
        self.directory = checkpoint_dir(workdir)
        self.best_metric = best_metric
        self.version_check = version_check
        self._config = _to_json("config", config)
        self._tokenizer = tokenizer if isinstance(tokenizer, Mapping) else None
        if self._tokenizer is not None:
            self._tokenizer = _to_json("tokenizer", self._tokenizer)
        self._tokenizer_fingerprint = _tokenizer_fingerprint(tokenizer)
        self._pending_step: int | None = None

        policies = [checkpoint_managers.LatestN(n=max_to_keep)]
        best_fn = None
        if best_metric is not None:
            best_fn = _metric_getter(best_metric, best_mode)
            policies.append(
                checkpoint_managers.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            best_fn=best_fn,
            best_mode=best_mode,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=False,
        )
        if not read_only:
            _make_writable_dir(self.directory)
        elif not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no checkpoint directory")
        self._options = options
        self._manager = _open_manager(self.directory, options, ocp.StandardCheckpointHandler())

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
    ) -> bool:
        """Starts saving `state`, `data_state` and the metadata as checkpoint `step`; returns whether it saves.

        A step at or below the latest saved step is skipped (returns False) unless `force`, which raises
        for an existing step. With async saving the files are written after this returns; errors of the
        previous save are raised here. `metrics` (name -> number) rank the step for `best_metric`; a step
        saved without that metric is kept only as one of the latest.
        """
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        step = int(step)
        data_state = _to_json("data_state", {} if data_state is None else data_state)
        if not isinstance(data_state, dict):
            raise CheckpointError(f"data_state must be a JSON object (dict), got {type(data_state).__name__}")
        names, leaves, _ = _flatten(state, "state")
        stored = [_storable(path, leaf) for path, leaf in zip(names, leaves)]
        paths = ["/".join(n) for n in names]
        meta = {
            "format": FORMAT_VERSION,
            "flaxlm_version": flaxlm.__version__,
            "step": step,
            "config": self._config,
            "config_hash": _json_hash(self._config) if self._config is not None else None,
            "tokenizer": self._tokenizer,
            "tokenizer_fingerprint": self._tokenizer_fingerprint,
            "leaves": {p: _leaf_spec(leaf) for p, leaf in zip(paths, leaves)},
            "param_count": _param_count(names, leaves),
            "checksums": dict(zip(paths, _fingerprints(stored))),
            "data_checksum": _json_hash(data_state),
        }
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(_nest(names, stored)),
                _DATA: ocp.args.JsonSave(data_state),
                _META: ocp.args.JsonSave(meta),
            }
        )
        self._raise_pending_error()
        for attempt in range(_CLEANUP_RETRIES + 1):
            try:
                saved = self._manager.save(step, args=args, metrics=self._metrics(metrics), force=force)
                break
            except Exception as e:
                self._reopen()
                if attempt < _CLEANUP_RETRIES and _is_cleanup_race(e):
                    time.sleep(_CLEANUP_WAIT_S)  # a failed save's late writes are still landing in its temp dir
                    continue
                raise CheckpointError(
                    f"{self.directory}: cannot write checkpoint for step {step}: {_one_line(e)}"
                ) from e
        if saved:
            self._pending_step = step
        return saved

    def wait_until_finished(self) -> None:
        """Blocks until the last `save` is on disk; raises CheckpointError if it failed."""
        self._raise_pending_error()

    def check_for_errors(self) -> None:
        """Raises CheckpointError if the last `save` has failed; never waits for one still being written."""
        if self._pending_step is not None and not self._manager.is_saving_in_progress():
            self._raise_pending_error()

    def close(self) -> None:
        """Waits for the last save (raising CheckpointError if it failed) and releases Orbax's resources."""
        try:
            self._raise_pending_error()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except CheckpointError as e:
            if exc_type is None:
                raise
            logger.debug("%s", e)  # the error already on its way out is the one to report

    def all_steps(self) -> list[int]:
        """Steps of the finalized checkpoints, ascending (waits for an in-flight save, re-reads the disk)."""
        self._reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The latest finalized step, or None when there is none (waits for an in-flight save)."""
        self._reload()
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best `best_metric` (the latest step when no metric is tracked), or None."""
        self._reload()
        return self._manager.best_step()

    def metadata(self, step: int | None = None) -> dict[str, Any]:
        """The metadata JSON of `step` (default: latest), without reading any array."""
        step = self._resolve_step(step)
        return _read_meta(self._manager, step, self.directory)

    def restore(
        self,
        state_template: Any,
        step: int | None = None,
        *,
        default_sharding: jax.sharding.Sharding | None = None,
    ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """Restores `(state, data_state, metadata)` from `step` (default: the latest finalized step).

        `state_template` is a state of the same structure: concrete (its arrays' shardings are used) or
        abstract from `jax.eval_shape` (each `ShapeDtypeStruct.sharding`; `default_sharding`, by default
        the first device, where it is None). The restored state has the template's tree structure. A
        config hash that differs from this run's only logs a warning (a resumed run may change the learning
        rate); the recorded leaf shapes and dtypes decide whether the checkpoint fits.
        """
        step = self._resolve_step(step)
        meta = _read_meta(self._manager, step, self.directory)
        _check_meta(meta, self.directory, step, self.version_check, self._tokenizer_fingerprint)
        if self._config is not None and meta.get("config_hash") not in (None, _json_hash(self._config)):
            logger.warning(
                "%s: step %d was saved with config hash %s, this run's config hash is %s",
                self.directory, step, meta.get("config_hash"), _json_hash(self._config),
            )
        names, leaves, treedef = _flatten(state_template, "state_template")
        _check_leaves(meta, names, leaves, self.directory, step, cast_floats=False)
        targets = [_target(leaf, default_sharding) for leaf in leaves]
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardRestore(_nest(names, targets)),
                _DATA: ocp.args.JsonRestore(),
            }
        )
        restored = _restore(self._manager, step, args, self.directory)
        stored = _pick(restored[_STATE], names)
        _verify(meta, names, stored, self.directory, step)
        data_state = dict(restored[_DATA] or {})
        if _json_hash(data_state) != meta.get("data_checksum"):
            raise CheckpointError(
                f"{_step_path(self.directory, step)}: checksum mismatch in the data iterator state (corrupt file)"
            )
        values = [_from_storable(value, leaf) for value, leaf in zip(stored, leaves)]
        return jax.tree_util.tree_unflatten(treedef, values), data_state, meta

    def _reload(self) -> None:
        """Re-reads the finalized steps from disk, once no save is in flight (Orbax lists an in-flight step)."""
        self._raise_pending_error()
        self._manager.reload()

    def _resolve_step(self, step: int | None) -> int:
        self._reload()
        steps = self._manager.all_steps()
        if step is None:
            step = self._manager.latest_step()
            if step is None:
                raise CheckpointError(f"{self.directory}: no finalized checkpoint to restore")
        elif step not in steps:
            raise CheckpointError(
                f"{self.directory}: no finalized checkpoint for step {step} (have {sorted(steps)})"
            )
        return step

    def _metrics(self, metrics: Mapping[str, float] | None) -> dict[str, float] | None:
        if self.best_metric is None or metrics is None:
            return None
        if self.best_metric not in metrics:
            return None
        value = float(metrics[self.best_metric])
        if not math.isfinite(value):
            logger.warning("best metric %s is %s: this step is not a best candidate", self.best_metric, value)
            return None
        return {name: float(v) for name, v in metrics.items() if np.ndim(v) == 0 and math.isfinite(float(v))}

    def _raise_pending_error(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            step, self._pending_step = self._pending_step, None
            self._reopen()
            raise CheckpointError(
                f"{self.directory}: writing checkpoint for step {step} failed: {_one_line(e)}"
            ) from e
        self._pending_step = None

    def _reopen(self) -> None:
        """Replaces a manager whose background save failed (Orbax re-raises that failure forever).

        The old manager is closed first: that joins the writes of the failed save still in flight, which
        would otherwise race the new manager's clean-up of their temporary directory ("Directory not empty").
        """
        try:
            self._manager.close()
        except Exception as e:  # the failure being replaced; it has been reported already
            logger.debug("closing the failed checkpoint manager: %s", _one_line(e))
        self._manager = _open_manager(self.directory, self._options, ocp.StandardCheckpointHandler())


def restore_params(
    workdir_or_path: str | os.PathLike,
    model_template: Any,
    *,
    step: int | None = None,
    prefix: str | None = None,
    version_check: str = "major",
    tokenizer: Mapping[str, Any] | str | None = None,
    default_sharding: jax.sharding.Sharding | None = None,
) -> Any:
    """Loads a checkpoint's model parameters into a module shaped like `model_template`; returns it.

    `workdir_or_path` is a run's workdir, its `checkpoints` directory or one step directory inside it.
    The saved state's `model` subtree (or `model/<prefix>`, e.g. prefix='encoder' to load a pretrained
    model's encoder into a standalone encoder) must match the template exactly: a missing or unexpected key,
    or another shape, raises CheckpointError naming the key path and both shapes. Floating-point leaves are
    cast to the template's dtype (e.g. float32 training weights into a bfloat16 inference model). Arrays
    land on the template's devices/shardings, so a checkpoint from any mesh loads onto one device. To fill a
    sub-module, pass it as the template and assign the result, e.g.
    `clf.encoder = restore_params(path, clf.encoder)`.
    """
    _check_version_policy(version_check)
    manager, directory, step = _open_read_only(workdir_or_path, step)
    try:
        meta = _read_meta(manager, step, directory)
        _check_meta(meta, directory, step, version_check, _tokenizer_fingerprint(tokenizer))
        root = (MODEL_KEY,) + (tuple(prefix.strip("/").split("/")) if prefix else ())
        names, leaves, treedef = _flatten(model_template, "model_template")
        full_names = [root + n for n in names]
        _check_leaves(meta, full_names, leaves, directory, step, cast_floats=True, root=root)
        targets = [
            _target(leaf, default_sharding, saved_dtype=meta["leaves"]["/".join(n)]["dtype"])
            for n, leaf in zip(full_names, leaves)
        ]
        item = _nest(full_names, targets)
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.PyTreeRestore(
                    item=item,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                    partial_restore=True,
                )
            }
        )
        restored = _restore(manager, step, args, directory)
        stored = _pick(restored[_STATE], full_names)
        _verify(meta, full_names, stored, directory, step)
    finally:
        manager.close()
    values = [_from_storable(value, leaf) for value, leaf in zip(stored, leaves)]
    return jax.tree_util.tree_unflatten(treedef, values)


def load_metadata(workdir_or_path: str | os.PathLike, *, step: int | None = None) -> dict[str, Any]:
    """The metadata JSON (config, tokenizer, versions, leaf shapes) of a checkpoint, reading no array.

    `workdir_or_path` is as for `restore_params`; `step` defaults to the latest finalized step.
    """
    manager, directory, step = _open_read_only(workdir_or_path, step)
    try:
        return _read_meta(manager, step, directory)
    finally:
        manager.close()


def _open_read_only(workdir_or_path, step: int | None) -> tuple[ocp.CheckpointManager, pathlib.Path, int]:
    """A read-only manager on a workdir/checkpoints/step path and the finalized step to read (default: latest)."""
    directory, step = _locate(pathlib.Path(workdir_or_path), step)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    manager = _open_manager(directory, options, ocp.PyTreeCheckpointHandler())
    if step is None:
        step = manager.latest_step()
        if step is None:
            manager.close()
            raise CheckpointError(f"{directory}: no finalized checkpoint to restore")
    elif step not in manager.all_steps():
        manager.close()
        raise CheckpointError(f"{directory}: no finalized checkpoint for step {step}")
    return manager, directory, step


# ---------------------------------------------------------------------------------------------- directories


def _make_writable_dir(directory: pathlib.Path) -> None:
    """Creates `directory` and checks that files can be created in it, raising CheckpointError naming it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_probe"):
            pass
    except OSError as e:
        raise CheckpointError(f"{directory}: checkpoint directory is not writable: {_one_line(e)}") from e


def _open_manager(directory: pathlib.Path, options, state_handler) -> ocp.CheckpointManager:
    try:
        return ocp.CheckpointManager(
            directory.absolute(),
            options=options,
            item_handlers={
                _STATE: state_handler,
                _DATA: ocp.JsonCheckpointHandler(),
                _META: ocp.JsonCheckpointHandler(),
            },
        )
    except Exception as e:
        raise CheckpointError(f"{directory}: cannot open checkpoint directory: {_one_line(e)}") from e


def _locate(path: pathlib.Path, step: int | None) -> tuple[pathlib.Path, int | None]:
    """Maps a workdir, a checkpoints directory or a step directory to (checkpoints directory, step)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint, checkpoints directory or workdir")
    if (path / CHECKPOINT_DIR).is_dir():
        return path / CHECKPOINT_DIR, step
    if (path / _META).is_dir() and path.name.isdigit():
        if step is not None and step != int(path.name):
            raise CheckpointError(f"{path}: is the checkpoint of step {int(path.name)}, not step {step}")
        return path.parent, int(path.name)
    return path, step


def _step_path(directory: pathlib.Path, step: int) -> pathlib.Path:
    return directory / str(step)


# -------------------------------------------------------------------------------------------- orbax calls


def _read_meta(manager: ocp.CheckpointManager, step: int, directory: pathlib.Path) -> dict[str, Any]:
    if not (_step_path(directory, step) / _META).is_dir():
        raise CheckpointError(f"{_step_path(directory, step)}: not a flaxlm checkpoint (no '{_META}' item)")
    restored = _restore(manager, step, ocp.args.Composite(**{_META: ocp.args.JsonRestore()}), directory)
    meta = restored[_META]
    problem = _meta_problem(meta)
    if problem:
        raise CheckpointError(f"{_step_path(directory, step)}: checkpoint metadata is incomplete or corrupt: {problem}")
    return meta


def _meta_problem(meta: Any) -> str | None:
    """What is wrong with the structure of a checkpoint's metadata JSON, or None when it has what restore reads."""
    if not isinstance(meta, dict):
        return f"expected a JSON object, got {type(meta).__name__}"
    for key, kinds in (("leaves", dict), ("checksums", dict), ("flaxlm_version", str), ("data_checksum", str),
                       ("config_hash", (str, type(None))), ("tokenizer_fingerprint", (str, type(None)))):
        if not isinstance(meta.get(key), kinds):
            return f"'{key}' is {type(meta.get(key)).__name__}" if key in meta else f"no '{key}'"
    for path, spec in meta["leaves"].items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape) and isinstance(spec.get("dtype"), str)):
            return f"leaf {path!r} has no valid shape and dtype"
    if not all(isinstance(v, str) for v in meta["checksums"].values()):
        return "a checksum is not a string"
    return None


def _restore(manager: ocp.CheckpointManager, step: int, args, directory: pathlib.Path):
    try:
        return manager.restore(step, args=args)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"{_step_path(directory, step)}: cannot read checkpoint of step {step} (corrupt or incomplete): "
            f"{_one_line(e)}"
        ) from e


# ------------------------------------------------------------------------------------------------- checks


def _check_version_policy(version_check: str) -> None:
    if version_check not in VERSION_CHECKS:
        raise ValueError(f"version_check must be one of {VERSION_CHECKS}, got {version_check!r}")


def _check_meta(meta, directory, step, version_check, tokenizer_fingerprint) -> None:
    """Raises CheckpointError for an unknown format, an incompatible flaxlm version or another tokenizer."""
    where = _step_path(directory, step)
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: checkpoint format {meta.get('format')} is not supported (expected {FORMAT_VERSION})"
        )
    saved, current = str(meta.get("flaxlm_version")), flaxlm.__version__
    if saved != current:
        message = f"{where}: checkpoint was written by flaxlm {saved}, this is flaxlm {current}"
        major_differs = saved.split(".")[0] != current.split(".")[0]
        if version_check == "exact" or (version_check == "major" and major_differs):
            raise CheckpointError(message + f" (version_check={version_check!r})")
        logger.warning(message)
    saved_tok = meta.get("tokenizer_fingerprint")
    if tokenizer_fingerprint is not None and saved_tok is not None and saved_tok != tokenizer_fingerprint:
        raise CheckpointError(
            f"{where}: tokenizer does not match the checkpoint: checkpoint tokenizer fingerprint {saved_tok}, "
            f"this run's {tokenizer_fingerprint}"
        )


def _check_leaves(meta, names, leaves, directory, step, *, cast_floats: bool, root: tuple = ()) -> None:
    """Compares template leaves with the recorded ones; raises naming the first difference and the count."""
    saved = meta["leaves"]
    prefix = "/".join(root)
    in_scope = {p for p in saved if not root or p == prefix or p.startswith(prefix + "/")}
    if root and not in_scope:
        raise CheckpointError(
            f"{_step_path(directory, step)}: checkpoint has no '{prefix}' subtree "
            f"(top-level keys: {sorted({p.split('/')[0] for p in saved})})"
        )
    problems = []
    wanted = set()
    for name, leaf in zip(names, leaves):
        path = "/".join(name)
        wanted.add(path)
        spec = _leaf_spec(leaf)
        if path not in saved:
            problems.append(f"{path}: missing from the checkpoint (template shape {tuple(spec['shape'])})")
            continue
        have = saved[path]
        if list(have["shape"]) != spec["shape"]:
            problems.append(
                f"{path}: checkpoint shape {tuple(have['shape'])} != template shape {tuple(spec['shape'])}"
            )
        elif have["dtype"] != spec["dtype"] and not (
            cast_floats and _is_float(have["dtype"]) and _is_float(spec["dtype"])
        ):
            problems.append(f"{path}: checkpoint dtype {have['dtype']} != template dtype {spec['dtype']}")
    for path in sorted(in_scope - wanted):
        problems.append(f"{path}: in the checkpoint but not in the template (shape {tuple(saved[path]['shape'])})")
    if problems:
        more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
        raise CheckpointError(
            f"{_step_path(directory, step)}: checkpoint does not match the template: {problems[0]}{more}"
        )


def _verify(meta, names, stored, directory, step) -> None:
    """Recomputes the fingerprint of every restored leaf; raises naming the first leaf that differs."""
    paths = ["/".join(n) for n in names]
    for path, got in zip(paths, _fingerprints(stored)):
        if meta["checksums"].get(path) != got:
            raise CheckpointError(
                f"{_step_path(directory, step)}: checksum mismatch for {path} (corrupt checkpoint data): "
                f"recorded {meta['checksums'].get(path)}, read {got}"
            )


def _is_float(dtype_name: str) -> bool:
    try:
        return jnp.issubdtype(jnp.dtype(dtype_name), jnp.floating)
    except TypeError:
        return False


# ------------------------------------------------------------------------------------------ pytree leaves


def _flatten(tree: Any, argname: str) -> tuple[list[tuple[str, ...]], list[Any], Any]:
    """Flattens a pytree into (key-name tuples, leaves, treedef); names are what the checkpoint stores."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names, leaves, seen = [], [], set()
    for path, leaf in with_path:
        name = tuple(_key_name(k) for k in path)
        joined = "/".join(name)
        if not name or any(not part or "." in part or "/" in part for part in name):
            raise CheckpointError(
                f"{argname}: cannot checkpoint the leaf at {jax.tree_util.keystr(path) or 'the root'}: keys must "
                "be non-empty and contain no '.' or '/', and the root must be a container"
            )
        if joined in seen:
            raise CheckpointError(f"{argname}: two leaves share the key path {joined}")
        seen.add(joined)
        names.append(name)
        leaves.append(leaf)
    return names, leaves, treedef


def _key_name(key) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _nest(names: list[tuple[str, ...]], values: list[Any]) -> dict:
    tree: dict = {}
    for name, value in zip(names, values):
        node = tree
        for part in name[:-1]:
            node = node.setdefault(part, {})
        node[name[-1]] = value
    return tree


def _pick(tree: Mapping, names: list[tuple[str, ...]]) -> list[Any]:
    values = []
    for name in names:
        node = tree
        for part in name:
            node = node[part]
        values.append(node)
    return values


def _is_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _leaf_spec(leaf: Any) -> dict[str, Any]:
    """{'shape': [...], 'dtype': name} of a leaf (typed PRNG keys keep their key dtype, e.g. key<fry>)."""
    if isinstance(leaf, (bool, int, float)):
        return {"shape": [], "dtype": type(leaf).__name__}
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        raise CheckpointError(f"cannot checkpoint a leaf of type {type(leaf).__name__}: arrays and scalars only")
    return {"shape": [int(d) for d in leaf.shape], "dtype": str(leaf.dtype)}


def _storable(path: tuple[str, ...], leaf: Any) -> Any:
    """The value Orbax writes for a leaf: typed PRNG keys as their uint32 key data, the rest unchanged."""
    _leaf_spec(leaf)
    if _is_key(leaf):
        return jax.random.key_data(leaf)
    if isinstance(leaf, jax.ShapeDtypeStruct):
        raise CheckpointError(f"state: {'/'.join(path)} is abstract (ShapeDtypeStruct): save concrete arrays")
    return leaf


def _target(leaf: Any, default_sharding, saved_dtype: str | None = None) -> Any:
    """The Orbax restore target of a template leaf: a sharded ShapeDtypeStruct, or the value for scalars."""
    if isinstance(leaf, (bool, int, float, np.ndarray, np.generic)):
        return leaf
    if _is_key(leaf):
        data = jax.eval_shape(jax.random.key_data, leaf)
        sharding = _key_data_sharding(leaf, data.ndim)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding or _default(default_sharding))
    sharding = getattr(leaf, "sharding", None) or _default(default_sharding)
    dtype = leaf.dtype if saved_dtype is None else jnp.dtype(saved_dtype)
    return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=sharding)


def _key_data_sharding(leaf: Any, data_ndim: int):
    if isinstance(leaf, jax.Array):
        return jax.random.key_data(leaf).sharding
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (data_ndim - len(sharding.spec))
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    return None


def _default(default_sharding):
    return default_sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _from_storable(value: Any, template_leaf: Any) -> Any:
    """Turns a restored value back into the template leaf's kind: re-wraps PRNG keys, casts float dtypes."""
    if _is_key(template_leaf):
        return jax.random.wrap_key_data(value, dtype=template_leaf.dtype)
    if isinstance(template_leaf, (bool, int, float)):
        return type(template_leaf)(value)
    dtype = getattr(template_leaf, "dtype", None)
    if dtype is not None and value.dtype != dtype:
        return value.astype(dtype)
    return value


def _param_count(names, leaves) -> int:
    return int(sum(
        math.prod(leaf.shape)
        for name, leaf in zip(names, leaves)
        if name[0] == MODEL_KEY and hasattr(leaf, "shape") and not _is_key(leaf)
    ))


# ------------------------------------------------------------------------------------------- fingerprints


def _mix(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: every input bit flips each output bit with probability ~1/2."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as a flat uint32 vector (one word per element of 1, 2 or 4 bytes)."""
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([x.real, x.imag], axis=-1)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    width = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).reshape(-1)


@jax.jit
def _fingerprint_arrays(leaves: list[jax.Array]) -> list[jax.Array]:
    """A position-dependent 64-bit hash (two uint32) of each array's bits; independent of its sharding."""
    out = []
    for x in leaves:
        words = _words(jnp.asarray(x))
        index = jnp.arange(words.size, dtype=jnp.uint32)
        h1 = jnp.sum(_mix(words ^ _mix(index + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
        h2 = jnp.sum(_mix(words + _mix(index ^ jnp.uint32(0x7F4A7C15))), dtype=jnp.uint32)
        size = jnp.uint32(words.size & 0xFFFFFFFF)
        out.append(jnp.stack([h1 ^ _mix(size), h2]))
    return out


def _fingerprints(leaves: list[Any]) -> list[str]:
    """Hex fingerprints of the stored leaves (arrays, numpy values or Python scalars).

    One jitted call per set of devices the leaves live on (a jit cannot mix arrays committed to different
    devices, e.g. parameters on a mesh and a counter on one device)."""
    groups: dict[tuple, list[int]] = {}
    for i, leaf in enumerate(leaves):
        devices = leaf.sharding.device_set if isinstance(leaf, jax.Array) and leaf.committed else ()
        groups.setdefault(tuple(sorted(d.id for d in devices)), []).append(i)
    out = [""] * len(leaves)
    for indices in groups.values():
        values = jax.device_get(_fingerprint_arrays([leaves[i] for i in indices]))
        for i, v in zip(indices, values):
            out[i] = f"{int(v[0]):08x}{int(v[1]):08x}"
    return out


# --------------------------------------------------------------------------------------------------- JSON


def _to_json(argname: str, value: Any) -> Any:
    """A JSON round-trip of `value` (dataclasses become dicts); raises naming `argname` if it is not JSON."""
    if value is None:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{argname} must be JSON-serializable: {_one_line(e)}") from e


def _json_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _tokenizer_fingerprint(tokenizer: Mapping[str, Any] | str | None) -> str | None:
    if tokenizer is None:
        return None
    if isinstance(tokenizer, str):
        return tokenizer
    return _json_hash(_to_json("tokenizer", tokenizer))


def _metric_getter(name: str, mode: str):
    """Orbax's best_fn: the metric's value; steps recorded without it (another run's) rank worst."""
    worst = math.inf if mode == "min" else -math.inf

    def get(metrics: Mapping[str, float]) -> float:
        return float(metrics.get(name, worst))

    return get


def _one_line(error: BaseException) -> str:
    """The error's message on one line; a long one keeps its start (what failed) and end (why)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:150] + " ... " + text[-145:]
