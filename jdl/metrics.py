"""Metric states that merge exactly: per-batch sums, counts and extrema, turned into values once.

A step returns a flat dict of metric *states*, never means, merged exactly across batches and
devices; `compute_metrics` turns them into values. A key's suffix says how it merges and reports:

  `count`          summed: the examples (or positions) the loss counted.
  `<name>_sum`     summed; reported as `<name>` = sum / `<name>_count`, or / `count` without one.
  `<name>_count`   summed: the denominator of `<name>_sum` where it is not `count`.
  `<name>_max`     the maximum; reported as `<name>_max` (`_min` likewise).

Arrays merge alike (a `confusion_sum`); only scalars are reported. The non-finite watch
(`nonfinite_*`) keeps the earliest bad step. A metric function maps `(outputs, batch, mask)` to
such a dict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Metrics = dict[str, jax.Array]
MetricFn = Callable[[Any, Mapping[str, Any], jax.Array], Metrics]


def _merge_rule(key: str) -> str:  # "sum", "max", "min" or "watch"
  if key.startswith("nonfinite_"):
    return "watch"
  return next((rule for rule in ("max", "min") if key.endswith(f"_{rule}")), "sum")


def classification_metrics(outputs: jax.Array, labels: jax.Array, losses: jax.Array,
                           mask: jax.Array | None = None, *, top_k: Sequence[int] = ()) -> Metrics:
  """`loss_metrics(losses, mask)` and `accuracy_metrics(outputs, labels, mask, top_k=top_k)` of
  one batch: `outputs` are `[batch, ..., num_classes]` logits or probabilities, `labels` and
  `losses` are `[batch, ...]` (positions count as examples)."""
  return {**loss_metrics(losses, mask), **accuracy_metrics(outputs, labels, mask, top_k=top_k)}


def check_class_labels(outputs: jax.Array, labels: jax.Array, what: str) -> None:
  """Refuses, while tracing, labels that are not integers shaped like `outputs` without its class
  axis: they would broadcast into a wrong number. `what` names the user (accuracy, a loss)."""
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"{what} needs integer class labels; got dtype {labels.dtype}. For "
                     "real-valued targets use a regression task (jdl.tasks.regression).")
  if tuple(labels.shape) != tuple(outputs.shape[:-1]):
    raise ValueError(
        f"labels of shape {tuple(labels.shape)} do not fit outputs of shape "
        f"{tuple(outputs.shape)}: class labels are shaped like the outputs without their class "
        f"axis, {tuple(outputs.shape[:-1])} (one integer per example or per position).")


def accuracy_metrics(outputs: jax.Array, labels: jax.Array, mask: jax.Array | None = None, *,
                     top_k: Sequence[int] = ()) -> Metrics:
  """`accuracy_sum` (correct examples) and one `top{k}_accuracy_sum` per k < num_classes (a larger
  k is always right) over the unmasked examples; `mask` is `[batch]` or shaped like `labels`."""
  check_class_labels(outputs, labels, "accuracy")
  keep = broadcast_mask(mask, labels.shape).astype(jnp.int32)
  labels = labels.astype(jnp.int32)
  correct = (jnp.argmax(outputs, axis=-1) == labels).astype(jnp.int32)
  sums = {"accuracy_sum": jnp.sum(correct * keep)}
  for k in top_k:
    if k < outputs.shape[-1]:
      _, top_indices = jax.lax.top_k(outputs, k)
      hit = jnp.any(top_indices == labels[..., None], axis=-1).astype(jnp.int32)
      sums[f"top{k}_accuracy_sum"] = jnp.sum(hit * keep)
  return sums


def error_metrics(predictions: jax.Array, targets: jax.Array, mask: jax.Array | None = None
                  ) -> Metrics:
  """`mean_absolute_error_sum` (with its own count of elements) and `absolute_error_max`."""
  if tuple(predictions.shape) != tuple(targets.shape):
    raise ValueError(f"predictions of shape {tuple(predictions.shape)} do not fit targets of "
                     f"shape {tuple(targets.shape)}; they must have one shape.")
  keep = broadcast_mask(mask, targets.shape).astype(jnp.bool_)
  error = jnp.abs(predictions.astype(jnp.float32) - targets.astype(jnp.float32))
  return {"mean_absolute_error_sum": jnp.sum(jnp.where(keep, error, 0.0)),
          "mean_absolute_error_count": jnp.sum(keep.astype(jnp.int32)),
          "absolute_error_max": jnp.max(jnp.where(keep, error, -jnp.inf))}


def broadcast_mask(mask: jax.Array | None, shape: Sequence[int]) -> jax.Array:
  """`mask` as an array of `shape`: all True when None, a per-example `[batch]` mask repeated over
  the trailing axes of `shape`, or a mask that already has `shape`."""
  shape = tuple(shape)
  if mask is None:
    return jnp.ones(shape, jnp.bool_)
  if tuple(mask.shape) == shape:
    return mask
  if mask.ndim == 1 and len(shape) >= 1 and mask.shape[0] == shape[0]:
    return jnp.broadcast_to(mask.reshape((shape[0],) + (1,) * (len(shape) - 1)), shape)
  raise ValueError(f"mask of shape {tuple(mask.shape)} fits neither the batch {shape[:1]} nor the "
                   f"per-position shape {shape}.")


def loss_metrics(losses: jax.Array, mask: jax.Array | None = None) -> Metrics:
  """`count` and `loss_sum` over the unmasked examples (positions) of per-example losses."""
  keep = broadcast_mask(mask, losses.shape).astype(jnp.int32)
  return {"count": jnp.sum(keep), "loss_sum": jnp.sum(losses.astype(jnp.float32) * keep)}


NO_NONFINITE_STEP = np.iinfo(np.int32).max  # `nonfinite_step` where all was finite


def nonfinite_metrics(step: jax.Array, loss_sum: jax.Array,
                      gradient_squares: Sequence[jax.Array] = ()) -> Metrics:
  """The train step's non-finite watch: `nonfinite_step` is the 1-based number of this step if
  its loss, or any per-leaf sum of squared gradients given, is not finite (else
  `NO_NONFINITE_STEP`); `nonfinite_what` is 0 for the loss, `i + 1` for the i-th gradient leaf."""
  bad = jnp.stack([~jnp.all(jnp.isfinite(loss_sum))]
                  + [~jnp.isfinite(square) for square in gradient_squares])
  return {"nonfinite_step": jnp.where(jnp.any(bad), step.astype(jnp.int32) + 1, NO_NONFINITE_STEP),
          "nonfinite_what": jnp.argmax(bad).astype(jnp.int32)}


def reduce_over_axis(metrics: Metrics, axis_name: str) -> Metrics:
  """Merges per-device metric states over a mapped axis (`pmap`, `shard_map`) by their rules."""
  reduce = {"sum": jax.lax.psum, "max": jax.lax.pmax, "min": jax.lax.pmin}
  return {key: reduce[_merge_rule(key)](value, axis_name) for key, value in metrics.items()}


def empty_metrics() -> None:
  """The identity of `merge_metrics`: nothing accumulated yet."""
  return None


def zero_metrics(like: Mapping[str, Any]) -> Metrics:
  """Metrics like `like` that merge as a no-op: a compiled loop cannot carry `empty_metrics()`."""
  def identity(key: str, value: Any) -> jax.Array:
    if key == "nonfinite_step":
      return jnp.full(value.shape, NO_NONFINITE_STEP, value.dtype)
    if (rule := _merge_rule(key)) in ("max", "min"):
      lowest, highest = ((-jnp.inf, jnp.inf) if jnp.issubdtype(value.dtype, jnp.floating) else
                         (jnp.iinfo(value.dtype).min, jnp.iinfo(value.dtype).max))
      return jnp.full(value.shape, lowest if rule == "max" else highest, value.dtype)
    return jnp.zeros(value.shape, value.dtype)

  return {key: identity(key, value) for key, value in like.items()}


def merge_metrics(total: Metrics | None, batch: Metrics) -> Metrics:
  """Merges one batch's states into a running total (None: `empty_metrics()`)."""
  if total is None:
    return batch
  if total.keys() != batch.keys():
    raise ValueError(f"cannot merge metrics with keys {sorted(total)} and {sorted(batch)}.")
  return _merge(dict(total), dict(batch))


