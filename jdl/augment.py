"""Data augmentation for batches of images (and signals), as jax ops that run on device.

An augmentation spec is a mapping (dict or ConfigDict); every key is optional and off by default:
  `crop_padding` (int p): pad each side by p with `fill`, crop back to `[H, W]` at a random offset.
  `flip` (bool): horizontal flip (the W axis) with probability 1/2.
  `cutout_size` (int): a `size x size` square of `fill` centred at a uniformly drawn pixel, clipped
    at the border; an even size has one more pixel above/left of the centre than below/right.
  `brightness` (float b): adds `delta ~ U[-b, b]` to every value of the example.
  `contrast` (float c in [0, 1]): scales `x - mean` (the example's mean) by `U[1 - c, 1 + c]`.
  `mixup_alpha` (float): `lam ~ Beta(alpha, alpha)` per example, mixed with a random real (mask
    True) partner: `lam * x + (1 - lam) * x[partner]`; the batch gains `mix_label` and `mix_weight`
    (`lam`). Padding rows are their own partner with weight 1.
  `value_range` ((lo, hi), default (0, 1)): brightness/contrast results are clipped to it; the fill
    is 0.0 moved to the nearest bound, so it is always a legal value.

Every example gets its own draws. The order is crop, flip, cutout, contrast + brightness (one step,
`clip((x - mean) * factor + mean + delta, lo, hi)`), mixup. Mixup's result is clamped to
`[min(x, x_partner), max(x, x_partner)]`, which only removes float rounding.

Crop, flip and cutout need images `[B, H, W, C]` and keep any dtype; brightness, contrast and mixup
take any rank >= 2 input of a floating dtype.

`sample_params` draws all random numbers of a batch and `apply_params` is deterministic given them;
`jdl.data.augment_tf` implements the same `apply_params` in TensorFlow, and the same draws give the
same batch. Each draw has its own stream (`PARAM_STREAMS`), so switching one augmentation on or off
does not change the others' draws. This module must not import TensorFlow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Batch = Mapping[str, jax.Array]
Params = dict[str, jax.Array]
AugmentFn = Callable[[jax.Array, Batch], dict[str, jax.Array]]

DEFAULTS: Mapping[str, Any] = {
    "crop_padding": 0,
    "flip": False,
    "cutout_size": 0,
    "brightness": 0.0,
    "contrast": 0.0,
    "mixup_alpha": 0.0,
    "value_range": (0.0, 1.0),
}

# The augmentations that need images `[batch, height, width, channels]`.
IMAGE_KEYS = ("crop_padding", "flip", "cutout_size")

# The random draws of a batch, by name, with the stream index each is drawn from (folded into the
# key or seed). Shared with `jdl.data.augment_tf`, so both samplers return the same keys.
PARAM_STREAMS: Mapping[str, int] = {
    "crop_offset": 0,  # int32 [B, 2]: (dy, dx) in [0, 2 * crop_padding]
    "flip": 1,  # bool [B]: True flips the example
    "cutout_center": 2,  # int32 [B, 2]: (cy, cx) in [0, H) x [0, W)
    "brightness": 3,  # float32 [B]: delta added
    "contrast": 4,  # float32 [B]: factor
    "mix_partner": 5,  # int32 [B]: the row mixed in
    "mix_weight": 6,  # float32 [B]: lam, the weight of the example itself
}


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
  return _is_int(value) or isinstance(value, (float, np.floating))


def _size(spec: Mapping[str, Any], key: str) -> int:
  value = spec[key]
  if not _is_int(value) or value < 0:
    raise ValueError(f"augmentation {key}={value!r} must be an integer >= 0 (0 turns it off).")
  return int(value)


def _amount(spec: Mapping[str, Any], key: str, upper: float = math.inf) -> float:
  value = spec[key]
  if not _is_number(value) or not math.isfinite(value) or not 0 <= value <= upper:
    bound = f"in [0, {upper:g}]" if math.isfinite(upper) else "a finite number >= 0"
    raise ValueError(f"augmentation {key}={value!r} must be {bound} (0 turns it off).")
  return float(value)


def validate_spec(spec: Mapping[str, Any] | None) -> dict[str, Any]:
  """Checks an augmentation spec and returns it as a plain dict with every key filled in.

  The jax and TensorFlow implementations both call this, so a bad spec fails the same way in both.
  A key set to None takes its default.

  Raises:
    ValueError: an unknown key or a bad value.
  """
  if hasattr(spec, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
    spec = spec.to_dict()
  if spec is not None and not isinstance(spec, Mapping):
    raise TypeError("augmentation spec must be a mapping (dict or ConfigDict) or None; "
                    f"got {type(spec).__name__}.")
  raw = dict(spec or {})
  unknown = sorted(str(key) for key in raw if key not in DEFAULTS)
  if unknown:
    raise ValueError(f"unknown augmentation key(s) {unknown}; valid keys are {sorted(DEFAULTS)}.")
  merged = dict(DEFAULTS)
  merged.update({key: value for key, value in raw.items() if value is not None})
  flip = merged["flip"]
  if not isinstance(flip, (bool, np.bool_)):
    raise ValueError(f"augmentation flip={flip!r} must be a bool.")
  value_range = merged["value_range"]
  if (isinstance(value_range, (str, bytes)) or not isinstance(value_range, Sequence)
      or len(value_range) != 2
      or not all(_is_number(v) and math.isfinite(v) for v in value_range)
      or not value_range[0] < value_range[1]):
    raise ValueError(f"augmentation value_range={value_range!r} must be two finite numbers "
                     "(lo, hi) with lo < hi.")
  return {
      "crop_padding": _size(merged, "crop_padding"),
      "flip": bool(flip),
      "cutout_size": _size(merged, "cutout_size"),
      "brightness": _amount(merged, "brightness"),
      "contrast": _amount(merged, "contrast", upper=1.0),
      "mixup_alpha": _amount(merged, "mixup_alpha"),
      "value_range": (float(value_range[0]), float(value_range[1])),
  }


def is_enabled(spec: Mapping[str, Any] | None) -> bool:
  """True when the (validated) spec turns on at least one augmentation."""
  spec = validate_spec(spec)
  return any(spec[key] != DEFAULTS[key] for key in DEFAULTS if key != "value_range")


def param_names(spec: Mapping[str, Any] | None) -> tuple[str, ...]:
  """The names of the random draws that `spec` needs, in `PARAM_STREAMS` order."""
  spec = validate_spec(spec)
  wanted = {
      "crop_offset": spec["crop_padding"] > 0,
      "flip": spec["flip"],
      "cutout_center": spec["cutout_size"] > 0,
      "brightness": spec["brightness"] > 0,
      "contrast": spec["contrast"] > 0,
      "mix_partner": spec["mixup_alpha"] > 0,
      "mix_weight": spec["mixup_alpha"] > 0,
  }
  return tuple(name for name in PARAM_STREAMS if wanted[name])


def fill_value(spec: Mapping[str, Any] | None) -> float:
  """What crop padding and cutout fill with: 0.0, moved to the nearest bound of `value_range`."""
  low, high = validate_spec(spec)["value_range"]
  return min(max(0.0, low), high)


def check_input_shape(shape: Sequence[int | None], spec: Mapping[str, Any] | None) -> None:
  """Raises a ValueError unless a batch of inputs of `shape` can take the augmentations of `spec`.

  `shape` has the batch axis first; unknown sizes (tf.data's dynamic batch axis) may be None.
  """
  spec = validate_spec(spec)
  shape = tuple(shape)
  shown = "[" + ", ".join("?" if size is None else str(size) for size in shape) + "]"
  image_keys = [key for key in IMAGE_KEYS if spec[key]]
  if image_keys and len(shape) != 4:
    raise ValueError(f"augmentation {', '.join(image_keys)} needs image batches of shape "
                     f"[batch, height, width, channels]; got input of shape {shown}.")
  other_keys = [key for key in ("brightness", "contrast", "mixup_alpha") if spec[key]]
  if other_keys and len(shape) < 2:
    raise ValueError(f"augmentation {', '.join(other_keys)} needs inputs of shape [batch, ...] "
                     f"with at least one axis per example; got input of shape {shown}.")
  if any(size is None for size in shape[1:]):
    raise ValueError(f"augmentation needs a static per-example input shape; got {shown}.")
  padding = spec["crop_padding"]
  if padding and padding >= min(shape[1], shape[2]):
    raise ValueError(
        f"augmentation crop_padding={padding} must be smaller than the image height and width "
        f"({shape[1]}, {shape[2]}), so that every crop keeps some of the image.")


def _per_example(values_B: jax.Array, rank: int) -> jax.Array:
  """`[B]` reshaped to `[B, 1, ..., 1]` with `rank` axes, for rank-explicit broadcasting."""
  return jnp.reshape(values_B, values_B.shape + (1,) * (rank - 1))


def _mix_partners(key: jax.Array, real_B: jax.Array) -> jax.Array:
  """A random permutation of the real rows; each padding row maps to itself.

  The k-th real row is paired with the k-th row of the real rows in random order; padding rows
  sort after every real row, by index, in both orders, so they map to themselves.
  """
  batch_size = real_B.shape[0]
  index_B = jnp.arange(batch_size, dtype=jnp.int32)
  after_real_B = 2.0 + index_B.astype(jnp.float32)
  shuffled_B = jnp.argsort(
      jnp.where(real_B, jax.random.uniform(key, (batch_size,)), after_real_B), stable=True)
  in_order_B = jnp.argsort(jnp.where(real_B, 0, 1), stable=True)
  position_B = jnp.argsort(in_order_B, stable=True)  # the inverse permutation of in_order_B
  return shuffled_B[position_B].astype(jnp.int32)


def sample_params(key: jax.Array, batch_size: int, image_shape: Sequence[int],
                  spec: Mapping[str, Any] | None, mask: jax.Array | None = None) -> Params:
  """Draws all the random numbers that augment one batch.

  Args:
    key: a jax PRNG key.
    batch_size: the batch's leading size B.
    image_shape: the per-example input shape, `input.shape[1:]` (e.g. `(H, W, C)`).
    spec: the augmentation spec.
    mask: optional bool `[B]`, True for real examples; mixup pairs real examples only.

  Returns:
    The draws of the enabled augmentations, each with a leading batch axis; see `PARAM_STREAMS`.
  """
  spec = validate_spec(spec)
  image_shape = tuple(image_shape)
  check_input_shape((batch_size, *image_shape), spec)
  names = param_names(spec)

  def stream(name: str) -> jax.Array:
    return jax.random.fold_in(key, PARAM_STREAMS[name])

  params: Params = {}
  if "crop_offset" in names:
    params["crop_offset"] = jax.random.randint(
        stream("crop_offset"), (batch_size, 2), 0, 2 * spec["crop_padding"] + 1, jnp.int32)
  if "flip" in names:
    params["flip"] = jax.random.bernoulli(stream("flip"), 0.5, (batch_size,))
  if "cutout_center" in names:
    row_key, col_key = jax.random.split(stream("cutout_center"))
    height, width = image_shape[:2]
    params["cutout_center"] = jnp.stack(
        [jax.random.randint(row_key, (batch_size,), 0, height, jnp.int32),
         jax.random.randint(col_key, (batch_size,), 0, width, jnp.int32)], axis=1)
  brightness, contrast = spec["brightness"], spec["contrast"]
  for name, low, high in (("brightness", -brightness, brightness),
                          ("contrast", 1.0 - contrast, 1.0 + contrast)):
    if name in names:
      params[name] = jax.random.uniform(stream(name), (batch_size,), jnp.float32, low, high)
  if "mix_partner" in names:
    real_B = jnp.ones((batch_size,), jnp.bool_) if mask is None else jnp.asarray(mask) != 0
    if real_B.shape != (batch_size,):
      raise ValueError(f"mask must have shape [{batch_size}]; got {real_B.shape}.")
    alpha = spec["mixup_alpha"]
    params["mix_partner"] = _mix_partners(stream("mix_partner"), real_B)
    # Beta(a, a) = sigmoid(log G1 - log G2) for G ~ Gamma(a), in log space so that small alphas
    # do not underflow.
    log_gamma_2xB = jax.random.loggamma(stream("mix_weight"), alpha, (2, batch_size), jnp.float32)
    lam_B = jax.nn.sigmoid(log_gamma_2xB[0] - log_gamma_2xB[1])
    params["mix_weight"] = jnp.where(real_B, jnp.clip(lam_B, 0.0, 1.0), 1.0)
  return params


def check_params(params: Mapping[str, Any], spec: Mapping[str, Any] | None) -> None:
  """Raises a ValueError when `params` lacks a draw that `spec` needs."""
  missing = [name for name in param_names(spec) if name not in params]
  if missing:
    raise ValueError(f"augmentation params lack {missing}, which the spec needs; got "
                     f"{sorted(params)}. Draw them with the sampler and the same spec.")


def _crop(images_BxHxWxC: jax.Array, offset_Bx2: jax.Array, padding: int, fill: float) -> jax.Array:
  """Pads by `padding` with `fill` and crops back at `offset`, as one gather (no padded copy)."""
  _, height, width, _ = images_BxHxWxC.shape
  offset_Bx2 = jnp.asarray(offset_Bx2, jnp.int32)
  rows_BxH = offset_Bx2[:, 0:1] - padding + jnp.arange(height, dtype=jnp.int32)[None, :]
  cols_BxW = offset_Bx2[:, 1:2] - padding + jnp.arange(width, dtype=jnp.int32)[None, :]
  inside_BxHxWx1 = (((rows_BxH >= 0) & (rows_BxH < height))[:, :, None, None]
                    & ((cols_BxW >= 0) & (cols_BxW < width))[:, None, :, None])
  cropped = jax.vmap(lambda image, rows, cols: image[rows][:, cols])(
      images_BxHxWxC, jnp.clip(rows_BxH, 0, height - 1), jnp.clip(cols_BxW, 0, width - 1))
  return jnp.where(inside_BxHxWx1, cropped, jnp.asarray(fill, images_BxHxWxC.dtype))


def _cutout(images_BxHxWxC: jax.Array, center_Bx2: jax.Array, size: int, fill: float) -> jax.Array:
  """Fills the `size x size` square at each example's centre, clipped at the border."""
  _, height, width, _ = images_BxHxWxC.shape
  start_Bx2 = jnp.asarray(center_Bx2, jnp.int32) - size // 2
  rows_1xH = jnp.arange(height, dtype=jnp.int32)[None, :]
  cols_1xW = jnp.arange(width, dtype=jnp.int32)[None, :]
  in_rows_BxH = (rows_1xH >= start_Bx2[:, 0:1]) & (rows_1xH < start_Bx2[:, 0:1] + size)
  in_cols_BxW = (cols_1xW >= start_Bx2[:, 1:2]) & (cols_1xW < start_Bx2[:, 1:2] + size)
  square_BxHxWx1 = in_rows_BxH[:, :, None, None] & in_cols_BxW[:, None, :, None]
  return jnp.where(square_BxHxWx1, jnp.asarray(fill, images_BxHxWxC.dtype), images_BxHxWxC)


def _compute_dtype(dtype: Any, what: str) -> Any:
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"augmentation {what} needs floating inputs; got dtype {dtype}.")
  return jnp.promote_types(dtype, jnp.float32)


