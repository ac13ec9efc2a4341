"""Losses and penalties against hand computations and finite differences."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdl
from jdl import losses


def test_softmax_cross_entropy_matches_hand_computation():
  """-log softmax(logits)[label], computed by hand with numpy."""
  logits = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], np.float32)
  labels = np.array([1, 0])
  exp = np.exp(logits)
  expected = -np.log(exp[np.arange(2), labels] / exp.sum(1))
  # numpy and XLA round exp, log and the sum differently: a few float32 ulps of the log-sum-exp
  # (about 3), relative to losses of about 0.5.
  np.testing.assert_allclose(jdl.softmax_cross_entropy(logits, labels), expected, rtol=1e-5)


def test_cross_entropy_from_probabilities_agrees_with_logits_version():
  """Softmax then the probability loss equals the logit loss."""
  logits = jax.random.normal(jax.random.PRNGKey(0), (5, 4))
  labels = jnp.array([0, 1, 2, 3, 1])
  np.testing.assert_allclose(
      jdl.cross_entropy_from_probabilities(jax.nn.softmax(logits), labels),
      jdl.softmax_cross_entropy(logits, labels), rtol=1e-5)


def test_label_smoothing_matches_hand_computation():
  """With smoothing s the target is (1 - s) one_hot + s / K, for logits and for probabilities."""
  logits = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], np.float32)
  labels = np.array([1, 0])
  s = 0.2
  log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  targets = (1 - s) * np.eye(3)[labels] + s / 3
  expected = -(targets * log_probs).sum(1)
  np.testing.assert_allclose(
      jdl.softmax_cross_entropy(logits, labels, label_smoothing=s), expected, rtol=1e-5)
  np.testing.assert_allclose(
      jdl.cross_entropy_from_probabilities(np.exp(log_probs), labels, label_smoothing=s),
      expected, rtol=1e-5)


def test_label_smoothing_agrees_with_optax_in_value_and_gradient():
  """The smoothed loss and its gradient equal optax's cross-entropy on optax.smooth_labels."""
  logits = np.random.default_rng(2).normal(size=(4, 5)).astype(np.float32)
  labels = jnp.array([0, 4, 2, 2])
  ours = lambda z: jnp.sum(jdl.softmax_cross_entropy(z, labels, label_smoothing=0.1))
  theirs = lambda z: jnp.sum(optax.softmax_cross_entropy(
      z, optax.smooth_labels(jax.nn.one_hot(labels, 5), 0.1)))
  ours_value, ours_grad = jax.jit(jax.value_and_grad(ours))(logits)
  theirs_value, theirs_grad = jax.jit(jax.value_and_grad(theirs))(logits)
  # Two formulas of one loss: a few float32 ulps apart.
  np.testing.assert_allclose(ours_value, theirs_value, rtol=1e-5)
  np.testing.assert_allclose(ours_grad, theirs_grad, rtol=1e-5, atol=1e-7)


