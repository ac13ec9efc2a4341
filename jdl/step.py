"""Pure train and eval steps.

`make_train_step` and `make_eval_step` bind the fixed pieces (loss, penalty, metrics, axis name)
and return plain functions of `(state, batch)`, so the same function runs under `jax.jit`, sharded
jit, and `jax.pmap` with `axis_name` set. A batch is a dict with `input`, `label` and optionally
`mask` (per example or per position) and mixup's `mix_label`, `mix_weight` (docs/training.md).

Loss and metrics cover the unmasked examples only. With `axis_name` set, the loss is normalised by
the example count summed over the axis and gradients are summed (`psum`), which equals the gradient
of the global batch's mean loss even when devices hold different numbers of real examples.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jdl import losses as losses_lib
from jdl import metrics as metrics_lib
from jdl.state import Params, TrainState

Batch = Mapping[str, jax.Array]
Metrics = metrics_lib.Metrics
MetricsFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None], Metrics]
TrainStepFn = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
EvalStepFn = Callable[[TrainState, Batch], Metrics]
AugmentFn = Callable[[jax.Array, Batch], Batch]
AdversaryFn = Callable[[Callable[..., Any], Mapping[str, Any], jax.Array, Batch], Batch]

AUGMENT_STREAM = 1
"""The step's key is folded with this to key augmentation, so dropout keeps its own key."""
ADVERSARY_STREAM = 2
"""The step's key is folded with this to key the adversary (e.g. PGD's random start)."""

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def check_compute_dtype(compute_dtype: Any) -> jnp.dtype | None:
  """`compute_dtype` as a floating dtype; None stays None (compute in the parameters' dtype)."""
  if compute_dtype is None:
    return None
  try:
    dtype = jnp.dtype(compute_dtype)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"compute_dtype must be a floating dtype such as {COMPUTE_DTYPES}; got {compute_dtype!r}.")
  return dtype


