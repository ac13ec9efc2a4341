"""Tests of jdl.augment (jax, on device) and jdl.data.augment_tf (tf.data), and their agreement."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from jdl import augment
from jdl.data import augment_tf

SHAPE = (8, 8, 8, 3)
ALL = {
    "crop_padding": 2,
    "flip": True,
    "cutout_size": 3,
    "brightness": 0.3,
    "contrast": 0.4,
    "mixup_alpha": 0.4,
}
SPECS = {
    "crop": {"crop_padding": 2},
    "flip": {"flip": True},
    "cutout": {"cutout_size": 3},
    "brightness": {"brightness": 0.3},
    "contrast": {"contrast": 0.5},
    "mixup": {"mixup_alpha": 0.4},
    "all": ALL,
}
# Augmentations whose jax and TF results must agree bit for bit.
EXACT = ("crop", "flip", "cutout")

# ---------------------------------------------------------------------------------------------
# Helpers.


def make_batch(seed=0, shape=SHAPE, num_real=None, low=0.0, high=1.0):
  """A float32 batch with int32 labels; rows from `num_real` on are zero padding (mask False)."""
  rng = np.random.default_rng(seed)
  inputs = rng.uniform(low, high, shape).astype(np.float32)
  labels = rng.integers(0, 10, shape[0]).astype(np.int32)
  mask = np.ones(shape[0], np.bool_)
  if num_real is not None:
    mask[num_real:] = False
    inputs[num_real:] = 0.0
    labels[num_real:] = 0
  return {"input": inputs, "label": labels, "mask": mask}


def numpy_dict(tree):
  return {key: np.asarray(value) for key, value in tree.items()}


def to_tf(tree):
  return {key: tf.constant(np.asarray(value)) for key, value in tree.items()}


def sample(kind, seed, batch, spec):
  """The draws of one of the two samplers, as numpy arrays."""
  inputs = batch["input"]
  if kind == "jax":
    params = augment.sample_params(
        jax.random.key(seed), inputs.shape[0], inputs.shape[1:], spec, batch.get("mask")
    )
  else:
    mask = None if batch.get("mask") is None else tf.constant(batch["mask"])
    params = augment_tf.sample_params_tf(
        tf.constant([seed, 7], tf.int64), inputs.shape[0], inputs.shape[1:], spec, mask
    )
  return numpy_dict(params)


def apply_jax(batch, params, spec):
  return numpy_dict(augment.apply_params(batch, params, spec))


# ---------------------------------------------------------------------------------------------
# The spec.


def test_validate_spec_fills_defaults_and_accepts_configdict():
  assert augment.validate_spec({}) == augment.validate_spec(None) == dict(augment.DEFAULTS)
  config = ml_collections.ConfigDict({"flip": True, "crop_padding": 4, "value_range": (-1, 1)})
  spec = augment.validate_spec(config)
  assert spec["flip"] is True and spec["crop_padding"] == 4
  assert spec["value_range"] == (-1.0, 1.0) and spec["brightness"] == 0.0
  assert augment.is_enabled(config)
  assert not augment.is_enabled({"value_range": (0, 255)})
  assert augment.make_augment({}) is None
  assert augment_tf.make_tf_augment({"brightness": 0.0}) is None
  assert callable(augment.make_augment({"flip": True}))
  assert callable(augment_tf.make_tf_augment({"flip": True}))


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"crop_pading": 4}, r"unknown augmentation key.*crop_pading.*valid keys are.*crop_padd"),
        ({"crop_padding": -1}, r"crop_padding=-1 must be an integer >= 0"),
        ({"crop_padding": 2.5}, r"crop_padding=2.5 must be an integer"),
        ({"cutout_size": -3}, r"cutout_size=-3 must be an integer >= 0"),
        ({"flip": 0.5}, r"flip=0.5 must be a bool"),
        ({"brightness": -0.1}, r"brightness=-0.1 must be a finite number >= 0"),
        ({"contrast": 1.5}, r"contrast=1.5 must be in \[0, 1\]"),
        ({"mixup_alpha": float("nan")}, r"mixup_alpha=nan"),
        ({"value_range": (1.0, 0.0)}, r"value_range=\(1.0, 0.0\) must be .* lo < hi"),
        ({"value_range": 1.0}, r"value_range=1.0 must be two finite numbers"),
    ],
)
def test_bad_spec_raises_naming_the_problem(spec, match):
  with pytest.raises(ValueError, match=match):
    augment.make_augment(spec)
  with pytest.raises(ValueError, match=match):
    augment_tf.make_tf_augment(spec)


@pytest.mark.parametrize("key", ["flip", "crop", "cutout"])
def test_image_augmentation_on_a_signal_batch_raises(key):
  spec = SPECS[key]
  batch = make_batch(shape=(8, 40))
  match = r"needs image batches of shape \[batch, height, width, channels\]; .* shape \[8, 40\]"
  with pytest.raises(ValueError, match=match):
    augment.make_augment(spec)(jax.random.key(0), batch)
  with pytest.raises(ValueError, match=match):
    augment_tf.make_tf_augment(spec)(to_tf(batch), tf.constant([0, 0]))


def test_crop_padding_must_be_smaller_than_the_image():
  with pytest.raises(ValueError, match=r"crop_padding=8 must be smaller .* \(8, 8\)"):
    augment.make_augment({"crop_padding": 8})(jax.random.key(0), make_batch())


def test_params_missing_a_draw_raise():
  params = sample("jax", 0, make_batch(), {"flip": True})
  with pytest.raises(ValueError, match=r"params lack \['crop_offset'\]"):
    augment.apply_params(make_batch(), params, {"flip": True, "crop_padding": 1})


# ---------------------------------------------------------------------------------------------
# Every augmentation, and all together.


@pytest.mark.parametrize("name", SPECS)
def test_keeps_shape_dtype_and_value_range(name):
  batch = make_batch(num_real=6)
  out = numpy_dict(augment.make_augment(SPECS[name])(jax.random.key(1), batch))
  assert out["input"].shape == SHAPE and out["input"].dtype == np.float32
  assert out["input"].min() >= 0.0 and out["input"].max() <= 1.0
  np.testing.assert_array_equal(out["label"], batch["label"])
  np.testing.assert_array_equal(out["mask"], batch["mask"])
  mixing = "mixup_alpha" in SPECS[name]
  assert ("mix_label" in out) == ("mix_weight" in out) == mixing
  if mixing:
    assert out["mix_label"].dtype == np.int32 and out["mix_weight"].dtype == np.float32


@pytest.mark.parametrize("name", SPECS)
def test_deterministic_for_a_key_and_different_for_another(name):
  fn = augment.make_augment(SPECS[name])
  batch = make_batch()
  first = fn(jax.random.key(3), batch)["input"]
  np.testing.assert_array_equal(first, fn(jax.random.key(3), batch)["input"])
  assert not np.array_equal(first, fn(jax.random.key(4), batch)["input"])
  assert not np.array_equal(first, batch["input"])


def test_jit_equals_eager():
  # One jitted function for every spec: XLA compiles Beta sampling (mixup) once, not per spec.
  fns = {name: augment.make_augment(spec) for name, spec in SPECS.items()}

  def run_all(key, batch):
    return {name: fn(key, batch) for name, fn in fns.items()}

  batch = make_batch(num_real=5)
  jitted = jax.jit(run_all)(jax.random.key(5), batch)
  for name, fn in fns.items():
    eager = numpy_dict(fn(jax.random.key(5), batch))
    assert eager.keys() == jitted[name].keys(), name
    for key, value in eager.items():
      np.testing.assert_allclose(
          jitted[name][key], value, rtol=0, atol=1e-6, err_msg=f"{name}/{key}"
      )


@pytest.mark.parametrize("name", SPECS)
def test_tf_and_jax_agree_given_the_same_params(name):
  spec = SPECS[name]
  batch = make_batch(seed=2, num_real=6)
  params = sample("jax", 6, batch, spec)
  want = apply_jax(batch, params, spec)
  got = numpy_dict(augment_tf.apply_params_tf(to_tf(batch), to_tf(params), spec))
  assert got.keys() == want.keys()
  for key, value in want.items():
    assert got[key].dtype == value.dtype, key
    if name in EXACT or key != "input":
      np.testing.assert_array_equal(got[key], value, err_msg=key)
    else:
      np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", ["flip", "brightness", "all"])
def test_samplers_give_the_same_keys_dtypes_and_shapes(name):
  batch = make_batch(num_real=6)
  from_jax = sample("jax", 0, batch, SPECS[name])
  from_tf = sample("tf", 0, batch, SPECS[name])
  assert from_jax.keys() == from_tf.keys() == set(augment.param_names(SPECS[name]))
  for key, value in from_jax.items():
    assert (from_tf[key].dtype, from_tf[key].shape) == (value.dtype, value.shape), key


def test_tf_augment_runs_in_dataset_map_and_is_deterministic_for_a_seed():
  spec = ALL
  examples = make_batch(seed=9, shape=(10, 8, 8, 3))
  fn = augment_tf.make_tf_augment(spec)

  def pipeline(seed):
    dataset = tf.data.Dataset.from_tensor_slices(examples).batch(4)  # last batch has 2: dynamic B
    seed = tf.constant(seed, tf.int64)
    dataset = dataset.enumerate().map(lambda i, b: fn(b, tf.stack([seed, i])))
    return [numpy_dict(batch) for batch in dataset.as_numpy_iterator()]

  first, again, other = pipeline(11), pipeline(11), pipeline(12)
  assert [b["input"].shape[0] for b in first] == [4, 4, 2]
  for one, two in zip(first, again, strict=True):
    for key in one:
      np.testing.assert_array_equal(one[key], two[key], err_msg=key)
  assert not np.array_equal(first[0]["input"], other[0]["input"])
  # The graph-mode result (dynamic batch size) equals the eager one (static batch size).
  for index, got in enumerate(first):
    part = to_tf({key: value[4 * index : 4 * index + 4] for key, value in examples.items()})
    want = numpy_dict(fn(part, tf.constant([11, index], tf.int64)))
    assert got.keys() == want.keys() == {"input", "label", "mask", "mix_label", "mix_weight"}
    for key, value in want.items():
      np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-6, err_msg=key)


def test_tf_augment_scales_uint8_pixels_first_to_the_bits_of_scaled_floats():
  """Pipeline augmentation on uint8 pixels (a streamed image split) scales them to [0, 1] on the
  host first, in a tf.data map: the batch it gives is that of the same pixels scaled beforehand."""
  pixels = np.random.default_rng(3).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
  labels = np.arange(10, dtype=np.int32)
  fn = augment_tf.make_tf_augment(ALL)

  def first_batch(inputs):
    dataset = tf.data.Dataset.from_tensor_slices({"input": inputs, "label": labels}).batch(4)
    return next(dataset.map(lambda b: fn(b, tf.constant([5, 0], tf.int64))).as_numpy_iterator())

  got, want = first_batch(pixels), first_batch(pixels / np.float32(255.0))
  assert got["input"].dtype == np.float32
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)


# ---------------------------------------------------------------------------------------------
# Properties, against plain numpy references.


def test_crop_is_the_padded_image_sliced_at_the_offset():
  spec, padding = {"crop_padding": 2}, 2
  offsets = []
  for seed in range(4):  # 4 batches of 8, all of the shape the other tests compiled for
    batch = make_batch(seed=seed, low=0.1)
    params = sample("jax", seed, batch, spec)
    out = apply_jax(batch, params, spec)["input"]
    padded = np.pad(batch["input"], ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    for b, (dy, dx) in enumerate(params["crop_offset"]):
      np.testing.assert_array_equal(out[b], padded[b, dy : dy + 8, dx : dx + 8])
    offsets.append(params["crop_offset"])
  assert np.min(offsets) == 0 and np.max(offsets) == 2 * padding


def test_flip_mirrors_the_width_axis_of_flipped_examples_only():
  spec = {"flip": True}
  flips = []
  for seed in range(4):
    batch = make_batch(seed=seed)
    params = sample("jax", seed, batch, spec)
    out = apply_jax(batch, params, spec)["input"]
    for b, flipped in enumerate(params["flip"]):
      want = batch["input"][b][:, ::-1] if flipped else batch["input"][b]
      np.testing.assert_array_equal(out[b], want)
    flips.append(params["flip"])
  assert 0 < np.sum(flips) < np.size(flips)


def test_cutout_zeroes_exactly_the_clipped_square():
  spec, size = {"cutout_size": 4}, 4
  centers = []
  for seed in range(4):
    batch = make_batch(seed=seed, low=0.1)
    params = sample("jax", seed, batch, spec)
    out = apply_jax(batch, params, spec)["input"]
    for b, (cy, cx) in enumerate(params["cutout_center"]):
      top, left = cy - size // 2, cx - size // 2
      square = np.zeros((8, 8), np.bool_)
      square[max(top, 0) : top + size, max(left, 0) : left + size] = True
      np.testing.assert_array_equal(out[b][square], 0.0)
      np.testing.assert_array_equal(out[b][~square], batch["input"][b][~square])
    centers.append(params["cutout_center"])
  # Some squares are clipped at the border.
  assert (np.array(centers) < size // 2).any()


def test_fill_is_the_nearest_bound_when_zero_is_outside_value_range():
  assert augment.fill_value({}) == 0.0
  assert augment.fill_value({"value_range": (0.2, 1.0)}) == 0.2
  assert augment.fill_value({"value_range": (-1.0, -0.5)}) == -0.5
  spec = {"crop_padding": 3, "cutout_size": 3, "value_range": (0.2, 1.0)}
  batch = make_batch(low=0.5)
  params = sample("jax", 1, batch, spec)
  out = apply_jax(batch, params, spec)["input"]
  assert out.min() == np.float32(0.2) and not (out == 0.0).any()
  tf_out = augment_tf.apply_params_tf(to_tf(batch), to_tf(params), spec)["input"]
  np.testing.assert_array_equal(tf_out.numpy(), out)


def test_contrast_keeps_the_mean_and_scales_the_deviation():
  spec = {"contrast": 0.5}
  batch = make_batch(low=0.4, high=0.6)  # factor <= 1.5 keeps every value inside [0, 1]
  params = sample("jax", 0, batch, spec)
  out = apply_jax(batch, params, spec)["input"]
  mean = batch["input"].mean(axis=(1, 2, 3), keepdims=True)
  np.testing.assert_allclose(out.mean(axis=(1, 2, 3), keepdims=True), mean, atol=1e-6)
  factor = params["contrast"][:, None, None, None]
  np.testing.assert_allclose(out - mean, factor * (batch["input"] - mean), atol=1e-6)
  assert params["contrast"].min() >= 0.5 and params["contrast"].max() <= 1.5


def test_brightness_adds_delta_and_clips_to_value_range():
  spec = {"brightness": 0.2}
  batch = make_batch(low=0.3, high=0.7)
  params = sample("jax", 0, batch, spec)
  out = apply_jax(batch, params, spec)["input"]
  delta = params["brightness"][:, None, None, None]
  np.testing.assert_allclose(out, batch["input"] + delta, atol=1e-6)
  clipped = apply_jax(make_batch(), params, {"brightness": 0.2, "value_range": (0.25, 0.75)})
  assert clipped["input"].min() == 0.25 and clipped["input"].max() == 0.75


def test_mixup_mixes_inputs_and_labels_with_the_partner():
  spec = {"mixup_alpha": 1.0}
  batch = make_batch(num_real=6)
  params = sample("jax", 0, batch, spec)
  out = apply_jax(batch, params, spec)
  lam, partner = params["mix_weight"][:, None, None, None], params["mix_partner"]
  np.testing.assert_allclose(
      out["input"], lam * batch["input"] + (1 - lam) * batch["input"][partner], atol=1e-6
  )
  np.testing.assert_array_equal(out["mix_label"], batch["label"][partner])
  np.testing.assert_array_equal(out["mix_weight"], params["mix_weight"])
  np.testing.assert_array_equal(out["input"][6:], batch["input"][6:])


@pytest.mark.parametrize("kind", ["jax", "tf"])
def test_mixup_pairs_real_rows_and_leaves_padding_alone(kind):
  spec = {"mixup_alpha": 0.4}
  batch = make_batch(num_real=5)
  for seed in range(5):
    params = sample(kind, seed, batch, spec)
    partner, weight = params["mix_partner"], params["mix_weight"]
    assert partner.dtype == np.int32 and weight.dtype == np.float32
    assert sorted(partner[:5]) == list(range(5))  # a permutation of the real rows
    np.testing.assert_array_equal(partner[5:], np.arange(5, 8))
    np.testing.assert_array_equal(weight[5:], 1.0)
    assert weight.min() >= 0.0 and weight.max() <= 1.0
  # Different seeds pair differently.
  partners = [sample(kind, seed, batch, spec)["mix_partner"] for seed in (0, 1)]
  assert not np.array_equal(*partners)


@pytest.mark.parametrize("kind", ["jax", "tf"])
def test_mixup_weights_with_small_alpha_are_near_zero_or_one(kind):
  batch = make_batch()  # the same batch size as the other tests: jax compiles Beta per shape

  def near_ends(alpha):
    weight = np.concatenate(
        [sample(kind, seed, batch, {"mixup_alpha": alpha})["mix_weight"] for seed in range(64)]
    )
    return np.mean(np.minimum(weight, 1 - weight) < 0.05)

  assert near_ends(0.05) > 0.7  # Beta(0.05, 0.05): about 86%
  assert near_ends(1.0) < 0.2  # uniform: 10%


def test_color_and_mixup_work_on_signal_batches():
  spec = {"brightness": 0.1, "contrast": 0.2, "mixup_alpha": 0.5, "value_range": (-3.0, 3.0)}
  batch = make_batch(shape=(8, 40), num_real=7, low=-1.0, high=1.0)
  out = numpy_dict(augment.make_augment(spec)(jax.random.key(0), batch))
  assert out["input"].shape == (8, 40) and out["input"].dtype == np.float32
  tf_out = numpy_dict(augment_tf.make_tf_augment(spec)(to_tf(batch), tf.constant([0, 1])))
  assert tf_out["input"].shape == (8, 40) and set(tf_out) == set(out)
  params = sample("jax", 3, batch, spec)
  np.testing.assert_allclose(
      augment_tf.apply_params_tf(to_tf(batch), to_tf(params), spec)["input"].numpy(),
      apply_jax(batch, params, spec)["input"],
      atol=1e-6,
  )