def test_zero_label_smoothing_is_the_plain_loss():
  """label_smoothing=0 computes exactly what the two-argument call computes, bit for bit."""
  logits = np.random.default_rng(3).normal(size=(3, 4)).astype(np.float32)
  labels = jnp.array([3, 0, 1])
  np.testing.assert_array_equal(jdl.softmax_cross_entropy(logits, labels, label_smoothing=0.0),
                                optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  probabilities = jax.nn.softmax(logits)
  np.testing.assert_array_equal(
      jdl.cross_entropy_from_probabilities(probabilities, labels, label_smoothing=0.0),
      jdl.cross_entropy_from_probabilities(probabilities, labels))


@pytest.mark.parametrize("name", ["softmax_cross_entropy", "cross_entropy_from_probabilities"])
def test_classification_loss_by_config_takes_label_smoothing(name):
  """get_classification_loss(name, label_smoothing=s) is the named loss bound to s, a two-argument
  loss; s = 0 gives the loss itself."""
  assert losses.get_classification_loss(name) is losses.LOSSES[name]
  assert losses.get_classification_loss(name, label_smoothing=0.0) is losses.LOSSES[name]
  loss_fn = losses.get_classification_loss(name, label_smoothing=0.3)
  outputs = jax.nn.softmax(np.random.default_rng(4).normal(size=(3, 4)).astype(np.float32))
  labels = jnp.array([1, 2, 3])
  np.testing.assert_array_equal(loss_fn(outputs, labels),
                                losses.LOSSES[name](outputs, labels, label_smoothing=0.3))
  assert not np.allclose(loss_fn(outputs, labels), losses.LOSSES[name](outputs, labels))


@pytest.mark.parametrize("smoothing", [1.0, -0.1, 1.5, "a"])
def test_label_smoothing_outside_zero_one_is_rejected(smoothing):
  """Smoothing must lie in [0, 1); the error names the value."""
  logits, labels = jnp.zeros((2, 3)), jnp.array([0, 1])
  with pytest.raises(ValueError, match=r"label_smoothing must be .*in \[0, 1\); got"):
    jdl.softmax_cross_entropy(logits, labels, label_smoothing=smoothing)
  with pytest.raises(ValueError, match=r"label_smoothing must be .*in \[0, 1\); got"):
    jdl.cross_entropy_from_probabilities(logits, labels, label_smoothing=smoothing)
  with pytest.raises(ValueError, match=r"label_smoothing must be .*in \[0, 1\); got"):
    losses.get_classification_loss("softmax_cross_entropy", label_smoothing=smoothing)


def test_binary_cross_entropy_matches_hand_computation():
  """-(y log s(z) + (1-y) log(1-s(z))), averaged over trailing axes."""
  logits = np.array([[0.3, -1.2], [2.0, 0.0]], np.float32)
  labels = np.array([[1, 0], [0, 1]], np.float32)
  s = 1 / (1 + np.exp(-logits))
  expected = (-(labels * np.log(s) + (1 - labels) * np.log(1 - s))).mean(1)
  np.testing.assert_allclose(jdl.binary_cross_entropy(logits, labels), expected, rtol=1e-5)


def test_mean_squared_error_matches_hand_computation_and_checks_shapes():
  """Mean of squared differences per example; shape mismatches fail loudly."""
  predictions = np.array([[1.0, 2.0], [3.0, 5.0]], np.float32)
  targets = np.array([[0.0, 2.0], [3.0, 1.0]], np.float32)
  np.testing.assert_allclose(jdl.mean_squared_error(predictions, targets), [0.5, 8.0])
  with pytest.raises(ValueError, match="one shape"):
    jdl.mean_squared_error(predictions, targets[:, :1])


def test_penalties_spare_biases_and_match_hand_computation():
  """L1 = sum |w| and L2 = sum w^2 over kernels only; biases are not penalised."""
  params = {"dense": {"kernel": jnp.array([[1.0, -2.0], [3.0, 0.5]]), "bias": jnp.array([10.0, -10.0])}}
  assert float(losses.l1_penalty(params)) == pytest.approx(6.5)
  assert float(losses.l2_penalty(params)) == pytest.approx(1 + 4 + 9 + 0.25)
  everything = jax.tree.map(lambda _: True, params)
  assert float(losses.l2_penalty(params, everything)) == pytest.approx(14.25 + 200)
  penalty = jdl.make_weight_penalty(l1=0.1, l2=0.01)
  assert float(penalty(params)) == pytest.approx(0.65 + 0.1425)
  assert jdl.make_weight_penalty() is None
  with pytest.raises(ValueError, match=">= 0"):
    jdl.make_weight_penalty(l2=-1.0)


def test_penalties_spare_normalisation_scales_and_offsets():
  """LayerNorm and BatchNorm scales and offsets are rank 1, like biases: the L1 and L2 penalties
  of a model that has them are sums over its Dense and Conv kernels only."""

  class Normalised(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
      x = nn.LayerNorm()(nn.Conv(2, (3,))(x))
      x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x.reshape(x.shape[0], -1)))
      return nn.Dense(3)(x)

  shapes = jax.eval_shape(functools.partial(Normalised().init, train=False),
                          jax.random.PRNGKey(0), jnp.ones((1, 5, 1)))["params"]
  rng = np.random.default_rng(0)  # nonzero values everywhere: offsets are 0 at init
  params = jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 2.0, s.shape), s.dtype), shapes)
  kernels = [params[name]["kernel"] for name in ("Conv_0", "Dense_0", "Dense_1")]
  assert {name.split("_")[0] for name in params} == {"Conv", "LayerNorm", "BatchNorm", "Dense"}
  assert params["LayerNorm_0"]["scale"].ndim == params["BatchNorm_0"]["scale"].ndim == 1
  # Sums of a few dozen positive float32 terms in another order than numpy's: within n * eps.
  np.testing.assert_allclose(losses.l1_penalty(params), sum(np.abs(k).sum() for k in kernels),
                             rtol=1e-5)
  np.testing.assert_allclose(losses.l2_penalty(params), sum(np.square(k).sum() for k in kernels),
                             rtol=1e-5)


@pytest.mark.parametrize("loss_name", ["softmax_cross_entropy", "binary_cross_entropy", "mean_squared_error"])
def test_loss_gradients_match_finite_differences(loss_name):
  """jax.grad of each loss agrees with central finite differences in float64."""
  with jax.enable_x64():
    loss_fn = getattr(jdl, loss_name)
    key_logits, key_targets = jax.random.split(jax.random.PRNGKey(1))
    logits = jax.random.normal(key_logits, (3, 4), jnp.float64)
    if loss_name == "softmax_cross_entropy":
      targets = jnp.array([0, 3, 1])
    elif loss_name == "binary_cross_entropy":
      targets = (jax.random.uniform(key_targets, (3, 4)) > 0.5).astype(jnp.float64)
    else:
      targets = jax.random.normal(key_targets, (3, 4), jnp.float64)
    scalar = lambda z: jnp.sum(loss_fn(z, targets))
    analytic = jax.grad(scalar)(logits)
    eps = 1e-6
    numeric = np.zeros(logits.shape)
    for index in np.ndindex(*logits.shape):
      bump = jnp.zeros_like(logits).at[index].set(eps)
      numeric[index] = (scalar(logits + bump) - scalar(logits - bump)) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_unknown_loss_name_lists_valid_names():
  """A misspelt loss name fails with the valid names."""
  with pytest.raises(ValueError, match="softmax_cross_entropy"):
    losses.get_classification_loss("softmax_crossentropy")