def cast_floating(tree: Any, dtype: jnp.dtype | None) -> Any:
  """`tree` with every floating array cast to `dtype` (integer arrays untouched); None: as is."""
  if dtype is None:
    return tree
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def _apply_in(compute_dtype: jnp.dtype | None, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`apply_fn` computing in `compute_dtype`: outputs come back in float32, and the model state in
  the dtypes it came in, so a scan carrying the state keeps its types."""
  if compute_dtype is None:
    return apply_fn

  def apply_in_compute_dtype(variables, inputs, **kwargs):
    params = cast_floating(variables["params"], compute_dtype)
    result = apply_fn({**variables, "params": params}, cast_floating(inputs, compute_dtype),
                      **kwargs)
    if "mutable" not in kwargs:
      return cast_floating(result, jnp.float32)
    outputs, new_state = result
    old_state = {k: v for k, v in variables.items() if k != "params"}
    new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), dict(new_state),
                             {k: old_state[k] for k in new_state})
    return cast_floating(outputs, jnp.float32), new_state

  return apply_in_compute_dtype


_DEFAULT_METRICS: MetricsFn = functools.partial(metrics_lib.classification_metrics, top_k=())


def make_train_step(
    loss_fn: losses_lib.LossFn = losses_lib.softmax_cross_entropy,
    *,
    weight_penalty: Callable[[Params], jax.Array] | None = None,
    metrics_fn: MetricsFn = _DEFAULT_METRICS,
    axis_name: str | None = None,
    augment: AugmentFn | None = None,
    check_finite: bool = True,
    compute_dtype: Any = None,
    adversary: AdversaryFn | None = None,
) -> TrainStepFn:
  """Returns a pure train step `(state, batch) -> (state, metrics)`.

  Args:
    loss_fn: per-example loss `(outputs, labels) -> [batch]`.
    weight_penalty: optional `params -> scalar` added to the mean loss (e.g.
      `losses.make_weight_penalty(l2=1e-4)`).
    metrics_fn: `(outputs, labels, losses, mask) -> sums`; see `jdl.metrics`.
    axis_name: the mapped axis name when run under `pmap`/`shard_map`; None under (sharded) jit.
    augment: optional on-device augmentation `(key, batch) -> batch` of every training batch
      (e.g. `jdl.augment.make_augment(spec)`); it may add mixup's `mix_label` and `mix_weight`.
    check_finite: add `nonfinite_step` / `nonfinite_what` (`jdl.metrics.nonfinite_metrics`) to
      the metrics, so `fit` can stop a diverging run at its first bad step.
    compute_dtype: None computes in the parameters' dtype; `jnp.bfloat16` is mixed precision:
      bfloat16 forward and backward passes, float32 parameters, gradients, optimizer state, loss.
    adversary: optional adversarial training, `(apply_fn, variables, key, batch) -> batch` (e.g.
      `jdl.analysis.adversarial.make_adversary(epsilon)`), applied after `augment` with the
      current parameters; the loss is taken on its inputs, and the attack is not differentiated
      through (Madry et al.).

  Returns:
    The train step. Its dropout key is `fold_in(state.rng, state.step)` (and the device index
    under `axis_name`); augmentation and the adversary fold that with `AUGMENT_STREAM` and
    `ADVERSARY_STREAM`, so runs are reproducible and resumable.
  """

  compute_dtype = check_compute_dtype(compute_dtype)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    _unpack(batch, state.input_shape, state.input_dtype)
    apply_fn = _apply_in(compute_dtype, state.apply_fn)
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    if augment is not None:
      batch = augment(jax.random.fold_in(rng, AUGMENT_STREAM), batch)
    if adversary is not None:
      batch = jax.lax.stop_gradient(adversary(
          apply_fn, state.variables(), jax.random.fold_in(rng, ADVERSARY_STREAM), batch))
    inputs, labels, mask = _unpack(batch, state.input_shape, state.input_dtype)
    per_example_loss = _mixed_loss(loss_fn, batch)
    num_shards = 1 if axis_name is None else jax.lax.psum(1, axis_name)
    mutable = list(state.model_state)

    def objective(params: Params):
      variables = {"params": params, **state.model_state}
      outputs, new_model_state = apply_fn(variables, inputs, train=True, rngs={"dropout": rng},
                                          mutable=mutable)
      per_example = per_example_loss(outputs, labels)
      keep = metrics_lib.broadcast_mask(mask, per_example.shape).astype(jnp.float32)
      example_count = jnp.sum(keep)  # examples, or positions for per-position losses
      if axis_name is not None:
        example_count = jax.lax.psum(example_count, axis_name)
      loss = jnp.sum(per_example * keep) / jnp.maximum(example_count, 1.0)
      if weight_penalty is not None:
        # Each shard adds its share, so the psum of gradients counts the penalty once.
        loss = loss + weight_penalty(params) / num_shards
      return loss, (outputs, per_example, new_model_state)

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    (loss_value, (outputs, per_example, new_model_state)), grads = grad_fn(state.params)
    metrics = metrics_fn(outputs, labels, per_example, mask)
    if axis_name is not None:
      grads, metrics = jax.lax.psum((grads, metrics), axis_name)
    if check_finite:  # after the psum, so every device agrees
      metrics = {**metrics, **metrics_lib.nonfinite_metrics(
          state.step, metrics.get("loss_sum", loss_value), grads)}
    new_state = state.apply_gradients(grads, model_state=dict(new_model_state))
    return new_state, metrics

  return train_step


def make_eval_step(
    loss_fn: losses_lib.LossFn = losses_lib.softmax_cross_entropy,
    *,
    metrics_fn: MetricsFn = _DEFAULT_METRICS,
    axis_name: str | None = None,
    compute_dtype: Any = None,
) -> EvalStepFn:
  """Returns a pure eval step `(state, batch) -> metric sums`, the model in inference mode.

  `compute_dtype` is that of `make_train_step`.
  """
  compute_dtype = check_compute_dtype(compute_dtype)

  def eval_step(state: TrainState, batch: Batch) -> Metrics:
    inputs, labels, mask = _unpack(batch, state.input_shape, state.input_dtype)
    outputs = _apply_in(compute_dtype, state.apply_fn)(state.variables(), inputs, train=False)
    metrics = metrics_fn(outputs, labels, loss_fn(outputs, labels), mask)
    if axis_name is not None:
      metrics = jax.lax.psum(metrics, axis_name)
    return metrics

  return eval_step


def _mixed_loss(loss_fn: losses_lib.LossFn, batch: Batch) -> losses_lib.LossFn:
  """`loss_fn`, or its mixup blend when the batch carries `mix_label` and `mix_weight`."""
  if "mix_label" not in batch:
    return loss_fn
  if "mix_weight" not in batch:
    raise ValueError("a batch with 'mix_label' needs 'mix_weight' (the weight of 'label') too.")
  mix_label, weight = batch["mix_label"], batch["mix_weight"].astype(jnp.float32)

  def blended(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    return weight * loss_fn(outputs, labels) + (1.0 - weight) * loss_fn(outputs, mix_label)

  return blended


def _unpack(batch: Batch, input_shape: tuple[int, ...], input_dtype: str = "float32"):
  """Checks a batch against the model's input shape while tracing (free at run time)."""
  if not isinstance(batch, Mapping) or "input" not in batch or "label" not in batch:
    found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
    raise ValueError(f"a batch must be a dict with keys 'input' and 'label'; got {found}.")
  inputs, labels, mask = batch["input"], batch["label"], batch.get("mask")
  if inputs.ndim < 1 or inputs.shape[0] == 0:
    raise ValueError(f"empty batch: 'input' has shape {inputs.shape}; need at least one example.")
  if tuple(inputs.shape[1:]) != tuple(input_shape):
    raise ValueError(
        f"input shape {tuple(inputs.shape[1:])} (per example, batch shape {inputs.shape}) does not "
        f"fit the model, which was initialised for per-example shape {tuple(input_shape)}.")
  wants_integers = jnp.issubdtype(input_dtype, jnp.integer)
  if wants_integers != jnp.issubdtype(inputs.dtype, jnp.integer):
    raise ValueError(
        f"'input' has dtype {inputs.dtype}, but the model was initialised with {input_dtype} "
        f"inputs; {'token ids must be integers' if wants_integers else 'it expects real values'}.")
  if labels.ndim < 1 or labels.shape[0] != inputs.shape[0]:
    raise ValueError(f"'label' has shape {labels.shape} but 'input' has {inputs.shape[0]} "
                     "examples; labels need the same leading batch dimension.")
  if mask is not None and mask.shape not in (inputs.shape[:1], labels.shape):
    raise ValueError(f"'mask' has shape {mask.shape}; expected {inputs.shape[:1]} (per example) "
                     f"or the labels' shape {labels.shape} (per position).")
  return inputs, labels, mask


def make_steps(
    loss_name: str = "softmax_cross_entropy",
    *,
    l1: float = 0.0,
    l2: float = 0.0,
    top_k: tuple[int, ...] = (),
    axis_name: str | None = None,
    augment: AugmentFn | None = None,
    label_smoothing: float = 0.0,
    compute_dtype: Any = None,
    adversary: AdversaryFn | None = None,
    check_finite: bool = True,
) -> tuple[TrainStepFn, EvalStepFn]:
  """Train and eval steps for classification with a named loss (arguments as `make_train_step`'s).

  Label smoothing applies to the training loss only, so evaluation numbers compare across
  smoothing settings.
  """
  metrics_fn = functools.partial(metrics_lib.classification_metrics, top_k=top_k)
  train_step = make_train_step(
      losses_lib.get_classification_loss(loss_name, label_smoothing),
      weight_penalty=losses_lib.make_weight_penalty(l1=l1, l2=l2), metrics_fn=metrics_fn,
      axis_name=axis_name, augment=augment, compute_dtype=compute_dtype, adversary=adversary,
      check_finite=check_finite)
  eval_step = make_eval_step(losses_lib.get_classification_loss(loss_name), metrics_fn=metrics_fn,
                             axis_name=axis_name, compute_dtype=compute_dtype)
  return train_step, eval_step

