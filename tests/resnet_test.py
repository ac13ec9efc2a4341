"""ResNets: exact parameter counts, shapes, normalisation behaviour, input checks and training."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdl
from jdl import parallel
from jdl.models import resnet


def _param_count(model, shape):
  """Parameters of `model` for inputs of `shape`, from shapes alone (nothing is computed)."""
  init = functools.partial(model.init, train=False)
  variables = jax.eval_shape(init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(shape, jnp.float32))
  return sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _variables(model, shape, seed=0):
  """Variables of `model` for inputs of `shape`, drawn with numpy at He scale (BatchNorm scales
  one, running statistics 0 and 1): the tests of the architecture need values, not flax's
  initialisers, whose compiled random draws cost many seconds per ResNet on a CPU (the state's
  init is tested in loop_test.py and by the training test below)."""
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct(shape, jnp.float32))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "batch_stats" in name:
      return jnp.full(leaf.shape, 1.0 if "var" in name else 0.0, leaf.dtype)
    if leaf.ndim == 1:  # biases, norm scales and offsets
      return jnp.asarray(("scale" in name) + 0.1 * rng.normal(size=leaf.shape), leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return jnp.asarray(rng.normal(size=leaf.shape) * np.sqrt(2 / fan_in), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("constructor, expected", [
    (resnet.resnet18, 11_689_512),
    (resnet.resnet34, 21_797_672),
    (resnet.resnet50, 25_557_032),
])
def test_imagenet_parameter_counts_equal_torchvision(constructor, expected):
  """With 1000 classes the counts are torchvision's, and the docstring states them."""
  assert _param_count(constructor(1000), (1, 64, 64, 3)) == expected
  assert f"{expected:,}" in constructor.__doc__


@pytest.mark.parametrize("constructor, expected", [
    (resnet.resnet20, 272_474),
    (resnet.resnet56, 855_770),
])
def test_cifar_parameter_counts_equal_the_docstrings(constructor, expected):
  """With 10 classes: the paper's 0.27M / 0.85M plus 2,752 for the two projection shortcuts."""
  assert _param_count(constructor(10), (1, 32, 32, 3)) == expected
  assert f"{expected:,}" in constructor.__doc__


@pytest.mark.parametrize("model, shape", [
    (resnet.resnet18(1000), (2, 224, 224, 3)),
    (resnet.resnet50(1000), (2, 224, 224, 3)),
    (resnet.resnet56(10), (2, 32, 32, 3)),
])
def test_published_models_map_images_to_logits(model, shape):
  """The full-size models give [batch, num_classes] on their usual image sizes (shapes only)."""
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  logits, _ = jax.eval_shape(functools.partial(model.init_with_output, train=False),
                             jax.random.PRNGKey(0), x)
  assert logits.shape == (shape[0], model.num_classes)


