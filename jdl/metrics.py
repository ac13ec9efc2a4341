"""Masked metric accumulation: per-batch sums that merge exactly into full-split numbers.

A step returns a flat dict of *sums* (example count, summed loss, number correct), never means, so
they merge exactly by addition across batches and devices (`psum`), padding included;
`compute_metrics` turns them into means once, on the host. The train step's non-finite watch
(`nonfinite_step`, `nonfinite_what`) merges by keeping the earliest bad step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Metrics = dict[str, jax.Array]


def classification_metrics(outputs: jax.Array, labels: jax.Array, losses: jax.Array,
                           mask: jax.Array | None = None, *, top_k: Sequence[int] = ()) -> Metrics:
  """Sums for loss, accuracy and top-k accuracy over the unmasked examples of one batch.

  Labels may have positions (a language model's `[batch, time]`); `count` then counts positions.

  Args:
    outputs: `[batch, ..., num_classes]` logits or probabilities.
    labels: `[batch, ...]` integer labels.
    losses: per-example (per-position) losses, shaped like `labels`.
    mask: `[batch]` (per example) or shaped like `labels` (per position) booleans (or 0/1), True
      for what counts; None means everything is real.
    top_k: the k of the top-k accuracies to track; a k >= num_classes is skipped (it is always 1).

  Returns:
    A dict with `count`, `loss_sum`, `correct` and one `top{k}_correct` per k.
  """
  keep = broadcast_mask(mask, labels.shape).astype(jnp.int32)
  labels = labels.astype(jnp.int32)
  correct = (jnp.argmax(outputs, axis=-1) == labels).astype(jnp.int32)
  sums = {
      "count": jnp.sum(keep),
      "loss_sum": jnp.sum(losses.astype(jnp.float32) * keep),
      "correct": jnp.sum(correct * keep),
  }
  num_classes = outputs.shape[-1]
  for k in top_k:
    if k < num_classes:
      _, top_indices = jax.lax.top_k(outputs, k)
      hit = jnp.any(top_indices == labels[..., None], axis=-1).astype(jnp.int32)
      sums[f"top{k}_correct"] = jnp.sum(hit * keep)
  return sums


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
  """Sums for the loss alone, for tasks without class labels (e.g. regression)."""
  keep = broadcast_mask(mask, losses.shape).astype(jnp.int32)
  return {"count": jnp.sum(keep), "loss_sum": jnp.sum(losses.astype(jnp.float32) * keep)}


NO_NONFINITE_STEP = np.iinfo(np.int32).max
"""`nonfinite_step` of a step whose loss and gradients were all finite."""


def nonfinite_metrics(step: jax.Array, loss_sum: jax.Array, grads: Any) -> Metrics:
  """The train step's non-finite watch.

  `nonfinite_step` is the 1-based number of this step if its loss or any gradient is not finite
  (else `NO_NONFINITE_STEP`); `nonfinite_what` is 0 for the loss, `i + 1` for the i-th gradient leaf.
  """
  leaves = jax.tree.leaves(grads)
  bad = jnp.stack([~jnp.all(jnp.isfinite(loss_sum))] + [~jnp.all(jnp.isfinite(g)) for g in leaves])
  return {
      "nonfinite_step": jnp.where(jnp.any(bad), step.astype(jnp.int32) + 1, NO_NONFINITE_STEP),
      "nonfinite_what": jnp.argmax(bad).astype(jnp.int32),
  }


def empty_metrics() -> None:
  """The identity of `merge_metrics`: nothing accumulated yet."""
  return None


def zero_metrics(like: Mapping[str, Any]) -> Metrics:
  """Metrics shaped like `like` that merge as a no-op: the start of a total in a compiled loop,
  where `empty_metrics()` (None) cannot be carried."""
  zeros = {key: jnp.zeros(value.shape, value.dtype) for key, value in like.items()}
  if "nonfinite_step" in zeros:
    zeros["nonfinite_step"] = jnp.full_like(zeros["nonfinite_step"], NO_NONFINITE_STEP)
  return zeros


def merge_metrics(total: Metrics | None, batch: Metrics) -> Metrics:
  """Adds one batch's sums into a running total (`total` may be `empty_metrics()`)."""
  if total is None:
    return batch
  if total.keys() != batch.keys():
    raise ValueError(f"cannot merge metrics with keys {sorted(total)} and {sorted(batch)}.")
  return _merge_sums(dict(total), dict(batch))


@jax.jit
def _merge_sums(total: Metrics, batch: Metrics) -> Metrics:
  """The merge as one compiled program, not one per op when called eagerly."""
  merged = {key: total[key] + batch[key] for key in total if not key.startswith("nonfinite_")}
  if "nonfinite_step" in total:  # keep the earliest bad step and what went bad there
    earlier = batch["nonfinite_step"] < total["nonfinite_step"]
    merged["nonfinite_step"] = jnp.minimum(total["nonfinite_step"], batch["nonfinite_step"])
    merged["nonfinite_what"] = jnp.where(earlier, batch["nonfinite_what"], total["nonfinite_what"])
  return merged


def compute_metrics(total: Mapping[str, jax.Array | np.ndarray] | None) -> dict[str, float]:
  """Means from sums: `loss`, `accuracy`, `top{k}_accuracy`, plus `count` (examples seen)."""
  if total is None:
    return {}
  total = jax.device_get(dict(total))
  count = int(total["count"])
  if count == 0:
    raise ValueError("no examples were accumulated (count is 0); cannot compute means.")
  result: dict[str, float] = {"loss": float(total["loss_sum"]) / count}
  for key, value in total.items():
    if key == "correct":
      result["accuracy"] = float(value) / count
    elif key.endswith("_correct"):
      result[key.removesuffix("_correct") + "_accuracy"] = float(value) / count
  result["count"] = count
  return result
