"""Models: parameter counts, output shapes, activations and input checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jdl import count_params, models
from jdl.models import layers


def _init(model, shape):
  """The model's variables for float inputs of `shape` (a compiled init: far quicker than an
  eager one, operation by operation)."""
  return jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(0), jnp.zeros(shape))


def _shapes(model, shape):
  """The model's variables as shapes alone (traced, nothing computed): enough for counts."""
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                        jax.ShapeDtypeStruct(shape, jnp.float32))


def test_seed_mlp_has_the_tutorial_parameter_count():
  """Flatten -> Dense(128) -> Dense(10) on 28x28x1 has 101,770 parameters."""
  variables = _shapes(models.MLP(hidden=(128,), num_classes=10), (1, 28, 28, 1))
  assert count_params(variables["params"]) == 101_770


def test_cnn_and_cnn1d_parameter_counts_match_their_docstrings():
  """The counts stated in the docstrings are right."""
  assert count_params(_shapes(models.CNN(num_classes=10), (1, 28, 28, 1))["params"]) == 824_458
  assert count_params(_shapes(models.CNN1D(num_classes=10), (1, 40))["params"]) == 5_210


@pytest.mark.parametrize("activation", sorted(models.ACTIVATIONS))
def test_mlp_activations(activation):
  """Every named activation builds a working MLP."""
  model = models.MLP(hidden=(8,), num_classes=4, activation=activation)
  variables = _init(model, (2, 5))
  assert model.apply(variables, jnp.ones((2, 5)), train=False).shape == (2, 4)


def test_softmax_output_gives_probabilities():
  """output='softmax' returns rows that sum to one."""
  model = models.MLP(hidden=(8,), num_classes=4, output="softmax")
  out = model.apply(_init(model, (3, 5)), jnp.ones((3, 5)), train=False)
  np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-6)


def test_cnn1d_shapes_follow_the_paper():
  """40 samples -> 19 -> 10 -> 5 positions, 25 channels: 125 features into the Dense layer."""
  variables = _shapes(models.CNN1D(num_classes=10), (2, 40))
  assert variables["params"]["Dense_0"]["kernel"].shape == (125, 10)


def test_bad_inputs_and_names():
  """Wrong ranks, unknown activations and unknown models fail with clear messages."""
  with pytest.raises(ValueError, match="CNN expects images"):
    _shapes(models.CNN(num_classes=10), (2, 40))
  with pytest.raises(ValueError, match="CNN1D expects signals"):
    _shapes(models.CNN1D(num_classes=10), (2, 4, 4, 4))
  with pytest.raises(ValueError, match="unknown activation 'relu6'"):
    _shapes(models.MLP(hidden=(4,), num_classes=2, activation="relu6"), (1, 3))
  with pytest.raises(ValueError, match="unknown model 'vgg'"):
    models.build_model({"name": "vgg"}, num_classes=10)
  with pytest.raises(ValueError, match=r"has no attributes \['widths'\]"):
    models.build_model({"name": "mlp", "mlp": {"widths": (3,)}}, num_classes=10)


def test_build_model_uses_the_sub_config_of_the_chosen_name():
  """Only the chosen model's sub-config is read; others may sit beside it."""
  model = models.build_model({"name": "mlp", "mlp": {"hidden": (7,)}, "cnn1d": {"features": (1,)}},
                             num_classes=3)
  assert isinstance(model, models.MLP) and tuple(model.hidden) == (7,) and model.num_classes == 3


def test_cnn1d_patch_convolution_equals_xla_convolution():
  """The patch implementation has the same parameters as nn.Conv and computes the same outputs
  and gradients, to float32 rounding."""
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 40))
  xla_model = models.CNN1D(num_classes=10, conv="xla")
  patch_model = models.CNN1D(num_classes=10, conv="patches")
  variables = _init(xla_model, (1, 40))
  assert _shapes(patch_model, (1, 40)) == _shapes(xla_model, (1, 40))  # names, shapes, dtypes
  apply = lambda m: jax.jit(lambda v: m.apply(v, x, train=False))(variables)
  np.testing.assert_allclose(apply(patch_model), apply(xla_model), rtol=1e-5, atol=1e-5)
  grad = lambda m: jax.jit(jax.grad(lambda v: m.apply(v, x, train=False).sum()))(variables)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               grad(patch_model), grad(xla_model))


@pytest.mark.parametrize("size, stride, padding, length", [
    (3, 2, 1, 23), (5, 2, 1, 40), (3, 1, 0, 9), (4, 3, 2, 17), (2, 3, 0, 11)])