def apply_params(batch: Batch, params: Mapping[str, jax.Array],
                 spec: Mapping[str, Any] | None) -> dict[str, jax.Array]:
  """Augments a batch with the given draws; deterministic, vectorised and jit-able.

  Args:
    batch: a dict with `input` `[B, ...]`, and `label` `[B, ...]` when mixup is on; other keys
      (`label`, `mask`, ...) pass through unchanged.
    params: the draws from `sample_params` (or `augment_tf.sample_params_tf`) for the same spec.
    spec: the augmentation spec.

  Returns:
    A new batch dict: `input` augmented (same shape and dtype), plus `mix_label` (the partner's
    label) and `mix_weight` (float32 `[B]`, the weight of `label`) when mixup is on.
  """
  spec = validate_spec(spec)
  if "input" not in batch:
    raise ValueError(f"augmentation needs the batch key 'input'; got keys {sorted(batch)}.")
  inputs = jnp.asarray(batch["input"])
  check_input_shape(inputs.shape, spec)
  check_params(params, spec)
  dtype, rank = inputs.dtype, inputs.ndim
  fill = fill_value(spec)
  out = dict(batch)

  if spec["crop_padding"]:
    inputs = _crop(inputs, params["crop_offset"], spec["crop_padding"], fill)
  if spec["flip"]:
    inputs = jnp.where(_per_example(jnp.asarray(params["flip"]), rank), inputs[:, :, ::-1], inputs)
  if spec["cutout_size"]:
    inputs = _cutout(inputs, params["cutout_center"], spec["cutout_size"], fill)

  if spec["brightness"] or spec["contrast"]:
    values = inputs.astype(_compute_dtype(dtype, "brightness/contrast"))
    if spec["contrast"]:
      mean = jnp.mean(values, axis=tuple(range(1, rank)), keepdims=True)
      factor = _per_example(jnp.asarray(params["contrast"], values.dtype), rank)
      values = (values - mean) * factor + mean
    if spec["brightness"]:
      values = values + _per_example(jnp.asarray(params["brightness"], values.dtype), rank)
    low, high = spec["value_range"]
    inputs = jnp.clip(values, low, high).astype(dtype)

  if spec["mixup_alpha"]:
    if "label" not in batch:
      raise ValueError(f"mixup needs the batch key 'label'; got keys {sorted(batch)}.")
    partner_B = jnp.asarray(params["mix_partner"], jnp.int32)
    weight_B = jnp.asarray(params["mix_weight"], jnp.float32)
    values = inputs.astype(_compute_dtype(dtype, "mixup"))
    partners = values[partner_B]
    lam = _per_example(weight_B.astype(values.dtype), rank)
    mixed = lam * values + (1.0 - lam) * partners
    mixed = jnp.clip(mixed, jnp.minimum(values, partners), jnp.maximum(values, partners))
    inputs = mixed.astype(dtype)
    out["mix_label"] = jnp.asarray(batch["label"])[partner_B]
    out["mix_weight"] = weight_B

  out["input"] = inputs
  return out


def make_augment(spec: Mapping[str, Any] | None) -> AugmentFn | None:
  """Returns `augment(key, batch) -> batch` for the spec, or None when it turns nothing on.

  The spec is validated here, when the run is configured, not at the first step. The function is
  pure and jit-able; mixup pairs only rows with `batch["mask"]` True.
  """
  spec = validate_spec(spec)
  if not is_enabled(spec):
    return None

  def augment(key: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    if "input" not in batch:
      raise ValueError(f"augmentation needs the batch key 'input'; got keys {sorted(batch)}.")
    shape = tuple(jnp.shape(batch["input"]))
    params = sample_params(key, shape[0], shape[1:], spec, batch.get("mask"))
    return apply_params(batch, params, spec)

  return augment
