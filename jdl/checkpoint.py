"""Checkpoints of a `TrainState` with orbax: keep the last few and the best, restore the latest.

The data order and every key are functions of the seed and the step, so the state is all a resumed
run needs. Each step's orbax metadata holds, under `jdl`, the metrics that rank it and a checksum of
every array (`array_checksums`), verified on restore; an unusable checkpoint is moved aside, never
deleted (docs/checkpoints.md).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from traceback import walk_tb
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jdl.parallel import exception_chain
from jdl.state import TrainState
from jdl.transfer import named_leaves

RECORD_KEY = "jdl"  # the key of the step's custom metadata that holds its metrics and checksums
_WRITER_JOIN_SECONDS = 60.0  # the longest a failed save waits for orbax's other writers


def array_checksums(tree: Any) -> dict[str, dict[str, str]]:
  """`{path: {"dtype", "sum32"}}` of every array of `tree`: a sum of its 32-bit words weighted by
  their positions (odd weights: a changed word always changes it), wrapping at 2**32. It is
  computed where the array lives, so an array split over devices or hosts is checked without
  being gathered, and it is the same in every layout (a restore onto another mesh checks it)."""
  leaves = named_leaves(_key_data(tree))
  # Each sum is a replicated scalar: this process's copies, fetched together.
  sums = jax.device_get([s.addressable_data(0) for s in _sums32(list(leaves.values()))])
  return {path: {"dtype": str(leaf.dtype), "sum32": f"{int(value):08x}"}
          for (path, leaf), value in zip(leaves.items(), sums)}


@jax.jit
def _sums32(leaves: list[jax.Array]) -> list[jax.Array]:
  def one(x: jax.Array) -> jax.Array:
    unsigned = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
    words = jax.lax.bitcast_convert_type(x.astype(jnp.uint8) if x.dtype == bool else x, unsigned)
    index, stride = jnp.zeros(x.shape, jnp.uint32), 1
    for axis in reversed(range(x.ndim)):
      index += jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
      stride *= x.shape[axis]
    weights = index * jnp.uint32(0x9E3779B1) + jnp.uint32(1)
    return jnp.sum(words.astype(jnp.uint32) * weights, dtype=jnp.uint32)

  return [one(leaf) for leaf in leaves]


class CheckpointError(RuntimeError):
  """No checkpoint of a directory fits the state it should be restored into."""


class CorruptCheckpointError(RuntimeError):
  """A checkpoint's arrays differ from the checksums saved with them."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written; the checkpoints saved before it are intact."""


def _cause(error: BaseException) -> str:
  """The OS error behind `error` (an OSError, or tensorstore's message naming the errno), else the
  first line of the innermost exception."""
  chain = exception_chain(error)
  for exception in chain:
    if isinstance(exception, OSError) and exception.errno:
      return f"[Errno {exception.errno}] {exception.strerror}"
    if code := re.search(r"os_error_code='(\d+)'", str(exception)):
      return f"[Errno {code.group(1)}] {os.strerror(int(code.group(1)))}"
  innermost = chain[-1]
  return f"{type(innermost).__name__}: {(str(innermost).splitlines() or [''])[0][:200]}"


# Orbax's threads log a failed save's traceback; the caller gets it as one CheckpointWriteError.
logging.getLogger("absl").addFilter(lambda record: not (
    "orbax" in record.pathname and "raised an exception" in record.getMessage()))


