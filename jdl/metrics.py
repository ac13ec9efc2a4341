"""Masked metric accumulation: per-batch sums that merge exactly into full-split numbers.

A step returns metrics as a flat dict of *sums* (example count, summed loss, number correct), never
as means. Sums merge by addition, across batches and across devices (`psum`), so the metric over a
whole split, a last partial batch and padded examples included, is exactly the metric over the
array. `compute_metrics` turns the sums into means once, on the host.

The three functions form the usual (empty, merge, compute) triple of pure functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Metrics = dict[str, jax.Array]


def classification_metrics(
    outputs: jax.Array,
    labels: jax.Array,
    losses: jax.Array,
    mask: jax.Array | None = None,
    *,
    top_k: Sequence[int] = (),
) -> Metrics:
  """Sums for loss, accuracy and top-k accuracy over the unmasked examples of one batch.

  Args:
    outputs: `[batch, num_classes]` logits or probabilities.
    labels: `[batch]` integer labels.
    losses: `[batch]` per-example losses.
    mask: `[batch]` booleans (or 0/1), True for real examples; None means all are real.
    top_k: the k of the top-k accuracies to track; a k >= num_classes is skipped (it is always 1).

  Returns:
    A dict with `count`, `loss_sum`, `correct` and one `top{k}_correct` per k.
  """
  keep = jnp.ones(labels.shape, jnp.int32) if mask is None else mask.astype(jnp.int32)
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
      hit = jnp.any(top_indices == labels[:, None], axis=-1).astype(jnp.int32)
      sums[f"top{k}_correct"] = jnp.sum(hit * keep)
  return sums


def loss_metrics(losses: jax.Array, mask: jax.Array | None = None) -> Metrics:
  """Sums for the loss alone, for tasks without class labels (e.g. regression)."""
  keep = jnp.ones(losses.shape[:1], jnp.int32) if mask is None else mask.astype(jnp.int32)
  return {"count": jnp.sum(keep), "loss_sum": jnp.sum(losses.astype(jnp.float32) * keep)}


def empty_metrics() -> None:
  """The identity of `merge_metrics`: nothing accumulated yet."""
  return None


def merge_metrics(total: Metrics | None, batch: Metrics) -> Metrics:
  """Adds one batch's sums into a running total (`total` may be `empty_metrics()`)."""
  if total is None:
    return batch
  if total.keys() != batch.keys():
    raise ValueError(f"cannot merge metrics with keys {sorted(total)} and {sorted(batch)}.")
  return jax.tree.map(jnp.add, total, batch)


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
