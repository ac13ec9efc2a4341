"""Losses and weight penalties.

Every loss maps `(outputs, targets)` to one value per example (shape `[batch]`); the train step
takes the masked mean, so padded examples never count. Penalties map a params pytree to a scalar
and are added to the mean loss with their coefficient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
Params = Any


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy of integer class labels under softmax(logits): Keras' sparse categorical
  cross-entropy with `from_logits=True`.

  Args:
    logits: `[batch, num_classes]` unnormalised scores.
    labels: `[batch]` integer class indices in `[0, num_classes)`.

  Returns:
    `[batch]` losses, `-log softmax(logits)[label]`.
  """
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def cross_entropy_from_probabilities(
    probabilities: jax.Array, labels: jax.Array, *, epsilon: float = 1e-7
) -> jax.Array:
  """Cross-entropy of integer labels for a model that already ends in softmax (Keras'
  `from_logits=False`). Probabilities are clipped to `[epsilon, 1]` before the log; prefer logits
  with `softmax_cross_entropy`, which is exact and numerically stable.
  """
  picked = jnp.take_along_axis(probabilities, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return -jnp.log(jnp.clip(picked, epsilon, 1.0))


def binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy of {0, 1} targets under sigmoid(logits), averaged over trailing axes.

  Args:
    logits: `[batch, ...]` unnormalised scores.
    labels: targets of the same shape, in [0, 1].

  Returns:
    `[batch]` losses.
  """
  per_element = optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))
  return _mean_over_trailing_axes(per_element)


def mean_squared_error(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  """Squared error averaged over every axis but the batch axis; `[batch]` losses."""
  if predictions.shape != targets.shape:
    raise ValueError(
        f"mean_squared_error needs predictions and targets of one shape; got {predictions.shape} "
        f"and {targets.shape}."
    )
  return _mean_over_trailing_axes(jnp.square(predictions - targets.astype(predictions.dtype)))


def _mean_over_trailing_axes(values: jax.Array) -> jax.Array:
  return jnp.mean(values.reshape(values.shape[0], -1), axis=-1)


def kernels_only_mask(params: Params) -> Params:
  """A boolean pytree like `params` that is True for weight matrices and convolution kernels
  (arrays of rank >= 2) and False for biases and normalisation scales, which penalties spare."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def l1_penalty(params: Params, mask: Params | None = None) -> jax.Array:
  """Sum of absolute values of the parameters selected by `mask` (default: kernels only)."""
  return _masked_sum(jnp.abs, params, mask)


def l2_penalty(params: Params, mask: Params | None = None) -> jax.Array:
  """Sum of squares of the parameters selected by `mask` (default: kernels only).

  Multiplied by a coefficient `c` this is Keras' `l2(c)` regulariser; its gradient is `2 c w`.
  """
  return _masked_sum(jnp.square, params, mask)


def _masked_sum(fn: Callable[[jax.Array], jax.Array], params: Params, mask: Params | None):
  mask = kernels_only_mask(params) if mask is None else mask
  terms = jax.tree.map(lambda p, keep: jnp.sum(fn(p)) if keep else jnp.zeros(()), params, mask)
  return sum(jax.tree.leaves(terms), jnp.zeros(()))


def make_weight_penalty(l1: float = 0.0, l2: float = 0.0) -> Callable[[Params], jax.Array] | None:
  """Returns `params -> l1 * l1_penalty + l2 * l2_penalty`, or None when both are zero."""
  if l1 < 0 or l2 < 0:
    raise ValueError(f"penalty coefficients must be >= 0; got l1={l1}, l2={l2}.")
  if l1 == 0 and l2 == 0:
    return None

  def penalty(params: Params) -> jax.Array:
    total = jnp.zeros(())
    if l1:
      total = total + l1 * l1_penalty(params)
    if l2:
      total = total + l2 * l2_penalty(params)
    return total

  return penalty


LOSSES: dict[str, LossFn] = {
    "softmax_cross_entropy": softmax_cross_entropy,
    "cross_entropy_from_probabilities": cross_entropy_from_probabilities,
}
"""Classification losses an experiment config may name (`config.loss`)."""


def get_classification_loss(name: str) -> LossFn:
  """The classification loss called `name`; a clear error lists the valid names."""
  if name not in LOSSES:
    raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}.")
  return LOSSES[name]
