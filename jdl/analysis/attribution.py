"""Attribution: which parts of an input a classifier's score for one class depends on.

`saliency` (Simonyan et al., 2014), `smoothgrad` (Smilkov et al., 2017), `integrated_gradients`
(Sundararajan et al., 2017) and `occlusion` (Zeiler and Fergus, 2014) are pure functions of
`(apply_fn, variables, inputs, target_classes)` that return one attribution per input element.
`apply_fn(variables, inputs, train=False)` must return `[batch, num_classes]`; `target_classes`
is `[B]` class indices or one int. The target score is the class's logit, or its probability with
`use_probabilities=True` (a saturated softmax has gradients near zero where the input matters).

Token ids have no gradient: occlusion works on them; the gradient methods take embeddings
`[B, T, D]` and an `apply_fn` from them (`TransformerLM.logits_from_embeddings`).

Every method runs under `jax.jit`, its many model calls (path points, noise samples, occluded
copies) `points_per_call` at a time (memory: `points_per_call x batch`), `vmap`ped in a `lax.scan`.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ApplyFn = Callable[..., jax.Array]
Variables = Any  # {"params": ..., "batch_stats": ...}

IG_METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
              "gauss_legendre")


def saliency(apply_fn: ApplyFn, variables: Variables, inputs: jax.Array,
             target_classes: jax.Array | int, *, absolute: bool = False,
             reduce_channels: bool = False, use_probabilities: bool = False) -> jax.Array:
  """The gradient of each example's target score with respect to its `[B, ...]` floating input,
  float32: its magnitude with `absolute` (the usual saliency map), summed over the last axis
  (channels, features, embedding width) of rank >= 3 inputs with `reduce_channels`."""
  inputs, targets = _check_call(apply_fn, variables, inputs, target_classes, "saliency",
                                needs_gradient=True, reduce_channels=reduce_channels)
  gradients = _saliency_jit(apply_fn, variables, inputs, targets, use_probabilities)
  return _finish(gradients, absolute=absolute, reduce_channels=reduce_channels)


def smoothgrad(apply_fn: ApplyFn, variables: Variables, inputs: jax.Array,
               target_classes: jax.Array | int, *, key: jax.Array, num_samples: int = 25,
               noise_scale: float = 0.15, absolute: bool = False, reduce_channels: bool = False,
               use_probabilities: bool = False, points_per_call: int = 32) -> jax.Array:
  """SmoothGrad: the saliency averaged over `num_samples` copies of each input with Gaussian noise
  of standard deviation `noise_scale` times the example's own value range (`max - min`), as in
  Smilkov et al., so one setting suits pixels and standardised signals alike. `absolute` and
  `reduce_channels` apply to the averaged gradient."""
  _check_positive_int(num_samples, "num_samples")
  if not np.isfinite(noise_scale) or noise_scale < 0:
    raise ValueError(f"noise_scale must be a finite number >= 0 (a fraction of each input's value "
                     f"range); got {noise_scale!r}.")
  inputs, targets = _check_call(apply_fn, variables, inputs, target_classes, "smoothgrad",
                                needs_gradient=True, reduce_channels=reduce_channels,
                                points_per_call=points_per_call)
  if not isinstance(key, jax.Array) or not (jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                                            or (key.shape == (2,) and key.dtype == jnp.uint32)):
    raise ValueError(f"key must be a PRNG key (jax.random.key or jax.random.PRNGKey); got "
                     f"{key!r}.")
  gradients = _smoothgrad_jit(apply_fn, variables, inputs, targets, key,
                              jnp.float32(noise_scale), num_samples, use_probabilities,
                              points_per_call)
  return _finish(gradients, absolute=absolute, reduce_channels=reduce_channels)


def integrated_gradients(
    apply_fn: ApplyFn, variables: Variables, inputs: jax.Array, target_classes: jax.Array | int,
    *, baseline: jax.Array | float | None = None, steps: int = 64,
    method: str = "riemann_trapezoid", reduce_channels: bool = False,
    use_probabilities: bool = False, points_per_call: int = 32,
    return_convergence_delta: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Integrated gradients: `(x - baseline) * mean gradient on the path baseline -> x`.

  The baseline is "no signal" for the model: None (zeros), a number, or an array shaped like one
  example or the whole batch. The path integral is a quadrature (`method`, one of `IG_METHODS`;
  the trapezoid takes `steps + 1` gradients, the others `steps`). The attributions (also summed
  over channels) sum to `score(x) - score(baseline)` up to the quadrature error, which
  `return_convergence_delta` also returns, `[B]`: a large one needs more `steps`."""
  _check_positive_int(steps, "steps")
  if method not in IG_METHODS:
    raise ValueError(f"unknown integrated gradients method {method!r}; expected one of "
                     f"{IG_METHODS}.")
  inputs, targets = _check_call(apply_fn, variables, inputs, target_classes,
                                "integrated_gradients", needs_gradient=True,
                                reduce_channels=reduce_channels, points_per_call=points_per_call)
  baseline = jnp.asarray(0 if baseline is None else baseline, inputs.dtype)
  if baseline.shape not in ((), inputs.shape[1:], inputs.shape):
    raise ValueError(f"baseline must be a number, one example {inputs.shape[1:]} or the whole "
                     f"batch {inputs.shape}; got shape {baseline.shape}.")
  alphas, weights = _quadrature(method, steps)
  attributions, delta = _integrated_gradients_jit(
      apply_fn, variables, inputs, jnp.broadcast_to(baseline, inputs.shape), targets,
      jnp.asarray(alphas), jnp.asarray(weights), use_probabilities, points_per_call)
  attributions = _finish(attributions, absolute=False, reduce_channels=reduce_channels)
  return (attributions, delta) if return_convergence_delta else attributions