def _quiet_closed_loop_callbacks() -> None:
  """Drops the "Event loop is closed" tracebacks (`sys.unraisablehook`, inside asyncio only) of
  the writes tensorstore still finishes after a failed save: the caller gets one error."""
  previous = sys.unraisablehook
  if getattr(previous, "jdl_quiet_closed_loop", False):
    return

  def hook(unraisable: Any) -> None:
    frames = [frame.f_code.co_filename for frame, _ in walk_tb(unraisable.exc_traceback)]
    inside_asyncio = bool(frames) and all(f"{os.sep}asyncio{os.sep}" in name for name in frames)
    if not (unraisable.exc_type is RuntimeError and inside_asyncio
            and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  hook.jdl_quiet_closed_loop = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook


class Checkpointer:
  """Saves and restores a `TrainState` (one device or replicated; under pmap `runner.fetch_state`'s)
  in step folders of `directory` (orbax `CheckpointManager`), which every process must call.

  It keeps the `keep` most recent checkpoints and, with `best_metric` (a key of the `metrics`
  given to `save`, e.g. "test_accuracy"), the best by it (`mode` "max"/"min"; None: "min" for a
  loss or error, else "max") across resumes. `asynchronous` writes a host copy in a background
  thread in a single process (`wait` or `close` block until it is on disk). `writable=False`
  opens for reading only; an unwritable `directory` raises `CheckpointWriteError` at once."""

  def __init__(self, directory: str, *, keep: int = 3, best_metric: str | None = None,
               mode: str | None = None, asynchronous: bool = True, writable: bool = True) -> None:
    if keep < 1:
      raise ValueError(f"keep must be >= 1 (checkpoints to keep); got {keep}.")
    mode = mode or ("min" if any(w in (best_metric or "") for w in ("loss", "error")) else "max")
    if mode not in ("max", "min"):
      raise ValueError(f"mode must be 'max' or 'min'; got {mode!r}.")
    self.directory = os.path.abspath(directory)
    self.keep, self.best_metric, self.mode, self.writable = keep, best_metric, mode, writable
    self.asynchronous = asynchronous and jax.process_count() == 1
    if writable:
      _check_writable(self.directory)
      self._remove_temporary("*")  # what a save killed mid-write left
    # Retention is applied here (`_apply_retention`), from the metrics saved in each step.
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=writable)
    # Registered up front so that a resumed run can read checkpoints it has not written.
    registry = ocp.DefaultCheckpointHandlerRegistry()
    for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
      registry.add("default", args, ocp.StandardCheckpointHandler)  # the step's one item
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=registry)
    _quiet_closed_loop_callbacks()
    self._writer: threading.Thread | None = None
    self._failure: tuple[int, BaseException] | None = None
    self._failure_reported = False
    self._records: dict[int, dict[str, Any] | None] = {}

  def steps(self) -> list[int]:
    """The steps with a checkpoint on disk, oldest first (after the save in progress)."""
    self._join()
    return sorted(self._manager.all_steps())

  def metrics(self, step: int) -> dict[str, float] | None:
    """The metrics saved with the checkpoint of `step` (None: saved without them)."""
    return (self._record(step) or {}).get("metrics")

  def best_step(self) -> int | None:
    """The step of the saved checkpoint with the best `best_metric`, or None without one."""
    return self._best_of(self.steps())

  def save(self, state: TrainState, *, metrics: Mapping[str, float] | None = None) -> bool:
    """Saves `state` under its step (False: that step is saved already), ranked by `metrics` for
    `best_metric`. Raises `CheckpointWriteError` if this or an earlier save failed."""
    if not self.writable:
      raise ValueError(f"this Checkpointer of {self.directory} was opened with writable=False.")
    step = state.step
    if isinstance(step, jax.Array) and not step.is_fully_addressable:
      step = step.addressable_data(0)  # replicated over processes: this process's copy
    step = int(np.asarray(step).reshape(-1)[0])
    saved = self.steps()  # waits for the previous save: one write at a time
    self.raise_if_failed()
    if step in saved:
      return False
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      raise ValueError(f"best_metric {self.best_metric!r} is not among the metrics given to "
                       f"save: {sorted(metrics)}.")
    plain = None if metrics is None else {key: float(value) for key, value in metrics.items()}
    if self.asynchronous:  # from a host copy: training goes on, and may donate the device buffers
      self._writer = threading.Thread(target=self._write, name=f"jdl-checkpoint-{step}",
                                      args=(step, jax.device_get(_key_data(state)), plain),
                                      daemon=True)
      self._writer.start()
    else:
      self._write(step, _key_data(state), plain)
      self.raise_if_failed()
    return True

  def _write(self, step: int, state: TrainState, metrics: dict[str, float] | None) -> None:
    """Writes one checkpoint, then applies retention. A failure is kept for `raise_if_failed`,
    never raised in a thread, and what it left (orbax's temporary folder) is removed."""
    threads_before = set(threading.enumerate())
    try:
      record = {"metrics": metrics, "checksums": array_checksums(state)}
      self._manager.save(step, args=ocp.args.StandardSave(state), force=True,
                         custom_metadata={RECORD_KEY: record})
      self._manager.wait_until_finished()
      self._records[step] = record
      self._apply_retention()
    except Exception as error:  # pylint: disable=broad-except  # reported by the caller
      self._failure = (step, error)
      # orbax raises at the first failed write while its other writer threads go on: wait for
      # them, or they would recreate the temporary folder after it is removed.
      deadline = time.monotonic() + _WRITER_JOIN_SECONDS
      for thread in set(threading.enumerate()) - threads_before:
        if type(thread).__module__.startswith("orbax"):
          thread.join(max(0.0, deadline - time.monotonic()))
      self._remove_temporary(step)

  def _remove_temporary(self, step: int | str) -> None:
    """Removes, on process 0, orbax's temporary folders of a failed save of `step` ("*": any)."""
    if jax.process_index() == 0:
      pattern = os.path.join(glob.escape(self.directory), f"{step}.orbax-checkpoint-tmp*")
      for path in glob.glob(pattern):
        shutil.rmtree(path, ignore_errors=True)

  def _apply_retention(self) -> None:
    """Deletes every checkpoint but the last `keep` and the best by `best_metric`."""
    steps = sorted(self._manager.all_steps())
    kept = {*steps[-self.keep:], self._best_of(steps)}
    for step in steps:
      if step not in kept:
        self._manager.delete(step)
        self._records.pop(step, None)

  def _best_of(self, steps: list[int]) -> int | None:
    """The best of `steps` by the metrics saved with them; a tie goes to the later step."""
    if not self.best_metric:
      return None
    scored = [(metrics[self.best_metric], step) for step in steps
              if (metrics := self.metrics(step)) and metrics.get(self.best_metric) is not None]
    if not scored:
      return None
    return (max(scored) if self.mode == "max" else min(scored, key=lambda s: (s[0], -s[1])))[1]

  def raise_if_failed(self) -> None:
    """Raises `CheckpointWriteError` if a save has failed (cheap: call it as often as you like),
    naming the step, the folder, the cause and the earlier checkpoints, which are intact."""
    if self._failure is None:
      return
    self._failure_reported = True
    step, error = self._failure
    try:
      intact = sorted(self._manager.all_steps())
    except Exception:  # pylint: disable=broad-except  # the folder itself may be gone
      intact = []
    earlier = (f"The checkpoints saved before it are intact (steps {intact})." if intact
               else "No checkpoint had been saved.")
    raise CheckpointWriteError(
        f"could not save the checkpoint of step {step} in {self.directory} "
        f"({_cause(error)}); training stopped. {earlier}") from error

  def _record(self, step: int) -> dict[str, Any] | None:
    """A step's metrics and checksums, None for a checkpoint saved without them."""
    if step not in self._records:
      custom = self._manager.metadata(step).custom_metadata or {}
      self._records[step] = custom.get(RECORD_KEY)
    return self._records[step]

  def restore(self, template: TrainState, step: int) -> TrainState:
    """The state saved at `step`, with the structure, dtypes and placement of `template`. Raises
    CheckpointError where it holds other arrays or shapes, CorruptCheckpointError where an array
    differs from its checksum (each naming the first)."""
    self._join()
    saved = _leaf_shapes(self._manager.item_metadata(step).tree)
    wanted = _leaf_shapes(_key_data(template))
    for path in sorted(wanted.keys() | saved.keys(), key=lambda p: (not p.startswith("params"), p)):
      if wanted.get(path) != saved.get(path):
        found = "missing" if path not in saved else f"shape {saved[path]}"
        expected = "no such array" if path not in wanted else f"shape {wanted[path]}"
        raise CheckpointError(
            f"the checkpoint at step {step} in {self.directory} was written by a different model "
            f"or optimizer: {path} is {found} there, but this run has {expected}.")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _key_data(template))
    restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
    record = self._record(step)
    if record is not None:
      _verify(restored, record["checksums"], step, self.directory)
    return jax.tree.map(  # typed keys wrapped back where the template holds them
        lambda t, r: jax.random.wrap_key_data(r, impl=jax.random.key_impl(t))
        if _is_typed_key(t) else r, template, restored)

  def restore_latest(self, template: TrainState, log: Callable[[str], None] = print, *,
                     move_unusable: bool = True) -> TrainState | None:
    """The most recent checkpoint that restores into `template`, or None when there is none. One
    that fails (truncated, a checksum) is reported with `log`, moved aside with `move_unusable` (a
    read-only load passes False), and the one before it tried. Raises CheckpointError when all
    failed and one came from another model, rather than start over."""
    mismatched = []
    for step in reversed(self.steps()):
      try:
        return self.restore(template, step)
      except CheckpointError as error:
        mismatched.append(step)
        reason = str(error)
      except CorruptCheckpointError as error:
        reason = str(error)
      except Exception as error:  # pylint: disable=broad-except  # truncated or corrupt files
        reason = f"it cannot be read ({type(error).__name__}: {str(error)[:300]})"
      where = f"Moved it to {self._set_aside(step)}" if move_unusable else "Left it in place"
      log(f"checkpoint at step {step} is unusable: {reason.rstrip('.')}. {where}; "
          "trying the previous checkpoint.")
    if mismatched:
      moved = "they were moved aside, not deleted" if move_unusable else "they were left in place"
      raise CheckpointError(
          f"no checkpoint in {self.directory} fits this run (steps {mismatched} are from another "
          f"model); {moved}. Use a new workdir for a different model.")
    return None

  @property
  def unusable_directory(self) -> str:
    """Where unusable checkpoints are moved: `<directory>_unusable`."""
    return self.directory.rstrip(os.sep) + "_unusable"

  def _set_aside(self, step: int) -> str:
    """Moves a step's folder out of the manager's directory, keeping it for inspection."""
    self._join()
    os.makedirs(self.unusable_directory, exist_ok=True)
    destination = os.path.join(self.unusable_directory, f"{step}.{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      shutil.move(os.path.join(self.directory, str(step)), destination)
    self._records.pop(step, None)
    self._manager.reload()
    return destination

  def _join(self) -> None:  # waits for the save in progress (its failure is kept, not raised)
    if self._writer is not None:
      self._writer.join()
    self._writer = None

  def wait(self) -> None:
    """Blocks until every save has been written; raises `CheckpointWriteError` if one failed."""
    self._join()
    self.raise_if_failed()

  def close(self) -> None:
    """Waits for pending saves, releases the manager, and raises a failure not reported yet."""
    try:
      self._join()
    finally:
      self._manager.close()
      if self._failure is not None:  # anything written late by orbax after the failure
        self._remove_temporary(self._failure[0])
    if not self._failure_reported:
      self.raise_if_failed()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *_: object) -> None:
    self.close()


