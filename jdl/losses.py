"""Losses, each `(outputs, targets) -> [batch]` (the train step takes the masked mean, so padded
examples never count), and weight penalties, `params -> scalar`, added with their coefficient."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
Params = Any


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, *,
                          label_smoothing: float = 0.0) -> jax.Array:
  """`[batch]` cross-entropies of `[batch]` integer labels under softmax(logits `[batch, classes]`)
  (Keras' `from_logits=True`); NaN for a label outside `[0, classes)` (`nan_outside_classes`). With
  `label_smoothing` s the target is `(1 - s) * one_hot(label) + s / classes` (Szegedy et al. 2016).
  """
  smoothing = check_label_smoothing(label_smoothing)
  losses = (_smoothed_cross_entropy(jax.nn.log_softmax(logits, axis=-1), labels, smoothing)
            if smoothing else optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  return nan_outside_classes(losses, labels, logits.shape[-1])


def cross_entropy_from_probabilities(
    probabilities: jax.Array, labels: jax.Array, *, epsilon: float = 1e-7,
    label_smoothing: float = 0.0,
) -> jax.Array:
  """`softmax_cross_entropy` for a model that ends in softmax (Keras' `from_logits=False`), with
  the probabilities clipped to `[epsilon, 1]` before the log; logits are numerically stabler."""
  log_probs = jnp.log(jnp.clip(probabilities, epsilon, 1.0))
  losses = _smoothed_cross_entropy(log_probs, labels, check_label_smoothing(label_smoothing))
  return nan_outside_classes(losses, labels, probabilities.shape[-1])


def chunked_softmax_cross_entropy(hidden: jax.Array, unembedding: jax.Array, labels: jax.Array,
                                  *, chunk: int = 256) -> tuple[jax.Array, jax.Array]:
  """`softmax_cross_entropy` of the logits `hidden @ unembedding.T`, without ever holding them:
  `(losses, correct)`, both shaped like `labels`, `correct` True where the arg-max is the label.

  `hidden` is `[..., D]` (a language model's final features), `unembedding` `[V, D]` (its output
  projection, e.g. the tied token embedding). The logits of `chunk` rows at a time are computed,
  in float32, inside a `jax.checkpoint`, so the forward and the backward pass each hold one
  chunk's `[chunk, V]` logits instead of all of them: for GPT-2's vocabulary, 50 MB instead of
  1.5 GiB at batch 8 and context 1024 (and as much again for their gradient).
  """
  if hidden.shape[:-1] != labels.shape or unembedding.ndim != 2 or (
      unembedding.shape[1] != hidden.shape[-1]):
    raise ValueError(f"chunked_softmax_cross_entropy expects hidden [..., D], labels [...] and "
                     f"unembedding [V, D]; got {hidden.shape}, {labels.shape} and "
                     f"{unembedding.shape}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"chunked_softmax_cross_entropy needs integer labels; got {labels.dtype}.")
  rows, width = labels.size, hidden.shape[-1]
  chunk = max(1, min(int(chunk), rows))
  blocks = -(-rows // chunk)
  pad = blocks * chunk - rows
  hidden_NxCxD = jnp.pad(hidden.reshape(rows, width), ((0, pad), (0, 0))).reshape(
      blocks, chunk, width)
  labels_NxC = jnp.pad(labels.reshape(rows), (0, pad)).reshape(blocks, chunk)

  @jax.checkpoint
  def one_chunk(chunk_rows: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    hidden_CxD, labels_C = chunk_rows
    logits_CxV = jnp.einsum("cd,vd->cv", hidden_CxD, unembedding.astype(hidden_CxD.dtype),
                            preferred_element_type=jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_CxV, labels_C)
    return losses, jnp.argmax(logits_CxV, axis=-1) == labels_C

  losses, correct = jax.lax.map(one_chunk, (hidden_NxCxD, labels_NxC))
  losses = nan_outside_classes(losses.reshape(-1)[:rows], labels.reshape(rows),
                               unembedding.shape[0])
  return losses.reshape(labels.shape), correct.reshape(-1)[:rows].reshape(labels.shape)


def nan_outside_classes(losses: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """`losses` with NaN where a label is outside `[0, num_classes)`, where indexing would silently
  pick another class (jax clamps or wraps indices); NaN stops `jdl.fit` at that step. A masked-out
  example still needs a label in range (padding uses 0), as NaN * 0 is NaN."""
  valid = (labels >= 0) & (labels < num_classes)
  return jnp.where(valid, losses, jnp.nan)


def check_label_smoothing(label_smoothing: float) -> float:
  """Returns `label_smoothing` as a float after checking that it lies in `[0, 1)`."""
  try:
    value = float(label_smoothing)
  except (TypeError, ValueError):
    value = float("nan")
  if not 0.0 <= value < 1.0:  # also rejects NaN
    raise ValueError(f"label_smoothing must be a number in [0, 1); got {label_smoothing!r}.")
  return value


def _smoothed_cross_entropy(log_probs: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
  """`-sum(target * log_probs)` for the smoothed target, without building the one-hot matrix."""
  picked = jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return -(1.0 - smoothing) * picked - smoothing * jnp.mean(log_probs, axis=-1)


def binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """`[batch]` cross-entropies of targets in [0, 1] under sigmoid(logits) (both `[batch, ...]`),
  averaged over the trailing axes."""
  per_element = optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))
  return _mean_over_trailing_axes(per_element)


def mean_squared_error(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  """Squared error averaged over every axis but the batch axis; `[batch]` losses."""
  if predictions.shape != targets.shape:
    raise ValueError(f"mean_squared_error needs predictions and targets of one shape; got "
                     f"{predictions.shape} and {targets.shape}.")
  return _mean_over_trailing_axes(jnp.square(predictions - targets.astype(predictions.dtype)))


def _mean_over_trailing_axes(values: jax.Array) -> jax.Array:
  return jnp.mean(values.reshape(values.shape[0], -1), axis=-1)


def kernels_only_mask(params: Params) -> Params:
  """True for weight matrices and convolution kernels (rank >= 2), False for biases and scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def l1_penalty(params: Params, mask: Params | None = None) -> jax.Array:
  """Sum of absolute values of the parameters selected by `mask` (default: kernels only)."""
  return _masked_sum(jnp.abs, params, mask)


def l2_penalty(params: Params, mask: Params | None = None) -> jax.Array:
  """Sum of squares of the parameters selected by `mask` (default: kernels only); Keras' `l2`."""
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
    terms = ((l1, l1_penalty), (l2, l2_penalty))
    return sum((weight * fn(params) for weight, fn in terms if weight), jnp.zeros(()))

  return penalty


LOSSES: dict[str, LossFn] = {
    "softmax_cross_entropy": softmax_cross_entropy,
    "cross_entropy_from_probabilities": cross_entropy_from_probabilities,
}
"""Classification losses an experiment config may name (`config.loss`)."""


def get_classification_loss(name: str, label_smoothing: float = 0.0) -> LossFn:
  """The classification loss called `name` (a key of `LOSSES`), as a `(outputs, labels) -> [batch]`
  function with `label_smoothing` bound into it."""
  if name not in LOSSES:
    raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}.")
  smoothing = check_label_smoothing(label_smoothing)
  return functools.partial(LOSSES[name], label_smoothing=smoothing) if smoothing else LOSSES[name]
