"""Data augmentation for batches of images (and signals): one description, jax and TF backends.

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
`clip((x - mean) * factor + mean + delta, lo, hi)`), mixup (clamped to `[min(x, x_partner),
max(x, x_partner)]`, which only removes float rounding). Crop, flip and cutout need images
`[B, H, W, C]` of any dtype; the others floating inputs of any rank >= 2.

`sample_params` draws a batch's random numbers, each from its own stream (`PARAM_STREAMS`: turning
one augmentation on leaves the others' draws as they were); `apply_params` is deterministic given
them. Both are written against `ArrayOps`: jax (`JAX_OPS`) here, TensorFlow in
`jdl.data.augment_tf` (this module must not import TensorFlow).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Batch = Mapping[str, jax.Array]
Params = dict[str, jax.Array]
AugmentFn = Callable[[jax.Array, Batch], dict[str, jax.Array]]

DEFAULTS: Mapping[str, Any] = {
    "crop_padding": 0, "flip": False, "cutout_size": 0, "brightness": 0.0, "contrast": 0.0,
    "mixup_alpha": 0.0, "value_range": (0.0, 1.0),
}

# The random draws of a batch, by name, and the stream each is drawn from (folded into the key).
PARAM_STREAMS: Mapping[str, int] = {
    "crop_offset": 0,  # int32 [B, 2]: (dy, dx) in [0, 2 * crop_padding]
    "flip": 1,  # bool [B]: True flips the example
    "cutout_center": 2,  # int32 [B, 2]: (cy, cx) in [0, H) x [0, W)
    "brightness": 3,  # float32 [B]: delta added
    "contrast": 4,  # float32 [B]: factor
    "mix_partner": 5,  # int32 [B]: the row mixed in
    "mix_weight": 6,  # float32 [B]: lam, the weight of the example itself
}


class ArrayOps(NamedTuple):
  """The array operations the augmentations are written in: one instance per array library.

  `xp` is the module whose `where`, `reshape`, `argsort(stable=True)`, `stack`, `minimum`,
  `maximum`, `ones` and `shape` the code calls as they are (jax.numpy or tensorflow). `key` is a
  jax PRNG key or a TF stateless seed; draws are int32 (`randint`, `[low, high)`) or float32."""

  xp: Any
  asarray: Callable[[Any], Any]
  cast: Callable[[Any, Any], Any]  # (x, dtype)
  arange: Callable[[Any], Any]  # (n): int32 [n]
  clip: Callable[[Any, Any, Any], Any]
  mean: Callable[[Any, tuple[int, ...]], Any]  # (x, axes), keeping the axes
  gather: Callable[..., Any]  # (x, indices, axis=0, batch_dims=0) as `tf.gather`
  is_floating: Callable[[Any], bool]  # (dtype)
  fold_in: Callable[[Any, int], Any]  # (key, stream)
  split: Callable[[Any], tuple[Any, Any]]  # (key): two new keys
  randint: Callable[[Any, list, int, int], Any]  # (key, shape, low, high)
  uniform: Callable[[Any, list, float, float], Any]  # (key, shape, low, high)
  beta: Callable[[Any, float, Any], Any]  # (key, alpha, batch_size): Beta(alpha, alpha) [B]


def _jax_gather(x: jax.Array, indices: jax.Array, axis: int = 0, batch_dims: int = 0) -> jax.Array:
  """`tf.gather` in jax, for `batch_dims` 0 or 1 (the indices are in range)."""
  take = functools.partial(jnp.take, axis=axis - batch_dims, mode="clip")
  return jax.vmap(take)(x, indices) if batch_dims else take(x, indices)


def _jax_beta(key: jax.Array, alpha: float, batch_size: int) -> jax.Array:
  # Beta(a, a) = sigmoid(log G1 - log G2), G ~ Gamma(a): in log space, small alphas don't underflow.
  log_gamma_2xB = jax.random.loggamma(key, alpha, (2, batch_size), jnp.float32)
  return jax.nn.sigmoid(log_gamma_2xB[0] - log_gamma_2xB[1])


JAX_OPS = ArrayOps(
    xp=jnp, asarray=jnp.asarray, cast=lambda x, dtype: jnp.asarray(x, dtype),
    arange=lambda n: jnp.arange(n, dtype=jnp.int32), clip=jnp.clip,
    mean=lambda x, axes: jnp.mean(x, axis=axes, keepdims=True), gather=_jax_gather,
    is_floating=lambda dtype: jnp.issubdtype(dtype, jnp.floating),
    fold_in=jax.random.fold_in, split=jax.random.split,
    randint=lambda key, shape, low, high: jax.random.randint(key, shape, low, high, jnp.int32),
    uniform=lambda key, shape, low, high: jax.random.uniform(key, shape, jnp.float32, low, high),
    beta=_jax_beta)


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
  """The spec, checked, as a plain dict with every key filled in (a key set to None: default)."""
  if hasattr(spec, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
    spec = spec.to_dict()
  if spec is not None and not isinstance(spec, Mapping):
    raise TypeError("augmentation spec must be a mapping (dict or ConfigDict) or None; "
                    f"got {type(spec).__name__}.")
  raw = dict(spec or {})
  if unknown := sorted(str(key) for key in raw if key not in DEFAULTS):
    raise ValueError(f"unknown augmentation key(s) {unknown}; valid keys are {sorted(DEFAULTS)}.")
  merged = {**DEFAULTS, **{key: value for key, value in raw.items() if value is not None}}
  flip = merged["flip"]
  if not isinstance(flip, (bool, np.bool_)):
    raise ValueError(f"augmentation flip={flip!r} must be a bool.")
  value_range = merged["value_range"]
  if (isinstance(value_range, (str, bytes)) or not isinstance(value_range, Sequence)
      or len(value_range) != 2 or not all(_is_number(v) and math.isfinite(v) for v in value_range)
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
  needed_by = {"crop_offset": "crop_padding", "cutout_center": "cutout_size",
               "mix_partner": "mixup_alpha", "mix_weight": "mixup_alpha"}  # else the same name
  return tuple(name for name in PARAM_STREAMS if spec[needed_by.get(name, name)])


def fill_value(spec: Mapping[str, Any] | None) -> float:
  """What crop padding and cutout fill with: 0.0, moved to the nearest bound of `value_range`."""
  low, high = validate_spec(spec)["value_range"]
  return min(max(0.0, low), high)


def check_input_shape(shape: Sequence[int | None], spec: Mapping[str, Any] | None) -> None:
  """Raises a ValueError unless a batch of inputs of `shape` (batch axis first, unknown sizes such
  as tf.data's dynamic batch None) can take the augmentations of `spec`."""
  spec = validate_spec(spec)
  shape = tuple(shape)
  shown = "[" + ", ".join("?" if size is None else str(size) for size in shape) + "]"
  image_keys = [key for key in ("crop_padding", "flip", "cutout_size") if spec[key]]
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


def _mix_partners(ops: ArrayOps, key: Any, real_B: Any, batch_size: Any) -> Any:
  """A random permutation of the real rows: the k-th real row is paired with the k-th of the real
  rows in random order. Padding rows sort after them, by index, in both orders: they map to
  themselves."""
  xp = ops.xp
  after_real_B = 2.0 + ops.cast(ops.arange(batch_size), np.float32)
  random_B = ops.uniform(key, [batch_size], 0.0, 1.0)
  shuffled_B = xp.argsort(xp.where(real_B, random_B, after_real_B), stable=True)
  in_order_B = xp.argsort(xp.where(real_B, 0, 1), stable=True)
  position_B = xp.argsort(in_order_B, stable=True)  # the inverse permutation of in_order_B
  return ops.cast(ops.gather(shuffled_B, position_B), np.int32)


def sample_params(key: jax.Array, batch_size: int, image_shape: Sequence[int],
                  spec: Mapping[str, Any] | None, mask: jax.Array | None = None, *,
                  ops: ArrayOps = JAX_OPS) -> Params:
  """Draws all the random numbers that augment one batch (`PARAM_STREAMS`, each `[B, ...]`), from
  a PRNG key of `ops`' library. `batch_size` may be dynamic (a scalar tensor in TF);
  `image_shape`, `input.shape[1:]`, is static. Mixup pairs only `mask`'s True rows (None: all)."""
  spec = validate_spec(spec)
  image_shape = tuple(image_shape)
  static_batch = batch_size if _is_int(batch_size) else None
  check_input_shape((static_batch, *image_shape), spec)
  names = param_names(spec)
  stream = {name: ops.fold_in(key, PARAM_STREAMS[name]) for name in names}
  params: dict[str, Any] = {}
  if "crop_offset" in names:
    params["crop_offset"] = ops.randint(
        stream["crop_offset"], [batch_size, 2], 0, 2 * spec["crop_padding"] + 1)
  if "flip" in names:
    params["flip"] = ops.uniform(stream["flip"], [batch_size], 0.0, 1.0) < 0.5
  if "cutout_center" in names:
    row_key, col_key = ops.split(stream["cutout_center"])
    height, width = image_shape[:2]
    params["cutout_center"] = ops.xp.stack([ops.randint(row_key, [batch_size], 0, height),
                                            ops.randint(col_key, [batch_size], 0, width)], axis=1)
  for name, low, high in (("brightness", -spec["brightness"], spec["brightness"]),
                          ("contrast", 1.0 - spec["contrast"], 1.0 + spec["contrast"])):
    if name in names:
      params[name] = ops.uniform(stream[name], [batch_size], low, high)
  if "mix_partner" in names:
    real_B = ops.xp.ones([batch_size], np.bool_) if mask is None else ops.cast(mask, np.bool_)
    if tuple(real_B.shape) != (static_batch,):
      raise ValueError(f"mask must have shape [{batch_size}]; got {tuple(real_B.shape)}.")
    params["mix_partner"] = _mix_partners(ops, stream["mix_partner"], real_B, batch_size)
    lam_B = ops.clip(ops.beta(stream["mix_weight"], spec["mixup_alpha"], batch_size), 0.0, 1.0)
    params["mix_weight"] = ops.xp.where(real_B, lam_B, 1.0)
  return params


def _crop(ops: ArrayOps, images_BxHxWxC: Any, offset_Bx2: Any, padding: int, fill: Any) -> Any:
  """Pads by `padding` with `fill` and crops back at `offset`, as two batched gathers."""
  height, width = images_BxHxWxC.shape[1:3]
  rows_BxH = offset_Bx2[:, 0:1] - padding + ops.arange(height)[None, :]
  cols_BxW = offset_Bx2[:, 1:2] - padding + ops.arange(width)[None, :]
  inside_BxHxWx1 = (((rows_BxH >= 0) & (rows_BxH < height))[:, :, None, None]
                    & ((cols_BxW >= 0) & (cols_BxW < width))[:, None, :, None])
  cropped = ops.gather(images_BxHxWxC, ops.clip(rows_BxH, 0, height - 1), axis=1, batch_dims=1)
  cropped = ops.gather(cropped, ops.clip(cols_BxW, 0, width - 1), axis=2, batch_dims=1)
  return ops.xp.where(inside_BxHxWx1, cropped, fill)


def _cutout(ops: ArrayOps, images_BxHxWxC: Any, center_Bx2: Any, size: int, fill: Any) -> Any:
  """Fills the `size x size` square at each example's centre, clipped at the border."""
  height, width = images_BxHxWxC.shape[1:3]
  rows_BxH = ops.arange(height)[None, :] - (center_Bx2[:, 0:1] - size // 2)  # from its top row
  cols_BxW = ops.arange(width)[None, :] - (center_Bx2[:, 1:2] - size // 2)
  square_BxHxWx1 = (((rows_BxH >= 0) & (rows_BxH < size))[:, :, None, None]
                    & ((cols_BxW >= 0) & (cols_BxW < size))[:, None, :, None])
  return ops.xp.where(square_BxHxWx1, fill, images_BxHxWxC)


def _inputs(ops: ArrayOps, batch: Mapping[str, Any]) -> tuple[Any, tuple[int | None, ...]]:
  """The batch's `input` as an array, and its static shape."""
  if "input" not in batch:
    raise ValueError(f"augmentation needs the batch key 'input'; got keys {sorted(batch)}.")
  inputs = ops.asarray(batch["input"])
  try:
    return inputs, tuple(inputs.shape)
  except ValueError:  # a TF tensor of unknown rank
    raise ValueError("augmentation needs inputs of known rank; got a tensor of unknown "
                     "shape.") from None


def _compute_dtype(ops: ArrayOps, dtype: Any, what: str) -> Any:
  if not ops.is_floating(dtype):
    raise ValueError(f"augmentation {what} needs floating inputs; got dtype {dtype.name}.")
  return np.float64 if dtype == np.float64 else np.float32


def apply_params(batch: Batch, params: Mapping[str, jax.Array], spec: Mapping[str, Any] | None,
                 *, ops: ArrayOps = JAX_OPS) -> dict[str, jax.Array]:
  """Augments a batch with the given draws; deterministic, vectorised and jit-able. Its `input`
  `[B, ...]` is augmented (same shape and dtype) and the other keys pass through; with mixup,
  `label` is needed, and `mix_label` (the partner's label) and `mix_weight` (float32 `[B]`, the
  weight of `label`) are added."""
  spec = validate_spec(spec)
  inputs, shape = _inputs(ops, batch)
  check_input_shape(shape, spec)
  if missing := [name for name in param_names(spec) if name not in params]:
    raise ValueError(f"augmentation params lack {missing}, which the spec needs; got "
                     f"{sorted(params)}. Draw them with the sampler and the same spec.")
  dtype, rank = inputs.dtype, len(shape)
  fill = ops.cast(np.float64(fill_value(spec)), dtype)  # float64: exact for float64 inputs
  out = dict(batch)

  def per_example(name: str, dtype: Any) -> Any:  # draw `name` [B] as [B, 1, ..., 1]
    return ops.xp.reshape(ops.cast(params[name], dtype), [-1] + [1] * (rank - 1))

  if spec["crop_padding"]:
    offset_Bx2 = ops.cast(params["crop_offset"], np.int32)
    inputs = _crop(ops, inputs, offset_Bx2, spec["crop_padding"], fill)
  if spec["flip"]:
    inputs = ops.xp.where(per_example("flip", np.bool_), inputs[:, :, ::-1], inputs)
  if spec["cutout_size"]:
    center_Bx2 = ops.cast(params["cutout_center"], np.int32)
    inputs = _cutout(ops, inputs, center_Bx2, spec["cutout_size"], fill)

  if spec["brightness"] or spec["contrast"]:
    values = ops.cast(inputs, _compute_dtype(ops, dtype, "brightness/contrast"))
    if spec["contrast"]:
      mean = ops.mean(values, tuple(range(1, rank)))
      values = (values - mean) * per_example("contrast", values.dtype) + mean
    if spec["brightness"]:
      values = values + per_example("brightness", values.dtype)
    low, high = spec["value_range"]
    inputs = ops.cast(ops.clip(values, low, high), dtype)

  if spec["mixup_alpha"]:
    if "label" not in batch:
      raise ValueError(f"mixup needs the batch key 'label'; got keys {sorted(batch)}.")
    partner_B = ops.cast(params["mix_partner"], np.int32)
    values = ops.cast(inputs, _compute_dtype(ops, dtype, "mixup"))
    partners = ops.gather(values, partner_B)
    lam = per_example("mix_weight", values.dtype)
    mixed = lam * values + (1.0 - lam) * partners
    mixed = ops.clip(mixed, ops.xp.minimum(values, partners), ops.xp.maximum(values, partners))
    inputs = ops.cast(mixed, dtype)
    out["mix_label"] = ops.gather(ops.asarray(batch["label"]), partner_B)
    out["mix_weight"] = ops.cast(params["mix_weight"], np.float32)

  out["input"] = inputs
  return out


def make_augment(spec: Mapping[str, Any] | None, *, ops: ArrayOps = JAX_OPS) -> AugmentFn | None:
  """Returns a pure, jit-able `augment(key, batch) -> batch` for the spec (validated now, not at
  the first step), or None when it turns nothing on; mixup pairs only `batch["mask"]`'s rows."""
  spec = validate_spec(spec)
  if not is_enabled(spec):
    return None

  def augment(key: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    inputs, shape = _inputs(ops, batch)
    batch_size = shape[0] if shape[0] is not None else ops.xp.shape(inputs)[0]
    params = sample_params(key, batch_size, shape[1:], spec, batch.get("mask"), ops=ops)
    return apply_params(batch, params, spec, ops=ops)

  return augment