def _check_writable(directory: str) -> None:
  """Fails at once, with one line, where no checkpoint could ever be saved."""
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise CheckpointWriteError(f"cannot save checkpoints in {directory}: it is a file, not a "
                               "folder. Move it away or choose another workdir.")
  try:
    os.makedirs(directory, exist_ok=True)
    tempfile.TemporaryFile(dir=directory).close()  # a probe, deleted as it closes
  except OSError as error:
    raise CheckpointWriteError(
        f"cannot save checkpoints in {directory} ([Errno {error.errno}] "
        f"{error.strerror or error}); choose a workdir on a writable filesystem.") from None


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:  # of arrays or orbax's metadata
  return {path: tuple(leaf.shape) for path, leaf in named_leaves(tree).items()}


def _verify(state: TrainState, checksums: Mapping[str, Mapping[str, str]], step: int,
            directory: str) -> None:
  """Raises CorruptCheckpointError naming the first array whose bytes differ from its checksum.
  Arrays restored in another dtype than they were saved in (a cast by the template) are skipped."""
  restored = array_checksums(state)
  for path, saved in sorted(checksums.items()):
    now = restored.get(path, {})  # a checkpoint written before these sums has no "sum32"
    if now.get("dtype") == saved["dtype"] and now["sum32"] != saved.get("sum32", now["sum32"]):
      raise CorruptCheckpointError(
          f"the checkpoint at step {step} in {directory} is corrupt: array {path} does not match "
          "the checksum saved with it (its file changed or was damaged after it was written)")


def _is_typed_key(value: Any) -> bool:
  return isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key)


def _key_data(tree: Any) -> Any:
  """`tree` with typed PRNG keys (`jax.random.key`) as their raw data, which orbax can save."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)
