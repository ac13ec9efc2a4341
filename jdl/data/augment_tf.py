"""Data augmentation as TensorFlow ops, for tf.data pipelines: `jdl.augment` in TF.

Given the same draws, crop, flip and cutout agree with jax bit for bit, the others within float
rounding; `sample_params_tf`'s stateless draws are deterministic for a seed, but not the jax
sampler's. Everything works in graph mode inside `tf.data.Dataset.map`, with a dynamic batch size
(the per-example shape must be static). One seed per batch gives a reproducible stream, e.g.:

  augment = make_tf_augment(spec)
  ds = ds.batch(128).enumerate().map(lambda i, b: augment(b, tf.stack([seed, i])))
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jdl import augment as augment_lib
from jdl.data import loading
from jdl.lazy_import import tensorflow as tf

TfAugmentFn = Callable[[dict[str, "tf.Tensor"], "tf.Tensor"], dict[str, "tf.Tensor"]]


def _beta(seed: tf.Tensor, alpha: float, batch_size: Any) -> tf.Tensor:
  """`Beta(alpha, alpha)` as `G1 / (G1 + G2)`, `G ~ Gamma(alpha)`, in log space: for small alpha a
  Gamma draw underflows float32 (0 / 0), but `G = G' * U ** (1 / alpha)` with `G' ~ Gamma(alpha +
  1)`, `U ~ U(0, 1]` has the same law and a log that never does: `sigmoid(log G1 - log G2)`."""
  seeds = tf.random.experimental.stateless_split(seed, 4)
  log_gammas = []
  for index in range(2):
    gamma = tf.random.stateless_gamma([batch_size], seeds[2 * index], alpha + 1.0, dtype=tf.float32)
    uniform = 1.0 - tf.random.stateless_uniform([batch_size], seeds[2 * index + 1])  # in (0, 1]
    log_gammas.append(tf.math.log(tf.maximum(gamma, 1e-30)) + tf.math.log(uniform) / alpha)
  return tf.sigmoid(log_gammas[0] - log_gammas[1])


@functools.cache
def _ops() -> augment_lib.ArrayOps:
  """`jdl.augment.ArrayOps` in TensorFlow, made on first use (so importing this imports no TF)."""
  stateless_uniform = tf.random.stateless_uniform
  return augment_lib.ArrayOps(
      xp=tf, asarray=tf.convert_to_tensor, cast=tf.cast, arange=tf.range, clip=tf.clip_by_value,
      mean=lambda x, axes: tf.reduce_mean(x, axis=axes, keepdims=True), gather=tf.gather,
      is_floating=lambda dtype: dtype.is_floating,
      fold_in=tf.random.experimental.stateless_fold_in,
      split=lambda seed: tf.unstack(tf.random.experimental.stateless_split(seed)),
      randint=lambda seed, shape, low, high: stateless_uniform(shape, seed, low, high, tf.int32),
      uniform=lambda seed, shape, low, high: stateless_uniform(shape, seed, low, high, tf.float32),
      beta=_beta)


def sample_params_tf(seed: tf.Tensor, batch_size: int | tf.Tensor, image_shape: Sequence[int],
                     spec: Mapping[str, Any] | None,
                     mask: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
  """`jdl.augment.sample_params` with stateless TF ops (the same keys, dtypes and shapes) from an
  int32/int64 `[2]` seed, as `tf.random.stateless_uniform` takes."""
  return augment_lib.sample_params(tf.convert_to_tensor(seed), batch_size, image_shape, spec,
                                   mask, ops=_ops())


def apply_params_tf(batch: Mapping[str, tf.Tensor], params: Mapping[str, tf.Tensor],
                    spec: Mapping[str, Any] | None) -> dict[str, tf.Tensor]:
  """`jdl.augment.apply_params` in TensorFlow ops: the same arguments and result."""
  return augment_lib.apply_params(batch, params, spec, ops=_ops())


def make_tf_augment(spec: Mapping[str, Any] | None) -> TfAugmentFn | None:
  """`augment(batch, seed) -> batch` for a batched tf.data pipeline (a seed `[2]` per batch), or
  None when the spec (validated here) turns nothing on. The augmentations work on [0, 1] floats,
  so uint8 pixels are scaled first, on the host (`jdl.data.scale_inputs`: the bits of the step's
  `jdl.tasks.scale_pixels`, which passes floats on as they are)."""
  if not augment_lib.is_enabled(spec):  # validates the spec without importing TensorFlow
    return None
  augment = augment_lib.make_augment(spec, ops=_ops())

  def augment_batch(batch: dict[str, tf.Tensor], seed: tf.Tensor) -> dict[str, tf.Tensor]:
    if "input" in batch and tf.as_dtype(batch["input"].dtype) == tf.uint8:
      batch = {**batch, "input": loading.scale_inputs(tf.convert_to_tensor(batch["input"]))}
    return augment(tf.convert_to_tensor(seed), batch)

  return augment_batch
