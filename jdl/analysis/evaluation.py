"""Evaluating a trained classifier beyond one accuracy number.

`evaluate_classifier(state, inputs, labels)` runs the model over a whole split (uint8 pixels
scaled on the device with `pixels=True`) and bundles accuracy, per-class accuracy, the confusion
matrix, top-k accuracies, calibration and the misclassified examples; each piece is also a plain
function of arrays. Outputs that are non-negative with rows summing to 1 (within 1e-3) are
probabilities, others logits. Metrics are computed on the host in float64 numpy, exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jdl.state import TrainState
from jdl.tasks import unit_pixels

ApplyFn = Callable[..., Any]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward(apply_fn: ApplyFn, variables: Any, inputs: jax.Array, pixels: bool) -> jax.Array:
  return apply_fn(variables, unit_pixels(inputs) if pixels else inputs, train=False)


def apply_in_batches(apply_fn: ApplyFn, variables: Any, inputs: np.ndarray | jax.Array, *,
                     batch_size: int = 1000, pixels: bool = False) -> np.ndarray:
  """The model's float32 numpy outputs for every example of `inputs`, in eval mode, in batches of
  one shape (the last one padded) so the model compiles once; `apply_fn` must be hashable (a
  static argument). With `pixels`, uint8 `inputs` are scaled to [0, 1] in the compiled call."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
  inputs = np.asarray(inputs)
  if inputs.ndim < 1 or inputs.shape[0] == 0:
    raise ValueError(f"inputs must be a non-empty batch [num_examples, ...]; got shape "
                     f"{inputs.shape}.")
  size = min(batch_size, inputs.shape[0])
  outputs = []
  for start in range(0, inputs.shape[0], size):  # only the last batch is padded (no whole copy)
    batch = inputs[start:start + size]
    padded = np.concatenate([batch, np.zeros((size - len(batch), *batch.shape[1:]), batch.dtype)])
    outputs.append(np.asarray(_forward(apply_fn, variables, padded, pixels),
                              np.float32)[:len(batch)])
  return np.concatenate(outputs)


def predict(state: TrainState, inputs: np.ndarray | jax.Array, *,
            batch_size: int = 1000, pixels: bool = False) -> np.ndarray:
  """`apply_in_batches` of `state`'s model on `[num_examples, *state.input_shape]` inputs (uint8
  pixels with `pixels`); integer inputs to a model of real-valued inputs are an error."""
  inputs = np.asarray(inputs)
  if tuple(inputs.shape[1:]) != tuple(state.input_shape):
    raise ValueError(f"inputs have per-example shape {tuple(inputs.shape[1:])} (batch shape "
                     f"{inputs.shape}), but the model was built for {tuple(state.input_shape)}.")
  if (not pixels and np.issubdtype(inputs.dtype, np.integer)
      and not np.issubdtype(np.dtype(state.input_dtype), np.integer)):
    raise ValueError(f"inputs of dtype {inputs.dtype} for a model of {state.input_dtype} inputs; "
                     "uint8 pixels need pixels=True (scaled to [0, 1] on the device).")
  return apply_in_batches(state.apply_fn, state.variables(), inputs, batch_size=batch_size,
                          pixels=pixels)


def outputs_are_probabilities(outputs: np.ndarray, *, tolerance: float = 1e-3) -> bool:
  """True when `outputs` ([..., num_classes]) are all non-negative with rows summing to 1."""
  outputs = np.asarray(outputs, np.float64)
  if outputs.ndim < 1 or outputs.shape[-1] == 0:
    raise ValueError(f"outputs must end in a class axis; got shape {outputs.shape}.")
  if not np.all(np.isfinite(outputs)):
    raise ValueError("outputs hold NaN or infinite values; they are neither logits nor "
                     "probabilities a classifier can be evaluated on.")
  return bool(np.all(outputs >= 0.0) and np.all(np.abs(outputs.sum(axis=-1) - 1.0) <= tolerance))


def softmax_probabilities(outputs: np.ndarray) -> np.ndarray:
  """Float64 class probabilities: the softmax of logits, or probabilities renormalised."""
  outputs = np.asarray(outputs, np.float64)
  if outputs_are_probabilities(outputs):
    return outputs / outputs.sum(axis=-1, keepdims=True)
  exponentials = np.exp(outputs - outputs.max(axis=-1, keepdims=True))
  return exponentials / exponentials.sum(axis=-1, keepdims=True)