def occlusion(apply_fn: ApplyFn, variables: Variables, inputs: jax.Array,
              target_classes: jax.Array | int, *, window: int | Sequence[int],
              stride: int | Sequence[int] | None = None, fill: float | int = 0.0,
              use_probabilities: bool = False, points_per_call: int = 32) -> jax.Array:
  """Occlusion: the drop in the target score when a window of the input is set to `fill`.

  The window slides over the leading axes after the batch axis and covers the rest whole: an int
  window is 2-D on `[B, H, W, C]` images and 1-D otherwise; a tuple of k sizes slides over the
  first k axes; `stride` (default `window`: no overlap) likewise. A last window flush with the end
  covers any tail. Each element's float32 attribution is the mean drop, `score(x) - score(occluded
  x)`, over the windows covering it. Integer inputs (token ids) need an integer `fill`."""
  inputs, targets = _check_call(apply_fn, variables, inputs, target_classes, "occlusion",
                                needs_gradient=False, reduce_channels=False,
                                points_per_call=points_per_call)
  window, starts, coverage = _occlusion_windows(window, stride, inputs.shape)
  if jnp.issubdtype(inputs.dtype, jnp.integer) and float(fill) != int(fill):
    raise ValueError(f"fill must be an integer (e.g. the padding id) for integer inputs of dtype "
                     f"{inputs.dtype}; got {fill!r}.")
  return _occlusion_jit(apply_fn, variables, inputs, targets, jnp.asarray(starts),
                        jnp.asarray(coverage), window, fill, use_probabilities, points_per_call)


def _target_scores(apply_fn: ApplyFn, variables: Variables, inputs: jax.Array,
                   targets: jax.Array, use_probabilities: bool) -> jax.Array:
  """`[B]` target logits (or probabilities) of the model on `inputs`."""
  outputs = apply_fn(variables, inputs, train=False).astype(jnp.float32)
  if use_probabilities:
    outputs = jax.nn.softmax(outputs, axis=-1)
  return jnp.take_along_axis(outputs, targets[:, None], axis=1)[:, 0]


def _score_gradients(apply_fn: ApplyFn, variables: Variables, inputs: jax.Array,
                     targets: jax.Array, use_probabilities: bool) -> jax.Array:
  """`[B, ...]` target-score gradients: of the batch sum, as inference mode keeps examples apart."""
  gradients = jax.grad(lambda x: jnp.sum(_target_scores(apply_fn, variables, x, targets,
                                                        use_probabilities)))(inputs)
  return gradients.astype(jnp.float32)


_saliency_jit = jax.jit(_score_gradients, static_argnums=(0, 4))