@jax.jit  # one compiled program, not one per op when called eagerly
def _merge(total: Metrics, batch: Metrics) -> Metrics:
  combine = {"sum": jnp.add, "max": jnp.maximum, "min": jnp.minimum}
  merged = {key: combine[_merge_rule(key)](total[key], batch[key])
            for key in total if _merge_rule(key) != "watch"}
  if "nonfinite_step" in total:  # keep the earliest bad step and what went bad there
    earlier = batch["nonfinite_step"] < total["nonfinite_step"]
    merged["nonfinite_step"] = jnp.minimum(total["nonfinite_step"], batch["nonfinite_step"])
    merged["nonfinite_what"] = jnp.where(earlier, batch["nonfinite_what"], total["nonfinite_what"])
  return merged


def metric_values(total: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Values of merged states as float64 host arrays (elementwise: a sweep's stack gives one per
  member): `<name>` for every `<name>_sum`, the extrema as they are, and `count`."""
  total = {key: np.asarray(value) for key, value in jax.device_get(dict(total)).items()}
  count = total.get("count")
  values: dict[str, np.ndarray] = {}
  for key, value in total.items():
    if _merge_rule(key) in ("max", "min"):
      values[key] = value.astype(np.float64)
    elif key.endswith("_sum"):
      name = key.removesuffix("_sum")
      denominator = total.get(f"{name}_count", count)
      if denominator is None:
        raise ValueError(f"metric state {key!r} has neither {name + '_count'!r} nor 'count' to "
                         "divide by; a metric function must return one of them.")
      values[name] = value.astype(np.float64) / np.maximum(denominator, 1)
  if count is not None:
    values["count"] = count
  return values


def compute_metrics(total: Mapping[str, jax.Array | np.ndarray] | None) -> dict[str, float]:
  """The scalar `metric_values` as floats (`loss`, `accuracy`, ...) and `count` as an int."""
  if total is None:
    return {}
  if "count" in total and int(np.asarray(jax.device_get(total["count"]))) == 0:
    raise ValueError("no examples were accumulated (count is 0); cannot compute means.")
  return {key: int(value) if key == "count" else float(value)
          for key, value in metric_values(total).items() if np.ndim(value) == 0}