def _check_classification(outputs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  outputs, labels = np.asarray(outputs), np.asarray(labels)
  if outputs.ndim != 2:
    raise ValueError(f"outputs must be [num_examples, num_classes]; got shape {outputs.shape}.")
  if labels.shape != outputs.shape[:1]:
    raise ValueError(f"labels must be [num_examples] = {outputs.shape[:1]} to match outputs of "
                     f"shape {outputs.shape}; got shape {labels.shape}.")
  _check_labels(labels, outputs.shape[1], "labels")
  return outputs, labels.astype(np.int64)


def _check_labels(labels: np.ndarray, num_classes: int, name: str) -> None:
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{name} must be integer class indices; got dtype {labels.dtype}.")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{name} must lie in [0, {num_classes}); got values from {labels.min()} to "
                     f"{labels.max()}.")


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """`[num_classes, num_classes]` counts: entry `[t, p]` counts class `t` predicted as `p`."""
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1; got {num_classes}.")
  if labels.ndim != 1 or labels.shape != predictions.shape:
    raise ValueError(f"labels and predictions must be 1-D arrays of one length; got shapes "
                     f"{labels.shape} and {predictions.shape}.")
  _check_labels(labels, num_classes, "labels")
  _check_labels(predictions, num_classes, "predictions")
  flat = labels.astype(np.int64) * num_classes + predictions.astype(np.int64)
  return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
  """Accuracy of each true class (recall); NaN for a class without examples, not 0."""
  confusion = np.asarray(confusion)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f"confusion must be a square [num_classes, num_classes] matrix; got shape "
                     f"{confusion.shape}.")
  totals = confusion.sum(axis=1).astype(np.float64)
  return np.where(totals > 0, np.diag(confusion) / np.maximum(totals, 1.0), np.nan)


