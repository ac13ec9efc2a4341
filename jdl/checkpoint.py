"""Checkpoints of a `TrainState` with orbax: save, keep the last few and the best, restore the
latest one that is good.

The data order, augmentation and dropout keys are functions of the seed and the step, so the state
is all a resumed run needs to continue exactly where the interrupted one was. A checkpoint that
cannot be restored is reported and moved aside to `<directory>_unusable/<step>`, never deleted;
only the retention policy deletes. See docs/checkpoints.md.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from jdl.state import TrainState

CheckpointMetrics = Mapping[str, float]
ITEM = "default"  # the name orbax gives the single item of a step's folder


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """`{path: shape}` of a pytree's arrays or orbax array metadata, paths written alike for both."""
  def name(entry: Any) -> str:
    for attribute in ("key", "name", "idx"):
      if hasattr(entry, attribute):
        return str(getattr(entry, attribute))
    return str(entry)

  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(name(e) for e in path): tuple(leaf.shape) for path, leaf in leaves}


class CheckpointError(RuntimeError):
  """No checkpoint of a directory fits the state it should be restored into."""


def best_mode(metric: str) -> str:
  """"min" for losses and errors, "max" for everything else (accuracies)."""
  return "min" if any(word in metric for word in ("loss", "error")) else "max"


class Checkpointer:
  """Saves and restores a `TrainState` in `directory` (orbax `CheckpointManager`).

  Args:
    directory: where step folders go (created when missing).
    keep: how many of the most recent checkpoints to keep (>= 1).
    best_metric: also keep the checkpoint with the best value of this metric (a key of the
      `metrics` given to `save`), e.g. "test_accuracy"; None keeps only the most recent.
    mode: "max" or "min" for `best_metric`; None chooses with `best_mode`.
    asynchronous: write in a background thread while training goes on (orbax's async
      checkpointing); `wait` or `close` blocks until everything is on disk.

  Takes a state on one device or replicated over a mesh (under pmap, `runner.fetch_state`'s).
  Every process of a multi-process run must call `save` and `restore_latest`.
  """

  def __init__(self, directory: str, *, keep: int = 3, best_metric: str | None = None,
               mode: str | None = None, asynchronous: bool = True) -> None:
    if keep < 1:
      raise ValueError(f"keep must be >= 1 (checkpoints to keep); got {keep}.")
    mode = mode or (best_mode(best_metric) if best_metric else "max")
    if mode not in ("max", "min"):
      raise ValueError(f"mode must be 'max' or 'min'; got {mode!r}.")
    self.directory = os.path.abspath(directory)
    self.best_metric, self.mode = best_metric, mode
    policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=keep)]
    if best_metric:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric], reverse=mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=asynchronous, create=True)
    # Registered up front so that a resumed run can read checkpoints it has not written.
    registry = ocp.DefaultCheckpointHandlerRegistry()
    for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
      registry.add(ITEM, args, ocp.StandardCheckpointHandler)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=registry)

  def steps(self) -> list[int]:
    """The steps with a checkpoint on disk, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, state: TrainState, *, metrics: CheckpointMetrics | None = None) -> bool:
    """Saves `state` under its step; returns False when that step is already saved.

    `metrics` rank it for `best_metric`; without them it is kept only while among the most recent.
    """
    step = int(jax.device_get(state.step))
    if step in self._manager.all_steps():
      return False
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      raise ValueError(f"best_metric {self.best_metric!r} is not among the metrics given to "
                       f"save: {sorted(metrics)}.")
    plain = None if metrics is None else {key: float(value) for key, value in metrics.items()}
    self._manager.save(step, args=ocp.args.StandardSave(_key_data(state)), metrics=plain,
                       force=True)
    return True

  def restore(self, template: TrainState, step: int) -> TrainState:
    """The state saved at `step`, with the structure, dtypes and placement of `template`.

    Raises:
      CheckpointError: the checkpoint holds other arrays or shapes (names the first).
    """
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
    return jax.tree.map(_like_template, template, restored)

  def restore_latest(self, template: TrainState, log: Callable[[str], None] = print, *,
                     move_unusable: bool = True) -> TrainState | None:
    """The most recent checkpoint that restores into `template`, or None when there is none.

    A checkpoint that fails to restore is reported with `log` and the one before it is tried;
    with `move_unusable` it is moved aside so "latest" never sees it again (a read-only load
    passes False). Raises CheckpointError when every checkpoint failed and one was written by
    another model, rather than start over next to another run's checkpoints.
    """
    mismatched = []
    for step in reversed(self.steps()):
      try:
        return self.restore(template, step)
      except CheckpointError as error:
        mismatched.append(step)
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

  def _set_aside(self, step: int) -> str:
    """Moves a step's folder out of the manager's directory, keeping it for inspection."""
    self._manager.wait_until_finished()
    unusable = self.directory.rstrip(os.sep) + "_unusable"
    os.makedirs(unusable, exist_ok=True)
    destination = os.path.join(unusable, f"{step}.{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      shutil.move(os.path.join(self.directory, str(step)), destination)
    self._manager.reload()
    return destination

  def wait(self) -> None:
    """Blocks until every save has been written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *_: object) -> None:
    self.close()


def _is_typed_key(value: Any) -> bool:
  return isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key)


def _key_data(tree: Any) -> Any:
  """`tree` with typed PRNG keys (`jax.random.key`) as their raw data, which orbax can save."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)


def _like_template(template: Any, restored: Any) -> Any:
  """A restored leaf, wrapped back into a typed key where the template holds one."""
  if _is_typed_key(template):
    return jax.random.wrap_key_data(restored, impl=jax.random.key_impl(template))
  return restored