def _sum_over_points(point_fn: Callable[[jax.Array], jax.Array], num_points: int,
                     points_per_call: int, shape: tuple[int, ...]) -> jax.Array:
  """`sum(point_fn(i) for i in range(num_points))` (float32 of `shape`), `points_per_call` at a
  time, `vmap`ped in a `lax.scan`; the last chunk's padding points are dropped."""
  num_chunks = -(-num_points // points_per_call)
  chunk = -(-num_points // num_chunks)

  def add_chunk(total: jax.Array, chunk_index: jax.Array) -> tuple[jax.Array, None]:
    indices = chunk_index * chunk + jnp.arange(chunk)
    values = jax.vmap(point_fn)(jnp.minimum(indices, num_points - 1))
    keep = (indices < num_points).astype(values.dtype).reshape((chunk,) + (1,) * len(shape))
    return total + jnp.sum(values * keep, axis=0), None

  total, _ = jax.lax.scan(add_chunk, jnp.zeros(shape, jnp.float32), jnp.arange(num_chunks))
  return total


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8))
def _smoothgrad_jit(apply_fn, variables, inputs, targets, key, noise_scale, num_samples,
                    use_probabilities, points_per_call):
  x = inputs.astype(jnp.float32)
  sigma = noise_scale * jnp.ptp(x, axis=tuple(range(1, x.ndim)), keepdims=True)  # [B, 1, ...]

  def gradient_at_sample(index: jax.Array) -> jax.Array:
    noise = jax.random.normal(jax.random.fold_in(key, index), x.shape, jnp.float32)
    noisy = (x + sigma * noise).astype(inputs.dtype)
    return _score_gradients(apply_fn, variables, noisy, targets, use_probabilities)

  return _sum_over_points(gradient_at_sample, num_samples, points_per_call, x.shape) / num_samples


@functools.partial(jax.jit, static_argnums=(0, 7, 8))
def _integrated_gradients_jit(apply_fn, variables, inputs, baseline, targets, alphas, weights,
                              use_probabilities, points_per_call):
  difference = inputs.astype(jnp.float32) - baseline.astype(jnp.float32)

  def weighted_gradient(index: jax.Array) -> jax.Array:
    point = (baseline.astype(jnp.float32) + alphas[index] * difference).astype(inputs.dtype)
    return weights[index] * _score_gradients(apply_fn, variables, point, targets,
                                             use_probabilities)

  attributions = difference * _sum_over_points(weighted_gradient, alphas.shape[0],
                                               points_per_call, inputs.shape)
  gap = (_target_scores(apply_fn, variables, inputs, targets, use_probabilities)
         - _target_scores(apply_fn, variables, baseline, targets, use_probabilities))
  delta = jnp.sum(attributions.reshape(inputs.shape[0], -1), axis=1) - gap
  return attributions, delta


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8, 9))
def _occlusion_jit(apply_fn, variables, inputs, targets, starts, coverage, window, fill,
                   use_probabilities, points_per_call):
  occluded_shape = inputs.shape[1:1 + len(window)]
  trailing = (1,) * (inputs.ndim - 1 - len(window))
  clean_scores = _target_scores(apply_fn, variables, inputs, targets, use_probabilities)

  def spread_drop(index: jax.Array) -> jax.Array:
    inside = jnp.ones(occluded_shape, bool)  # True inside the window that starts at starts[index]
    for axis, size in enumerate(window):
      position = jax.lax.broadcasted_iota(jnp.int32, occluded_shape, axis)
      inside = inside & (position >= starts[index, axis]) & (position < starts[index, axis] + size)
    mask = inside.reshape((1,) + occluded_shape + trailing)
    occluded = jnp.where(mask, jnp.asarray(fill, inputs.dtype), inputs)
    drop = clean_scores - _target_scores(apply_fn, variables, occluded, targets,
                                         use_probabilities)
    return drop.reshape((-1,) + (1,) * (inputs.ndim - 1)) * mask.astype(jnp.float32)

  total = _sum_over_points(spread_drop, starts.shape[0], points_per_call, inputs.shape)
  return total / coverage.reshape((1,) + occluded_shape + trailing)