@pytest.mark.parametrize("model, shape", [
    (resnet.resnet18(7, width=4, stage_sizes=(1, 1, 1, 1)), (2, 16, 16, 3)),
    (resnet.resnet50(7, width=4, stage_sizes=(1, 1, 1, 1)), (2, 16, 16, 3)),
    (resnet.resnet20(7, width=4), (2, 16, 16, 3)),
    (resnet.resnet20(7, width=4, stage_sizes=(1, 1, 1)), (2, 16, 16)),  # grey: channel axis added
])
def test_output_is_batch_by_classes(model, shape):
  """Both layouts, both block kinds, colour and grey inputs run to finite [batch, num_classes]
  logits (shallow and narrow, so the test is quick)."""
  x = _images(shape)
  logits = jax.jit(functools.partial(model.apply, train=False))(_variables(model, shape), x)
  assert logits.shape == (shape[0], 7)
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_batch_norm_state_and_batch_dependence():
  """BatchNorm keeps running statistics that training updates; evaluation normalises each
  example with them alone, training with the statistics of the whole batch."""
  model = resnet.resnet20(7, width=4, stage_sizes=(1, 1, 1))
  x = _images((2, 16, 16, 3))
  variables = _variables(model, x.shape)
  assert "batch_stats" in variables
  apply = jax.jit(model.apply, static_argnames=("train", "mutable"))

  _, updates = apply(variables, x, train=True, mutable=("batch_stats",))
  changed = jax.tree.map(lambda old, new: bool(jnp.any(old != new)),
                         variables["batch_stats"], updates["batch_stats"])
  assert all(jax.tree.leaves(changed))

  # A trained-looking state: running statistics no longer at their initial 0 / 1.
  variables = {**variables, **updates}
  alone = apply(variables, x[:1], train=False)
  in_batch = apply(variables, x, train=False)[:1]
  np.testing.assert_allclose(alone, in_batch, rtol=1e-5, atol=1e-5)

  alone, _ = apply(variables, x[:1], train=True, mutable=("batch_stats",))
  in_batch, _ = apply(variables, x, train=True, mutable=("batch_stats",))
  assert not np.allclose(alone, in_batch[:1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("normalization", ["group", "layer"])
def test_group_and_layer_norm_are_stateless_and_per_example(normalization):
  """No batch_stats; training runs and, unlike BatchNorm, does not mix examples."""
  model = resnet.resnet20(7, width=4, stage_sizes=(1, 1, 1), normalization=normalization)
  x = _images((2, 16, 16, 3))
  variables = _variables(model, x.shape)
  assert set(variables) == {"params"}
  apply = jax.jit(functools.partial(model.apply, train=True))
  logits = apply(variables, x)
  assert logits.shape == (2, 7) and bool(jnp.all(jnp.isfinite(logits)))
  np.testing.assert_allclose(apply(variables, x[:1]), logits[:1], rtol=1e-5, atol=1e-5)


def test_bad_inputs_and_names():
  """Wrong input ranks and unknown names fail with messages that say what is expected."""
  model = resnet.resnet20(10, width=4)
  with pytest.raises(ValueError, match=r"ResNet expects images \[batch, height, width, channels\]"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((2, 48)), train=False)
  with pytest.raises(ValueError,
                     match=r"unknown layout 'mnist'; expected one of \('imagenet', 'cifar'\)"):
    resnet.resnet20(10, layout="mnist")
  with pytest.raises(ValueError, match="unknown block 'wide'; expected one of"):
    resnet.ResNet((1,), "wide", 10)
  with pytest.raises(ValueError, match="unknown normalization 'instance'; expected one of"):
    resnet.resnet18(10, normalization="instance")


def test_batch_norm_axis_name_averages_statistics_across_devices():
  """Under pmap with `axis_name`, BatchNorm normalises with the global batch's statistics: two
  shards of one example give what one batch of two gives without pmap."""
  devices = jax.local_devices()[:2]
  if len(devices) < 2:
    pytest.skip("needs two devices")
  x = _images((2, 16, 16, 3))
  global_model = resnet.resnet20(7, width=4, stage_sizes=(1, 1, 1))
  variables = _variables(global_model, x.shape)
  expected, expected_state = jax.jit(lambda v, x: global_model.apply(
      v, x, train=True, mutable=["batch_stats"]))(variables, x)

  sharded_model = global_model.clone(axis_name="batch")
  apply = jax.pmap(lambda v, xs: sharded_model.apply(v, xs, train=True, mutable=["batch_stats"]),
                   axis_name="batch", in_axes=(None, 0), devices=devices)
  logits, state = apply(variables, x.reshape(2, 1, 16, 16, 3))
  np.testing.assert_allclose(logits.reshape(2, 7), expected, rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-4, atol=1e-6),
               state, expected_state)


def _learnable_images(num_examples, size, num_classes=10, seed=0):
  """A small image set a convolutional network can learn: each class is a fixed random pattern,
  blurred into blobs, and every example is its class's pattern, shifted by up to 2 pixels and
  covered in noise of the pattern's own scale."""
  rng = np.random.default_rng(seed)
  patterns = rng.normal(size=(num_classes, size, size, 3)).astype(np.float32)
  for axis in (1, 2):  # a 3-tap blur, twice, along each spatial axis
    for _ in range(2):
      patterns = (np.roll(patterns, 1, axis) + patterns + np.roll(patterns, -1, axis)) / 3
  patterns /= patterns.std(axis=(1, 2, 3), keepdims=True)
  labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
  shifts = rng.integers(-2, 3, (num_examples, 2))
  images = np.stack([np.roll(patterns[y], tuple(s), axis=(0, 1)) for y, s in zip(labels, shifts)])
  images += rng.normal(size=images.shape).astype(np.float32)
  return images.astype(np.float32), labels


def test_a_resnet_learns_a_synthetic_image_set():
  """A ResNet of the CIFAR layout, as published but one block per stage (ResNet-20 has three;
  BatchNorm, zero-initialised residuals, width 16), halves its training loss within 60 steps of
  batch 32 with jdl's state, step and `fit` on a learnable 16x16 image set. (The per-step
  engine: XLA's CPU convolutions run several times slower inside the resident engine's loop, see
  `jdl.resident.loops_are_slow`.) The full-depth models' layers are checked by the parameter
  counts and shapes above; one block per stage keeps the random init's compilation short."""
  images, labels = _learnable_images(512, 16)
  tx = jdl.make_optimizer({"name": "sgd", "learning_rate": 0.05, "momentum": 0.9})
  model = resnet.resnet20(10, stage_sizes=(1, 1, 1))
  state = jdl.create_train_state(model, tx, images[:1], jax.random.PRNGKey(0))
  assert set(state.model_state) == {"batch_stats"}
  train_step, eval_step = jdl.make_steps()
  source = jdl.data.ArraySource(images, labels, 32, shuffle=True)
  state, history = jdl.fit(state, train_step, eval_step, source, num_steps=60,
                           eval_every_steps=15, progress=False, runner=parallel.JitRunner(),
                           device_resident=False)
  first, last = history[0]["train_loss"], history[-1]["train_loss"]
  assert int(state.step) == 60 and np.isfinite(last)
  assert last <= 0.5 * first, [round(r["train_loss"], 3) for r in history]