def test_patch_conv1d_in_both_layouts_equals_nn_conv(size, stride, padding, length):
  """PatchConv1D computes nn.Conv's output with nn.Conv's parameters, in [batch, length,
  channels] and in [channels, length, batch] (the layout CNN1D runs it in, where taps come from
  stride phases), for strides that do and do not divide the padded length."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(4, length, 3)), jnp.float32)
  conv = nn.Conv(6, kernel_size=(size,), strides=(stride,), padding=[(padding, padding)])
  nlc = models.PatchConv1D(6, size, stride=stride, padding=padding)
  cln = models.PatchConv1D(6, size, stride=stride, padding=padding, layout="CLN")
  shapes = jax.eval_shape(conv.init, jax.random.PRNGKey(0), x)
  assert jax.eval_shape(nlc.init, jax.random.PRNGKey(0), x) == shapes  # nn.Conv's parameters
  variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)
  expected, from_nlc, from_cln = jax.jit(lambda v, x: (
      conv.apply(v, x), nlc.apply(v, x), cln.apply(v, x.transpose(2, 1, 0)).transpose(2, 1, 0)))(
          variables, x)
  np.testing.assert_allclose(from_nlc, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(from_cln, expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="unknown layout 'NCL'"):
    jax.eval_shape(models.PatchConv1D(6, 3, layout="NCL").init, jax.random.PRNGKey(0), x)


def test_classic_models_have_their_documented_parameter_counts():
  """Logistic regression, LeNet-5 and the MNIST-1D residual MLP match their docstrings."""
  assert count_params(_shapes(models.LogisticRegression(num_classes=10), (1, 40))["params"]) == 410
  assert count_params(_shapes(models.LogisticRegression(num_classes=10), (1, 28, 28, 1))["params"]) == 7_850
  assert count_params(_shapes(models.LeNet5(num_classes=10), (1, 28, 28, 1))["params"]) == 61_706
  assert count_params(_shapes(models.ResidualMLP(num_classes=10), (1, 40))["params"]) == 15_210


def test_residual_mlp_adds_its_block_to_its_input():
  """With the block's Dense zeroed, the residual MLP is Dense -> ReLU -> Dense."""
  model = models.ResidualMLP(num_classes=3, width=5)
  variables = _init(model, (2, 4))
  params = jax.tree.map(lambda p: p, variables["params"])
  params["Dense_1"] = jax.tree.map(jnp.zeros_like, params["Dense_1"])
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4))
  hidden = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"][None, :])
  expected = hidden @ params["Dense_2"]["kernel"] + params["Dense_2"]["bias"][None, :]
  np.testing.assert_allclose(model.apply({"params": params}, x, train=False), expected, rtol=1e-5)


def test_lenet5_rejects_signals():
  """LeNet-5 needs images."""
  with pytest.raises(ValueError, match="LeNet5 expects images"):
    _shapes(models.LeNet5(num_classes=10), (2, 40))


def test_build_model_names_resnets_and_passes_overrides():
  """Named ResNets come from build_model with their stage layout; sub-config keys override."""
  model = models.build_model({"name": "resnet20", "resnet20": {"width": 4}}, num_classes=10,
                             axis_name="batch")
  assert isinstance(model, models.ResNet)
  assert tuple(model.stage_sizes) == (3, 3, 3) and model.layout == "cifar" and model.width == 4
  assert model.axis_name == "batch"
  with pytest.raises(ValueError, match="has no attributes"):
    models.build_model({"name": "resnet50", "resnet50": {"depth": 50}}, num_classes=10)


@pytest.mark.parametrize("normalization", ["batch", "group", "layer"])
def test_cnn_normalization_replaces_the_conv_bias(normalization):
  """A norm after each convolution: the convolutions lose their bias and each norm brings a scale
  and a bias, 824,458 - 96 + 2 * 96 = 824,554 parameters (the docstring's count)."""
  variables = _shapes(models.CNN(num_classes=10, normalization=normalization), (1, 28, 28, 1))
  assert count_params(variables["params"]) == 824_554
  assert "bias" not in variables["params"]["Conv_0"]
  assert ("batch_stats" in variables) == (normalization == "batch")


def test_cnn_batch_norm_trains_on_batch_statistics_and_evaluates_on_running_ones():
  """In training BatchNorm normalises with the batch's statistics and updates the running ones;
  in evaluation each example is normalised with the running statistics alone."""
  model = models.CNN(num_classes=4, features=(3,), dense=8, normalization="batch")
  x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 8, 8, 1)) * 3 + 2, jnp.float32)
  variables = _init(model, (1, 8, 8, 1))
  apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
  _, updates = apply(variables, x, train=True, mutable=("batch_stats",))
  old, new = variables["batch_stats"]["Norm_0"], updates["batch_stats"]["Norm_0"]
  assert not np.allclose(old["mean"], new["mean"]) and not np.allclose(old["var"], new["var"])
  variables = {**variables, **updates}
  np.testing.assert_allclose(apply(variables, x[:1], train=False),
                             apply(variables, x, train=False)[:1], rtol=1e-5, atol=1e-6)
  alone, _ = apply(variables, x[:1], train=True, mutable=("batch_stats",))
  together, _ = apply(variables, x, train=True, mutable=("batch_stats",))
  assert not np.allclose(alone, together[:1], atol=1e-3)


def test_cnn_rejects_an_unknown_normalization_at_construction():
  with pytest.raises(ValueError, match="unknown normalization 'instance'; expected one of"):
    models.CNN(num_classes=10, normalization="instance")


def test_layer_norm_with_its_written_backward_pass_equals_flax_layer_norm():
  """`jdl.models.layers.LayerNorm` against `nn.LayerNorm`: the same parameters, outputs and
  gradients (input, scale, bias) within float32 error, on an off-centre input; a bfloat16 input
  gives a bfloat16 output, normalised in float32."""
  rng = np.random.default_rng(0)
  x = (3.0 * rng.normal(size=(4, 5, 16)) + 1.0).astype(np.float32)
  ours, theirs = layers.LayerNorm(), nn.LayerNorm()
  params = theirs.init(jax.random.key(0), x)["params"]
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)["params"]) == jax.tree.map(
      jnp.shape, params)
  params = jax.tree.map(lambda p: p + rng.normal(size=p.shape).astype(np.float32), params)

  def value_and_grads(layer):
    loss = lambda params, x: jnp.sum(jnp.sin(layer.apply({"params": params}, x)))
    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

  ours_values, their_values = jax.jit(lambda: (value_and_grads(ours), value_and_grads(theirs)))()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), ours_values,
               their_values)
  half = ours.apply({"params": params}, x.astype(jnp.bfloat16))
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32),
                             theirs.apply({"params": params}, x), rtol=2e-2, atol=2e-2)
