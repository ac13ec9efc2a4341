"""SHAP and LIME on jdl models (jdl.analysis.explain; the optional `explain` extra, which the
`test` extra installs)."""

import jax
import numpy as np
import optax
import pytest

import jdl
from jdl import models

shap = pytest.importorskip("shap", reason="the shap package is not installed: pip install -e "
                           '".[explain]" (the test extra includes it)')
pytest.importorskip("lime", reason='the lime package is not installed: pip install -e ".[explain]"')

from jdl.analysis import explain  # pylint: disable=wrong-import-position

# shap's numba helpers run as their Python originals: the same values, without 8 s of compiling.
pytestmark = pytest.mark.usefixtures("shap_without_numba")


def _model_state(hidden, features=10, classes=3, seed=0):
  model = models.MLP(hidden=hidden, num_classes=classes)
  return jdl.create_train_state(model, optax.sgd(0.1), np.zeros((1, features), np.float32),
                                jax.random.PRNGKey(seed))


def test_shap_values_plus_the_expected_value_add_up_to_the_output():
  """SHAP's local accuracy on a small nonlinear MLP: for every example, the values of the
  explained class plus its expected value over the background equal the model's output."""
  state = _model_state(hidden=(16,))
  rng = np.random.default_rng(0)
  inputs = rng.normal(size=(5, 10)).astype(np.float32)
  background = rng.normal(size=(20, 10)).astype(np.float32)
  result = explain.shap_values(state.apply_fn, state.variables(), inputs, background, max_evals=84)
  logits = np.asarray(state.apply_fn(state.variables(), inputs, train=False), np.float64)
  np.testing.assert_array_equal(result.targets, logits.argmax(axis=1))
  np.testing.assert_allclose(result.outputs, logits[np.arange(5), result.targets], rtol=1e-6)
  np.testing.assert_allclose(result.values.sum(axis=1) + result.expected_values, result.outputs,
                             rtol=1e-5, atol=1e-5)
  background_logits = np.asarray(state.apply_fn(state.variables(), background, train=False))
  np.testing.assert_allclose(result.expected_values,
                             background_logits.mean(axis=0)[result.targets], rtol=1e-5, atol=1e-6)
  assert np.abs(result.values).max() > 1e-3


def test_shap_values_of_a_linear_model_are_weight_times_distance_from_the_background_mean():
  """For a linear model every feature acts alone, so its SHAP value is w_i (x_i - mean_i), exactly,
  for the class asked for."""
  state = _model_state(hidden=())
  rng = np.random.default_rng(1)
  inputs = rng.normal(size=(3, 10)).astype(np.float32)
  background = rng.normal(size=(8, 10)).astype(np.float32)
  targets = np.array([2, 0, 1])
  result = explain.shap_values(state.apply_fn, state.variables(), inputs, background, targets,
                               max_evals=21, seed=3)
  kernel = np.asarray(state.params["Dense_0"]["kernel"], np.float64)  # [features, classes]
  expected = kernel[:, targets].T * (inputs - background.mean(axis=0))
  np.testing.assert_allclose(result.values, expected, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="max_evals must be at least 2 \\* features \\+ 1 = 21"):
    explain.shap_values(state.apply_fn, state.variables(), inputs, background, max_evals=20)
  with pytest.raises(ValueError, match="one integer target class per example"):
    explain.shap_values(state.apply_fn, state.variables(), inputs, background, [0, 1])


def test_lime_explains_a_linear_model_by_its_weights_and_the_examples_quartiles():
  """LIME's local model of a linear softmax classifier, on quartile bins: a feature with a large
  weight for the class, in its top quartile, raises the class's probability (being in that bin
  rather than another means a larger value); in its bottom quartile it lowers it. Signs flip for a
  negative weight."""
  state = _model_state(hidden=(), features=6, classes=2, seed=2)
  rng = np.random.default_rng(2)
  training = rng.normal(size=(200, 6)).astype(np.float32)
  inputs = training[:4]
  result = explain.lime_explanations(state.apply_fn, state.variables(), inputs, training,
                                     [1, 1, 1, 1], num_samples=1000)
  kernel = np.asarray(state.params["Dense_0"]["kernel"], np.float64)
  direction = kernel[:, 1] - kernel[:, 0]  # what moves class 1's probability
  low, high = np.percentile(training, [25, 75], axis=0)
  side = np.where(inputs > high, 1.0, np.where(inputs <= low, -1.0, 0.0))
  strong = (np.abs(direction) > 0.3 * np.abs(direction).max()) & (side != 0)
  assert strong.sum() >= 4
  np.testing.assert_array_equal(np.sign(result.weights[strong]),
                                np.sign((direction * side)[strong]))
  assert result.weights.shape == (4, 6) and len(result.rules[0]) == 6
  assert all(0.0 <= score <= 1.0 for score in result.scores)
  assert abs(result.rules[0][0][1]) == pytest.approx(np.abs(result.weights[0]).max())