def _check_call(apply_fn: ApplyFn, variables: Variables, inputs: Any, target_classes: Any,
                what: str, *, needs_gradient: bool, reduce_channels: bool,
                points_per_call: int = 1) -> tuple[jax.Array, jax.Array]:
  """Checks inputs, model output and targets; returns `(inputs, [B] int32 targets)`."""
  _check_positive_int(points_per_call, "points_per_call")
  inputs = jnp.asarray(inputs)
  if inputs.ndim < 2 or inputs.shape[0] == 0:
    raise ValueError(f"{what}: inputs must be a batch [batch, ...] with at least one example and "
                     f"one feature; got shape {inputs.shape}.")
  if needs_gradient and not jnp.issubdtype(inputs.dtype, jnp.floating):
    raise ValueError(
        f"{what}: inputs have dtype {inputs.dtype}, but gradients exist only for floating "
        "inputs. For token ids, attribute to the embeddings (pass embeddings [B, T, D] and an "
        "apply_fn that starts from them, e.g. TransformerLM.logits_from_embeddings), or use "
        "occlusion, which works on token ids.")
  if reduce_channels and inputs.ndim < 3:
    raise ValueError(f"{what}: reduce_channels sums the last axis of [B, H, W, C] images or "
                     f"[B, T, F] sequences; inputs of shape {inputs.shape} have no channel axis.")
  try:
    outputs = jax.eval_shape(functools.partial(apply_fn, train=False), variables, inputs)
  except TypeError as error:
    raise ValueError(f"{what}: apply_fn must be callable as apply_fn(variables, inputs, "
                     f"train=False); calling it failed with: {error}") from error
  found = getattr(outputs, "shape", type(outputs).__name__)
  if not isinstance(found, tuple) or len(found) != 2 or found[0] != inputs.shape[0]:
    raise ValueError(f"{what}: the model must return [batch, num_classes] scores for "
                     f"{inputs.shape[0]} examples; got {found}. For per-position outputs (a "
                     "language model), wrap apply_fn to pick one position.")
  num_classes = found[1]
  targets = target_classes
  if isinstance(targets, (int, np.integer)):
    targets = np.full((inputs.shape[0],), targets, np.int32)
  targets = targets if hasattr(targets, "dtype") else np.asarray(targets)
  if targets.shape != (inputs.shape[0],) or not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"{what}: target_classes must be one int or [batch] = [{inputs.shape[0]}] "
                     f"integer class indices; got shape {targets.shape} and dtype {targets.dtype}.")
  try:
    values = np.asarray(targets)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    values = np.zeros(1, np.int32)  # traced (called under jit): checked by shape only
  if values.min() < 0 or values.max() >= num_classes:
    raise ValueError(f"{what}: target_classes must lie in [0, {num_classes}) for a model with "
                     f"{num_classes} outputs; got values from {values.min()} to {values.max()}.")
  return inputs, jnp.asarray(targets, jnp.int32)


def _check_positive_int(value: Any, name: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")


def _finish(attributions: jax.Array, *, absolute: bool, reduce_channels: bool) -> jax.Array:
  attributions = jnp.abs(attributions) if absolute else attributions
  return jnp.sum(attributions, axis=-1) if reduce_channels else attributions


def _quadrature(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Points in [0, 1] and weights summing to 1 of the quadrature of the path integral."""
  if method == "riemann_trapezoid":
    alphas = np.linspace(0.0, 1.0, steps + 1)
    weights = np.full(steps + 1, 1.0 / steps)
    weights[[0, -1]] = 0.5 / steps
  elif method == "gauss_legendre":
    nodes, node_weights = np.polynomial.legendre.leggauss(steps)
    alphas, weights = (nodes + 1.0) / 2.0, node_weights / 2.0
  else:
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[method]
    alphas = (np.arange(steps) + offset) / steps
    weights = np.full(steps, 1.0 / steps)
  return alphas.astype(np.float32), weights.astype(np.float32)


def _occlusion_windows(window: Any, stride: Any,
                       shape: tuple[int, ...]) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
  """The window as one size per occluded axis, checked against the input shape; the windows'
  `[num_windows, axes]` start positions (a last window flush with the end covers any tail); and
  how many windows cover each position of the occluded axes (>= 1 everywhere)."""

  def sizes(value: Any, count: int, name: str) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
      return (int(value),) * count
    value = tuple(value)
    if not value or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in value):
      raise ValueError(f"{name} must be a positive int or a tuple of them; got {value!r}.")
    return tuple(int(s) for s in value)

  window = sizes(window, 2 if len(shape) == 4 else 1, "window")
  if len(window) > len(shape) - 1:
    raise ValueError(f"window {window} has {len(window)} axes, but inputs of shape {shape} have "
                     f"only {len(shape) - 1} after the batch axis.")
  stride = window if stride is None else sizes(stride, len(window), "stride")
  if len(stride) != len(window):
    raise ValueError(f"stride {stride} must have one entry per window axis, like window {window}.")
  for axis, (size, step, extent) in enumerate(zip(window, stride, shape[1:])):
    if not 1 <= size <= extent:
      raise ValueError(f"window {window}: size {size} on input axis {axis + 1} must be in "
                       f"[1, {extent}] for inputs of shape {shape}.")
    if step < 1:
      raise ValueError(f"stride {stride} must be >= 1 on every axis.")
  extents = shape[1:1 + len(window)]
  per_axis = [sorted({*range(0, extent - size + 1, step), extent - size})
              for extent, size, step in zip(extents, window, stride)]
  starts = np.asarray(list(itertools.product(*per_axis)), np.int32)
  coverage = np.zeros(extents, np.float32)
  for start in starts:
    coverage[tuple(slice(s, s + size) for s, size in zip(start, window))] += 1.0
  return window, starts, coverage
