"""Data augmentation as TensorFlow ops, for tf.data pipelines; the twin of `jdl.augment`.

The spec, its validation, the draws' names and the order of the augmentations are those of
`jdl.augment` (see its docstring). `apply_params_tf` computes what `jdl.augment.apply_params`
computes: given the same draws, crop, flip and cutout agree bit for bit, and brightness, contrast
and mixup within float rounding. `sample_params_tf` draws with stateless TF ops: the same semantics
as the jax sampler and deterministic for a seed, but not the same numbers.

Everything works in graph mode, inside `tf.data.Dataset.map`, with a dynamic batch size (the last
batch of a pipeline without `drop_remainder`); the per-example shape must be static. One seed per
batch gives a reproducible stream, e.g.:

  augment = make_tf_augment(spec)
  ds = ds.batch(128).enumerate().map(lambda i, b: augment(b, tf.stack([seed, i])))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jdl import augment as augment_lib
from jdl.lazy_import import tensorflow as tf

TfBatch = Mapping[str, "tf.Tensor"]
TfAugmentFn = Callable[[dict[str, "tf.Tensor"], "tf.Tensor"], dict[str, "tf.Tensor"]]


def _per_example(values_B: tf.Tensor, rank: int) -> tf.Tensor:
  """`[B]` reshaped to `[B, 1, ..., 1]` with `rank` axes."""
  return tf.reshape(values_B, [-1] + [1] * (rank - 1))


def _mix_partners(seed: tf.Tensor, real_B: tf.Tensor) -> tf.Tensor:
  """A random permutation of the real rows; padding rows map to themselves.

  The same construction as `jdl.augment._mix_partners`: row r, the k-th real row by index, is
  paired with the k-th real row of a random order; padding rows sort last, by index, in both.
  """
  batch_size = tf.shape(real_B)[0]
  after_real_B = 2.0 + tf.cast(tf.range(batch_size), tf.float32)
  random_B = tf.random.stateless_uniform([batch_size], seed, dtype=tf.float32)
  shuffled_B = tf.argsort(tf.where(real_B, random_B, after_real_B), stable=True)
  in_order_B = tf.argsort(tf.where(real_B, 0.0, 1.0), stable=True)
  position_B = tf.argsort(in_order_B, stable=True)  # the inverse permutation of in_order_B
  return tf.cast(tf.gather(shuffled_B, position_B), tf.int32)


def _beta(seed: tf.Tensor, alpha: float, batch_size: Any) -> tf.Tensor:
  """`Beta(alpha, alpha)` as `G1 / (G1 + G2)` with `G ~ Gamma(alpha)`, computed in log space.

  A Gamma(alpha) draw for small alpha underflows float32 (both gammas can be 0, giving 0 / 0).
  `G = G' * U ** (1 / alpha)` with `G' ~ Gamma(alpha + 1)`, `U ~ U(0, 1]` has the same law, and its
  log never underflows; the ratio is then `sigmoid(log G1 - log G2)`.
  """
  seeds = tf.random.experimental.stateless_split(seed, 4)
  log_gammas = []
  tiny = tf.constant(1e-30, tf.float32)
  for index in range(2):
    gamma = tf.random.stateless_gamma([batch_size], seeds[2 * index], alpha + 1.0, dtype=tf.float32)
    uniform = 1.0 - tf.random.stateless_uniform([batch_size], seeds[2 * index + 1])  # in (0, 1]
    log_gammas.append(tf.math.log(tf.maximum(gamma, tiny)) + tf.math.log(uniform) / alpha)
  return tf.clip_by_value(tf.sigmoid(log_gammas[0] - log_gammas[1]), 0.0, 1.0)


def sample_params_tf(seed: tf.Tensor, batch_size: int | tf.Tensor, image_shape: Sequence[int],
                     spec: Mapping[str, Any] | None,
                     mask: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
  """Draws all the random numbers that augment one batch, with stateless TF ops.

  The arguments and the result are those of `jdl.augment.sample_params` (the same keys, dtypes and
  shapes), but for `seed`, int32/int64 `[2]` as for `tf.random.stateless_uniform`, in place of the
  key, and `batch_size`, which may be a scalar tensor; `image_shape` must be static.
  """
  spec = augment_lib.validate_spec(spec)
  image_shape = tuple(image_shape)
  static_batch = batch_size if isinstance(batch_size, int) else None
  augment_lib.check_input_shape((static_batch, *image_shape), spec)
  names = augment_lib.param_names(spec)
  seed = tf.convert_to_tensor(seed)

  def stream(name: str) -> tf.Tensor:
    index = tf.constant(augment_lib.PARAM_STREAMS[name], tf.int32)
    return tf.random.experimental.stateless_fold_in(seed, index)

  params: dict[str, tf.Tensor] = {}
  if "crop_offset" in names:
    params["crop_offset"] = tf.random.stateless_uniform(
        [batch_size, 2], stream("crop_offset"), 0, 2 * spec["crop_padding"] + 1, tf.int32)
  if "flip" in names:
    params["flip"] = tf.random.stateless_uniform([batch_size], stream("flip")) < 0.5
  if "cutout_center" in names:
    row_seed, col_seed = tf.unstack(tf.random.experimental.stateless_split(stream("cutout_center")))
    height, width = image_shape[:2]
    params["cutout_center"] = tf.stack(
        [tf.random.stateless_uniform([batch_size], row_seed, 0, height, tf.int32),
         tf.random.stateless_uniform([batch_size], col_seed, 0, width, tf.int32)], axis=1)
  brightness, contrast = spec["brightness"], spec["contrast"]
  for name, low, high in (("brightness", -brightness, brightness),
                          ("contrast", 1.0 - contrast, 1.0 + contrast)):
    if name in names:
      params[name] = tf.random.stateless_uniform([batch_size], stream(name), low, high, tf.float32)
  if "mix_partner" in names:
    real_B = tf.ones([batch_size], tf.bool) if mask is None else tf.cast(mask, tf.bool)
    params["mix_partner"] = _mix_partners(stream("mix_partner"), real_B)
    lam_B = _beta(stream("mix_weight"), spec["mixup_alpha"], batch_size)
    params["mix_weight"] = tf.where(real_B, lam_B, 1.0)
  return params


def _crop(images_BxHxWxC: tf.Tensor, offset_Bx2: tf.Tensor, padding: int,
          fill: tf.Tensor) -> tf.Tensor:
  """Pads by `padding` with `fill` and crops back at `offset`, as two batched gathers."""
  height, width = images_BxHxWxC.shape[1], images_BxHxWxC.shape[2]
  offset_Bx2 = tf.cast(offset_Bx2, tf.int32)
  rows_BxH = offset_Bx2[:, 0:1] - padding + tf.range(height)[None, :]
  cols_BxW = offset_Bx2[:, 1:2] - padding + tf.range(width)[None, :]
  inside_BxHxWx1 = tf.logical_and(((rows_BxH >= 0) & (rows_BxH < height))[:, :, None, None],
                                  ((cols_BxW >= 0) & (cols_BxW < width))[:, None, :, None])
  cropped = tf.gather(images_BxHxWxC, tf.clip_by_value(rows_BxH, 0, height - 1), axis=1,
                      batch_dims=1)
  cropped = tf.gather(cropped, tf.clip_by_value(cols_BxW, 0, width - 1), axis=2, batch_dims=1)
  return tf.where(inside_BxHxWx1, cropped, fill)


def _cutout(images_BxHxWxC: tf.Tensor, center_Bx2: tf.Tensor, size: int,
            fill: tf.Tensor) -> tf.Tensor:
  """Fills the `size x size` square at each example's centre, clipped at the border."""
  height, width = images_BxHxWxC.shape[1], images_BxHxWxC.shape[2]
  start_Bx2 = tf.cast(center_Bx2, tf.int32) - size // 2
  rows_1xH = tf.range(height)[None, :]
  cols_1xW = tf.range(width)[None, :]
  in_rows_BxH = (rows_1xH >= start_Bx2[:, 0:1]) & (rows_1xH < start_Bx2[:, 0:1] + size)
  in_cols_BxW = (cols_1xW >= start_Bx2[:, 1:2]) & (cols_1xW < start_Bx2[:, 1:2] + size)
  square_BxHxWx1 = in_rows_BxH[:, :, None, None] & in_cols_BxW[:, None, :, None]
  return tf.where(square_BxHxWx1, fill, images_BxHxWxC)