def label_ranks(outputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """The rank of each example's true class among its outputs: 0 when it is the prediction. Ties
  go to the lower class index, as `argmax` breaks them, so top-1 accuracy equals accuracy."""
  outputs, labels = _check_classification(outputs, labels)
  true_scores = np.take_along_axis(outputs, labels[:, None], axis=1)
  classes = np.arange(outputs.shape[1])[None, :]
  ahead = (outputs > true_scores) | ((outputs == true_scores) & (classes < labels[:, None]))
  return ahead.sum(axis=1)


def top_k_accuracy(outputs: np.ndarray, labels: np.ndarray, k: int) -> float:
  """The fraction of examples whose true class is among the `k` highest outputs."""
  if k < 1:
    raise ValueError(f"k must be >= 1; got {k}.")
  return float(np.mean(label_ranks(outputs, labels) < k))


@dataclasses.dataclass(frozen=True)
class ReliabilityBins:
  """Equal-width confidence bins over [0, 1], the data of a reliability diagram. An example's
  confidence is its highest class probability; bin `b` holds the confidences in `(lower[b],
  upper[b]]` (the first bin also 0). Per bin: the mean `confidence` and the `accuracy` of its
  examples (NaN for an empty bin), and their `count`."""

  lower: np.ndarray
  upper: np.ndarray
  confidence: np.ndarray
  accuracy: np.ndarray
  count: np.ndarray

  @property
  def num_bins(self) -> int:
    return int(self.count.shape[0])

  def expected_calibration_error(self) -> float:
    """`sum_b (count_b / total) * |accuracy_b - confidence_b|` over the non-empty bins."""
    total = int(self.count.sum())
    if total == 0:
      raise ValueError("the bins hold no examples; the calibration error is undefined.")
    return float(np.nansum(self.count / total * np.abs(self.accuracy - self.confidence)))


def reliability_diagram_data(probabilities: np.ndarray, labels: np.ndarray, *,
                             num_bins: int = 15) -> ReliabilityBins:
  """Bins the examples by confidence (highest probability) into `num_bins` equal-width bins over
  [0, 1] (15, as in Guo et al. 2017) and measures each bin's accuracy. `probabilities` are
  `[num_examples, num_classes]` class probabilities (`softmax_probabilities`)."""
  if num_bins < 1:
    raise ValueError(f"num_bins must be >= 1; got {num_bins}.")
  probabilities, labels = _check_classification(probabilities, labels)
  if not outputs_are_probabilities(probabilities):
    raise ValueError("probabilities must be non-negative with rows summing to 1; these look like "
                     "logits: convert them with softmax_probabilities(outputs) first.")
  probabilities = probabilities.astype(np.float64)
  confidences = probabilities.max(axis=1)
  correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
  # Bin b holds (b / num_bins, (b + 1) / num_bins]; ceil puts an edge value in the bin below it.
  which = np.clip(np.ceil(confidences * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
  count = np.bincount(which, minlength=num_bins)
  confidence, accuracy = (
      np.where(count > 0, np.bincount(which, values, num_bins) / np.maximum(count, 1), np.nan)
      for values in (confidences, correct))
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  return ReliabilityBins(lower=edges[:-1], upper=edges[1:], confidence=confidence,
                         accuracy=accuracy, count=count)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, *,
                               num_bins: int = 15) -> float:
  """Expected calibration error (Guo et al. 2017) over `num_bins` equal-width confidence bins."""
  return reliability_diagram_data(probabilities, labels,
                                  num_bins=num_bins).expected_calibration_error()


@dataclasses.dataclass(frozen=True)
class EvaluationReport:
  """A classifier's evaluation on one split; the arrays are per class or per example."""

  num_examples: int
  num_classes: int
  class_names: tuple[str, ...]  # indices as strings when none were given
  accuracy: float
  per_class_accuracy: np.ndarray  # NaN for a class without examples
  confusion: np.ndarray  # counts, rows true classes, columns predictions
  top_k_accuracy: dict[int, float]  # for k = 1 and each requested k below num_classes
  log_loss: float  # mean negative log-probability of the true class (nats)
  expected_calibration_error: float
  reliability: ReliabilityBins
  misclassified: np.ndarray  # indices of the wrongly predicted examples, in order
  labels: np.ndarray
  predictions: np.ndarray  # argmax classes
  confidences: np.ndarray  # the highest class probability
  outputs_were_probabilities: bool


def evaluate_outputs(outputs: np.ndarray, labels: np.ndarray, *,
                     class_names: Sequence[str] | None = None, top_k: Sequence[int] = (1, 5),
                     num_bins: int = 15) -> EvaluationReport:
  """The `EvaluationReport` of `[num_examples, num_classes]` outputs (logits or probabilities) on
  labelled examples; a `top_k` other than 1 of at least the number of classes is left out."""
  outputs, labels = _check_classification(outputs, labels)
  num_examples, num_classes = outputs.shape
  if num_examples == 0:
    raise ValueError("there are no examples to evaluate (outputs have 0 rows).")
  class_names = tuple(map(str, range(num_classes) if class_names is None else class_names))
  if len(class_names) != num_classes:
    raise ValueError(f"class_names has {len(class_names)} names, but the model has {num_classes} "
                     "outputs; give one name per class.")
  if any(k < 1 for k in top_k):
    raise ValueError(f"every top_k must be >= 1; got {tuple(top_k)}.")
  probabilities = softmax_probabilities(outputs)
  predictions = outputs.argmax(axis=1)
  confusion = confusion_matrix(labels, predictions, num_classes)
  ranks = label_ranks(outputs, labels)
  reliability = reliability_diagram_data(probabilities, labels, num_bins=num_bins)
  true_probabilities = probabilities[np.arange(num_examples), labels]
  # The smallest positive float64 keeps the log finite for a probability output of exactly 0.
  log_loss = float(-np.mean(np.log(np.maximum(true_probabilities, np.finfo(np.float64).tiny))))
  return EvaluationReport(
      num_examples=num_examples, num_classes=num_classes, class_names=class_names,
      accuracy=float(np.trace(confusion)) / num_examples,
      per_class_accuracy=per_class_accuracy(confusion), confusion=confusion,
      top_k_accuracy={int(k): float(np.mean(ranks < k)) for k in sorted(set(top_k))
                      if k == 1 or k < num_classes},
      log_loss=log_loss, expected_calibration_error=reliability.expected_calibration_error(),
      reliability=reliability, misclassified=np.flatnonzero(predictions != labels),
      labels=labels, predictions=predictions, confidences=probabilities.max(axis=1),
      outputs_were_probabilities=outputs_are_probabilities(outputs))


def evaluate_classifier(state: TrainState, inputs: np.ndarray, labels: np.ndarray, *,
                        class_names: Sequence[str] | None = None, top_k: Sequence[int] = (1, 5),
                        num_bins: int = 15, batch_size: int = 1000,
                        pixels: bool = False) -> EvaluationReport:
  """`evaluate_outputs` of the model's outputs (`predict`) against `labels`."""
  return evaluate_outputs(predict(state, inputs, batch_size=batch_size, pixels=pixels), labels,
                          class_names=class_names, top_k=top_k, num_bins=num_bins)
