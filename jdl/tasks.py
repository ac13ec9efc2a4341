"""Tasks: what a step computes from a batch. The one piece to swap for a new kind of problem.

A `Task` says which part of the batch (any pytree; the presets read dicts by key) the model takes,
the loss, the metrics, and the model's random streams, so classification, regression and anything
else (a VAE's ELBO) go through the same steps, `fit`, checkpoints and logs. `mask` (per example or
per position), when present, keeps padding out of the loss and the metrics. `prepare` runs first
in the step, on the device: `scale_pixels` makes uint8 pixels (a quarter of float32's bytes to
transfer) float32 in [0, 1] there.

  task = jdl.Task(loss=lambda outputs, batch: jnp.mean((outputs - batch["y"]) ** 2, axis=-1),
                  inputs="x")
  pixels = jdl.tasks.classification(pixels=True)  # batch["input"] holds uint8 pixels
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from jdl import losses as losses_lib
from jdl import metrics as metrics_lib

Batch = Any  # a pytree; the presets read a dict
LossValue = Union[jax.Array, tuple[jax.Array, Mapping[str, jax.Array]]]
TaskLossFn = Callable[[Any, Batch], LossValue]
"""`(outputs, batch) -> losses` or `(losses, aux)`: `[batch, ...]` losses whose masked mean is
minimised, or one scalar, the batch's mean loss (padding left out by the loss itself); `aux` maps
names to per-example values (or scalars) reported as means (`train_<name>`)."""


@dataclasses.dataclass(frozen=True)
class Task:
  """How a step turns a batch into a loss (`TaskLossFn`) and metrics.

  Attributes:
    metrics: metric functions `(outputs, batch, mask) -> states` (`jdl.metrics`), e.g.
      `accuracy_metric(top_k=(5,))`.
    inputs: what the model is called with: a batch key, or `batch -> inputs` for several parts
      (a dict of arrays is one argument to the model).
    rng_streams: the random streams the model draws from (`self.make_rng(name)`), keyed by the
      seed, the stream's name and the step, so a resumed run draws what an unbroken one would.
    eval_loss: the loss for evaluation where it differs (label smoothing trains only); None: `loss`.
    prepare: `batch -> batch`, run first in every step (on the device, before augmentation and
      the model), e.g. `scale_pixels()`; None: the batch as it comes.
  """

  loss: TaskLossFn
  metrics: Sequence[metrics_lib.MetricFn] = ()
  inputs: str | Callable[[Batch], Any] = "input"
  rng_streams: tuple[str, ...] = ("dropout",)
  eval_loss: TaskLossFn | None = None
  prepare: Callable[[Batch], Batch] | None = None

  def __post_init__(self) -> None:
    if not callable(self.loss):
      raise TypeError(f"Task.loss must be a function (outputs, batch) -> losses; got "
                      f"{type(self.loss).__name__}.")
    if self.prepare is not None and not callable(self.prepare):
      raise TypeError(f"Task.prepare must be a function batch -> batch (or None); got "
                      f"{type(self.prepare).__name__}.")
    if isinstance(self.rng_streams, str) or not all(
        isinstance(name, str) and name for name in self.rng_streams):
      raise ValueError(f"Task.rng_streams must be a tuple of stream names such as ('dropout',); "
                       f"got {self.rng_streams!r}.")
    if "params" in self.rng_streams:
      raise ValueError("'params' is the initialisation stream, not a training stream; leave it "
                       "out of Task.rng_streams.")
    object.__setattr__(self, "metrics", tuple(self.metrics))
    object.__setattr__(self, "rng_streams", tuple(self.rng_streams))

  def prepared(self, batch: Batch) -> Batch:
    """`batch` as the step works on it: `prepare(batch)`, or `batch` itself."""
    return batch if self.prepare is None else self.prepare(batch)

  def model_inputs(self, batch: Batch) -> Any:
    """The part of `batch` the model is called with."""
    if callable(self.inputs):
      return self.inputs(batch)
    return _read(batch, self.inputs, "model inputs", " Set Task(inputs=...) to the key (or a "
                 "function) that gives them.")

  def for_evaluation(self) -> Task:
    """This task with `eval_loss` as its loss."""
    return self if self.eval_loss is None else dataclasses.replace(
        self, loss=self.eval_loss, eval_loss=None)


PIXEL_VALUES = np.arange(256, dtype=np.float32) / np.float32(255.0)
"""Pixel value v as float32 `v / 255`, divided by numpy (IEEE division). `unit_pixels` looks
pixels up here: XLA compiles `x / 255` as `x * (1 / 255)`, which is one ulp off for half the
values, so a division on the device would not give the bits of a division on the host."""


def unit_pixels(inputs: Any) -> jax.Array:
  """Model inputs from pixels, on the device: uint8 as float32 in [0, 1] (`PIXEL_VALUES`);
  floating inputs, already scaled (by a host-side tf.data augmentation), as they are; any other
  dtype is a ValueError rather than a guess."""
  dtype = jnp.result_type(inputs)
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.asarray(inputs)
  if dtype != jnp.uint8:
    raise ValueError(f"pixels must be uint8 (or floats already in [0, 1]); got dtype {dtype}. "
                     "Integer token ids are not pixels: leave them out of scale_pixels.")
  return jnp.asarray(PIXEL_VALUES)[inputs]


def scale_pixels(key: str = "input") -> Callable[[Batch], Batch]:
  """A `Task.prepare`: the batch with its uint8 pixels `batch[key]` as float32 in [0, 1]
  (`unit_pixels`), everything else as it is. Only `key` is touched: a uint8 array elsewhere (a
  byte-level model's token ids) is not pixels."""
  def prepare(batch: Batch) -> Batch:
    return {**batch, key: unit_pixels(_read(batch, key, "pixels"))}

  return prepare


def batch_mask(batch: Batch) -> jax.Array | None:
  """The batch's `mask` of real examples (per example or per position), or None: all real."""
  return batch.get("mask") if isinstance(batch, Mapping) else None


def _read(batch: Batch, key: str, what: str = "targets", hint: str = "") -> Any:
  if not isinstance(batch, Mapping) or key not in batch:
    found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
    raise ValueError(f"the task reads its {what} from batch[{key!r}], but the batch has "
                     f"{found}.{hint}")
  return batch[key]


def _on_labels(loss_fn: losses_lib.LossFn, key: str, *, class_axis: bool = False) -> TaskLossFn:
  """A `(outputs, labels)` loss as a task loss reading `batch[key]`; with `class_axis`, labels
  must be integers shaped like the outputs without their last (class) axis."""
  def loss(outputs: Any, batch: Batch) -> jax.Array:
    labels = _read(batch, key)
    if class_axis:
      metrics_lib.check_class_labels(outputs, labels, "classification")
    return loss_fn(outputs, labels)

  return loss


def accuracy_metric(top_k: Sequence[int] = (), *, labels: str = "label") -> metrics_lib.MetricFn:
  """A metric function: accuracy (and top-k accuracies) of integer `batch[labels]`."""
  top_k = tuple(top_k)

  def accuracy(outputs: jax.Array, batch: Batch, mask: jax.Array | None) -> metrics_lib.Metrics:
    return metrics_lib.accuracy_metrics(outputs, _read(batch, labels), mask, top_k=top_k)

  return accuracy


def error_metric(*, targets: str = "label") -> metrics_lib.MetricFn:
  """A metric function: mean and maximum absolute error of the outputs against `batch[targets]`."""
  def errors(outputs: jax.Array, batch: Batch, mask: jax.Array | None) -> metrics_lib.Metrics:
    return metrics_lib.error_metrics(outputs, _read(batch, targets), mask)

  return errors


def classification(loss: str | losses_lib.LossFn = "softmax_cross_entropy", *,
                   label_smoothing: float = 0.0, top_k: Sequence[int] = (),
                   inputs: str = "input", labels: str = "label", pixels: bool = False) -> Task:
  """Integer labels, one per example or per position. `loss` is a name in `jdl.losses.LOSSES` or
  a `(outputs, labels) -> [batch]` loss; `label_smoothing` (named losses) smooths the training
  loss alone, so evaluation numbers compare; `top_k` adds top-k accuracies. `pixels`: the inputs
  are uint8 pixels (`DatasetMeta.pixels`), scaled to [0, 1] in the step (`scale_pixels`)."""
  if isinstance(loss, str):
    train_loss = losses_lib.get_classification_loss(loss, label_smoothing)
    plain_loss = losses_lib.get_classification_loss(loss)
  else:
    if label_smoothing:
      raise ValueError("label_smoothing applies to named losses; bind it into your own loss.")
    train_loss = plain_loss = loss
  eval_loss = None if train_loss is plain_loss else _on_labels(plain_loss, labels, class_axis=True)
  return Task(loss=_on_labels(train_loss, labels, class_axis=True),
              metrics=(accuracy_metric(top_k, labels=labels),), inputs=inputs, eval_loss=eval_loss,
              prepare=scale_pixels(inputs) if pixels else None)


def language_model(*, chunk: int = 256, inputs: str = "input", labels: str = "label") -> Task:
  """Next-token prediction from a model that returns `{"hidden": [B, T, D], "unembedding": [V, D]}`
  (`TransformerLM(output="hidden")`): the cross-entropy and accuracy of every position, from
  logits computed `chunk` positions at a time (`jdl.losses.chunked_softmax_cross_entropy`), so the
  `[B, T, V]` logits never exist at once. For a model that returns logits, use `classification`."""
  def loss(outputs: Any, batch: Batch) -> LossValue:
    if not isinstance(outputs, Mapping) or not {"hidden", "unembedding"} <= set(outputs):
      raise ValueError("tasks.language_model reads the model's outputs 'hidden' and "
                       "'unembedding' (TransformerLM(output='hidden')); got "
                       f"{type(outputs).__name__}. For logits use tasks.classification().")
    losses, correct = losses_lib.chunked_softmax_cross_entropy(
        outputs["hidden"], outputs["unembedding"], _read(batch, labels), chunk=chunk)
    return losses, {"accuracy": correct.astype(jnp.float32)}

  return Task(loss=loss, inputs=inputs)


def regression(loss: losses_lib.LossFn = losses_lib.mean_squared_error, *, inputs: str = "input",
               targets: str = "label") -> Task:
  """Real-valued targets shaped like the outputs; reports the loss, mean and largest error."""
  return Task(loss=_on_labels(loss, targets), metrics=(error_metric(targets=targets),),
              inputs=inputs)