def _compute_dtype(dtype: tf.DType, what: str) -> tf.DType:
  if not dtype.is_floating:
    raise ValueError(f"augmentation {what} needs floating inputs; got dtype {dtype.name}.")
  return tf.float64 if dtype == tf.float64 else tf.float32


def apply_params_tf(batch: TfBatch, params: Mapping[str, tf.Tensor],
                    spec: Mapping[str, Any] | None) -> dict[str, tf.Tensor]:
  """Augments a batch with the given draws; `jdl.augment.apply_params` in TensorFlow ops.

  Same arguments and result as the jax version: `input` replaced, `mix_label` and `mix_weight`
  added when mixup is on, other keys passed through.
  """
  spec = augment_lib.validate_spec(spec)
  if "input" not in batch:
    raise ValueError(f"augmentation needs the batch key 'input'; got keys {sorted(batch)}.")
  inputs = tf.convert_to_tensor(batch["input"])
  if inputs.shape.rank is None:
    raise ValueError("augmentation needs inputs of known rank; got a tensor of unknown shape.")
  augment_lib.check_input_shape(inputs.shape.as_list(), spec)
  augment_lib.check_params(params, spec)
  dtype, rank = inputs.dtype, inputs.shape.rank
  fill = tf.constant(augment_lib.fill_value(spec), dtype)
  out = dict(batch)

  if spec["crop_padding"]:
    inputs = _crop(inputs, params["crop_offset"], spec["crop_padding"], fill)
  if spec["flip"]:
    flip = _per_example(tf.cast(params["flip"], tf.bool), rank)
    inputs = tf.where(flip, tf.reverse(inputs, axis=[2]), inputs)
  if spec["cutout_size"]:
    inputs = _cutout(inputs, params["cutout_center"], spec["cutout_size"], fill)

  if spec["brightness"] or spec["contrast"]:
    values = tf.cast(inputs, _compute_dtype(dtype, "brightness/contrast"))
    if spec["contrast"]:
      mean = tf.reduce_mean(values, axis=list(range(1, rank)), keepdims=True)
      factor = _per_example(tf.cast(params["contrast"], values.dtype), rank)
      values = (values - mean) * factor + mean
    if spec["brightness"]:
      values = values + _per_example(tf.cast(params["brightness"], values.dtype), rank)
    low, high = spec["value_range"]
    inputs = tf.cast(tf.clip_by_value(values, low, high), dtype)

  if spec["mixup_alpha"]:
    if "label" not in batch:
      raise ValueError(f"mixup needs the batch key 'label'; got keys {sorted(batch)}.")
    partner_B = tf.cast(params["mix_partner"], tf.int32)
    weight_B = tf.cast(params["mix_weight"], tf.float32)
    values = tf.cast(inputs, _compute_dtype(dtype, "mixup"))
    partners = tf.gather(values, partner_B)
    lam = _per_example(tf.cast(weight_B, values.dtype), rank)
    mixed = lam * values + (1.0 - lam) * partners
    mixed = tf.clip_by_value(mixed, tf.minimum(values, partners), tf.maximum(values, partners))
    inputs = tf.cast(mixed, dtype)
    out["mix_label"] = tf.gather(tf.convert_to_tensor(batch["label"]), partner_B)
    out["mix_weight"] = weight_B

  out["input"] = inputs
  return out


def make_tf_augment(spec: Mapping[str, Any] | None) -> TfAugmentFn | None:
  """Returns `augment(batch, seed) -> batch` for a batched tf.data pipeline, or None when off.

  `batch` is a dict with `input` `[B, ...]` (static per-example shape, B may be dynamic), `label`
  and optionally `mask`; `seed` is an int `[2]` tensor, one per batch. The spec is validated here.
  """
  spec = augment_lib.validate_spec(spec)
  if not augment_lib.is_enabled(spec):
    return None

  def augment(batch: dict[str, tf.Tensor], seed: tf.Tensor) -> dict[str, tf.Tensor]:
    if "input" not in batch:
      raise ValueError(f"augmentation needs the batch key 'input'; got keys {sorted(batch)}.")
    inputs = tf.convert_to_tensor(batch["input"])
    if inputs.shape.rank is None:
      raise ValueError("augmentation needs inputs of known rank; got a tensor of unknown shape.")
    shape = inputs.shape.as_list()
    batch_size = shape[0] if shape[0] is not None else tf.shape(inputs)[0]
    params = sample_params_tf(seed, batch_size, shape[1:], spec, batch.get("mask"))
    return apply_params_tf(batch, params, spec)

  return augment
