"""Losses and penalties against hand computations and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdl


def test_softmax_cross_entropy_matches_hand_computation():
  """-log softmax(logits)[label], computed by hand with numpy."""
  logits = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], np.float32)
  labels = np.array([1, 0])
  exp = np.exp(logits)
  expected = -np.log(exp[np.arange(2), labels] / exp.sum(1))
  np.testing.assert_allclose(jdl.softmax_cross_entropy(logits, labels), expected, rtol=1e-6)


def test_cross_entropy_from_probabilities_agrees_with_logits_version():
  """Softmax then the probability loss equals the logit loss."""
  logits = jax.random.normal(jax.random.PRNGKey(0), (5, 4))
  labels = jnp.array([0, 1, 2, 3, 1])
  np.testing.assert_allclose(
      jdl.cross_entropy_from_probabilities(jax.nn.softmax(logits), labels),
      jdl.softmax_cross_entropy(logits, labels), rtol=1e-5)


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
  assert float(jdl.l1_penalty(params)) == pytest.approx(6.5)
  assert float(jdl.l2_penalty(params)) == pytest.approx(1 + 4 + 9 + 0.25)
  everything = jax.tree.map(lambda _: True, params)
  assert float(jdl.l2_penalty(params, everything)) == pytest.approx(14.25 + 200)
  penalty = jdl.make_weight_penalty(l1=0.1, l2=0.01)
  assert float(penalty(params)) == pytest.approx(0.65 + 0.1425)
  assert jdl.make_weight_penalty() is None
  with pytest.raises(ValueError, match=">= 0"):
    jdl.make_weight_penalty(l2=-1.0)


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
    jdl.losses.get_classification_loss("softmax_crossentropy")
