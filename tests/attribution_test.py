"""Attribution: saliency, SmoothGrad, integrated gradients and occlusion checked against exact
properties (completeness, the analytic gradient of a linear model, zero for irrelevant regions)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdl import models
from jdl.analysis import attribution


def _init(model, input_shape, dtype=jnp.float32, seed=0):
  """The model's variables (a jitted init: about twice as fast as an eager one on a CPU)."""
  init = jax.jit(functools.partial(model.init, train=False))
  return init(jax.random.PRNGKey(seed), jnp.zeros((1, *input_shape), dtype))


@pytest.fixture(scope="module")
def tanh_mlp():
  model = models.MLP(hidden=(16, 16), num_classes=3, activation="tanh")
  return model, _init(model, (10,))


@pytest.fixture(scope="module")
def tiny_lm():
  model = models.TransformerLM(num_classes=11, block_size=8, num_layers=1, num_heads=2, width=8)
  return model, _init(model, (6,), jnp.int32)


@pytest.fixture(scope="module")
def linear_signal_model():
  """A linear model on [B, 16] signals whose weights are zero on the second half (positions
  8..15), so that half is irrelevant to every class."""
  model = models.MLP(hidden=(), num_classes=3)
  variables = _init(model, (16,))
  kernel = np.asarray(variables["params"]["Dense_0"]["kernel"]).copy()
  kernel[8:] = 0.0
  variables = {"params": {"Dense_0": {"kernel": jnp.asarray(kernel),
                                      "bias": variables["params"]["Dense_0"]["bias"]}}}
  return model, variables, kernel


def _inputs(shape, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _logit_rounding(x, kernel):
  """A bound on the float32 rounding of each logit of the linear model `x @ kernel + b`.

  An occluded copy of an input differs only where the weights are zero, so its logits are the
  same sums; but the matmul may add them in another order or with other instructions (FMA or
  not, AVX2 or AVX-512 widths) for another row of the batch, so a zero drop may come out as a
  rounding error: at most about n * eps * sum |x_j W_jc| for n terms."""
  x = np.asarray(x).reshape(len(x), -1)
  return x.shape[1] * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(kernel)).max()


def _score(model, variables, x, targets):
  logits = model.apply(variables, x, train=False)
  return np.asarray(jnp.take_along_axis(logits, jnp.asarray(targets)[:, None], axis=1)[:, 0])


# ---------------------------------------------------------------------------------------------
# Integrated gradients: completeness.


def test_integrated_gradients_sum_to_the_score_difference_on_a_nonlinear_mlp(tanh_mlp):
  """sum(attributions) = f(x) - f(0) within 2% for a two-layer tanh MLP, with the trapezoid rule
  (64 intervals, 65 points) and Gauss-Legendre (65 points, the same compiled function)."""
  model, variables = tanh_mlp
  x = 2.0 * _inputs((6, 10))
  targets = np.array([0, 1, 2, 0, 1, 2])
  gap = _score(model, variables, x, targets) - _score(model, variables, jnp.zeros_like(x), targets)
  for method, steps in [("riemann_trapezoid", 64), ("gauss_legendre", 65)]:
    attributions, delta = attribution.integrated_gradients(
        model.apply, variables, x, targets, steps=steps, method=method,
        return_convergence_delta=True)
    assert attributions.shape == x.shape and attributions.dtype == jnp.float32
    totals = np.asarray(attributions).sum(axis=1)
    np.testing.assert_allclose(totals, gap, rtol=0.02, atol=1e-3)
    np.testing.assert_allclose(np.asarray(delta), totals - gap, atol=1e-5)


def test_integrated_gradients_completeness_on_a_1d_cnn_with_a_baseline():
  """The same on the MNIST-1D paper's ReLU CNN with a non-zero baseline (a signal's mean), with
  the path evaluated 16 points at a time."""
  model = models.CNN1D(num_classes=4)
  variables = _init(model, (40,))
  x = 3.0 * _inputs((4, 40))
  baseline = jnp.full((40,), 0.3)
  targets = np.array([3, 2, 1, 0])
  attributions = attribution.integrated_gradients(model.apply, variables, x, targets,
                                                  baseline=baseline, steps=64,
                                                  points_per_call=16)
  gap = (_score(model, variables, x, targets)
         - _score(model, variables, jnp.broadcast_to(baseline, x.shape), targets))
  np.testing.assert_allclose(np.asarray(attributions).sum(axis=1), gap, rtol=0.02, atol=2e-3)


def _lm_from_embeddings(model, variables, embeddings_BxTxD, *, train):
  """The language model's next-token logits at the last position, from token embeddings."""
  logits_BxTxV = model.apply(variables, embeddings_BxTxD, train=train,
                             method=models.TransformerLM.logits_from_embeddings)
  return logits_BxTxV[:, -1]


def test_token_model_attributions_go_through_the_embeddings(tiny_lm):
  """Token ids have no gradient (a clear error); integrated gradients on the embeddings of a
  TransformerLM, summed over the width, give one number per token and stay complete."""
  model, variables = tiny_lm
  tokens = jax.random.randint(jax.random.PRNGKey(2), (3, 6), 1, 11)
  with pytest.raises(ValueError, match="gradients exist only for floating inputs"):
    attribution.saliency(model.apply, variables, tokens, 0)
  embed = jax.jit(functools.partial(model.apply, method=lambda m, t: m.token_embedding(t)))
  embeddings = embed(variables, tokens)
  apply_fn = functools.partial(_lm_from_embeddings, model)
  per_token, delta = attribution.integrated_gradients(
      apply_fn, variables, embeddings, np.array([1, 5, 7]), steps=64, reduce_channels=True,
      return_convergence_delta=True)
  assert per_token.shape == (3, 6)
  totals = np.asarray(per_token).sum(axis=1)
  gap = totals - np.asarray(delta)  # f(x) - f(0); delta itself is checked on the MLP above
  assert np.all(np.abs(gap) > 1e-3)  # logits of an untrained model are small: a tight atol
  np.testing.assert_allclose(totals, gap, rtol=0.02, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Saliency and SmoothGrad.


def test_saliency_of_a_linear_model_is_its_weight_column():
  """For logits = x W + b the gradient of class c is W[:, c] for every example: on images it is
  that column reshaped to [H, W, C]; absolute and reduce_channels act on it as documented."""
  model = models.MLP(hidden=(), num_classes=4)
  variables = _init(model, (5, 6, 3))
  kernel = np.asarray(variables["params"]["Dense_0"]["kernel"])  # [5*6*3, 4]
  images = jax.random.uniform(jax.random.PRNGKey(3), (2, 5, 6, 3))
  targets = np.array([2, 0])
  maps = np.asarray(attribution.saliency(model.apply, variables, images, targets))
  assert maps.shape == images.shape
  for index, target in enumerate(targets):
    np.testing.assert_allclose(maps[index], kernel[:, target].reshape(5, 6, 3), rtol=1e-6)
  per_pixel = attribution.saliency(model.apply, variables, images, targets, absolute=True,
                                   reduce_channels=True)
  assert per_pixel.shape == (2, 5, 6)
  np.testing.assert_allclose(np.asarray(per_pixel), np.abs(maps).sum(axis=-1), rtol=1e-6)


def test_saliency_of_probabilities_is_the_softmax_gradient(tanh_mlp):
  """use_probabilities differentiates softmax(logits)[target] (checked against jax.grad)."""
  model, variables = tanh_mlp
  x = _inputs((3, 10))
  targets = np.array([1, 1, 2])
  maps = attribution.saliency(model.apply, variables, x, targets, use_probabilities=True)

  def probability(row, target):
    return jax.nn.softmax(model.apply(variables, row[None], train=False)[0])[target]

  expected = jax.jit(jax.vmap(jax.grad(probability)))(x, jnp.asarray(targets))
  np.testing.assert_allclose(np.asarray(maps), np.asarray(expected), rtol=1e-5, atol=1e-7)


def test_smoothgrad_is_deterministic_for_a_key_and_is_saliency_without_noise(tanh_mlp):
  model, variables = tanh_mlp
  x = _inputs((4, 10))
  key = jax.random.PRNGKey(7)
  first = attribution.smoothgrad(model.apply, variables, x, 1, key=key, num_samples=10)
  again = attribution.smoothgrad(model.apply, variables, x, 1, key=key, num_samples=10)
  other = attribution.smoothgrad(model.apply, variables, x, 1, key=jax.random.PRNGKey(8),
                                 num_samples=10)
  assert first.shape == x.shape
  np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
  assert not np.allclose(np.asarray(first), np.asarray(other))
  plain = attribution.saliency(model.apply, variables, x, 1)
  noiseless = attribution.smoothgrad(model.apply, variables, x, 1, key=key, num_samples=10,
                                     noise_scale=0.0)  # noise_scale is traced: no recompilation
  np.testing.assert_allclose(np.asarray(noiseless), np.asarray(plain), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Occlusion.


def test_occlusion_of_an_irrelevant_region_is_zero_and_exact_on_a_linear_model(
    linear_signal_model):
  """Windows over positions 8..15, where the weights are zero, drop nothing. Elsewhere the drop
  of a linear model when a window is zeroed is the window's share of the logit, sum x_j W_jc."""
  model, variables, kernel = linear_signal_model
  x = _inputs((3, 16))
  targets = np.array([0, 1, 2])
  maps = np.asarray(attribution.occlusion(model.apply, variables, x, targets, window=4))
  assert maps.shape == x.shape
  np.testing.assert_allclose(maps[:, 8:], 0.0, atol=_logit_rounding(x, kernel))
  contributions = np.asarray(x) * kernel[:, targets].T  # [B, 16]: x_j W_jc
  expected = np.repeat(contributions.reshape(3, 4, 4).sum(axis=2), 4, axis=1)
  np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-6)


def test_occlusion_with_overlapping_windows_averages_and_covers_the_tail(linear_signal_model):
  """Window 5, stride 4 on 16 positions: starts 0, 4, 8 and a last window flush with the end
  (11), so every position is covered; positions 12..15 are seen only by windows over zero
  weights, and a position's value is the mean drop of the windows covering it."""
  model, variables, kernel = linear_signal_model
  x = _inputs((2, 16))
  maps = np.asarray(attribution.occlusion(model.apply, variables, x, 0, window=5, stride=4))
  contributions = np.asarray(x) * kernel[:, 0][None]
  drops = {start: contributions[:, start:start + 5].sum(axis=1) for start in (0, 4, 8, 11)}
  np.testing.assert_allclose(maps[:, 4], (drops[0] + drops[4]) / 2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(maps[:, 10], (drops[8] + drops[11]) / 2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(maps[:, 13:], 0.0, atol=_logit_rounding(x, kernel))


def test_occlusion_of_images_uses_a_2d_window_and_keeps_the_shape():
  """A linear image model blind to the bottom half: 2-D windows there give zero (up to the
  rounding of the logits); every window covers all channels."""
  model = models.MLP(hidden=(), num_classes=2)
  variables = _init(model, (8, 8, 2))
  kernel = np.asarray(variables["params"]["Dense_0"]["kernel"]).reshape(8, 8, 2, 2).copy()
  kernel[4:] = 0.0
  variables = {"params": {"Dense_0": {"kernel": jnp.asarray(kernel.reshape(128, 2)),
                                      "bias": variables["params"]["Dense_0"]["bias"]}}}
  images = jax.random.uniform(jax.random.PRNGKey(4), (2, 8, 8, 2))
  maps = np.asarray(attribution.occlusion(model.apply, variables, images, 1, window=(2, 4),
                                          fill=0.5))
  assert maps.shape == images.shape
  rounding = _logit_rounding(np.maximum(np.abs(images), 0.5), kernel.reshape(128, 2))
  np.testing.assert_allclose(maps[:, 4:], 0.0, atol=rounding)
  assert np.all(np.abs(maps[:, :4]).max(axis=(1, 2, 3)) > 100 * rounding)
  np.testing.assert_array_equal(maps[..., 0], maps[..., 1])  # a window covers all channels


def test_occlusion_works_on_token_ids_and_padding_gets_zero():
  """A transformer text classifier: replacing tokens by the padding id is allowed (integer
  fill), and occluding positions that already are padding changes nothing."""
  model = models.TransformerEncoderClassifier(num_classes=2, vocab_size=20, max_length=8,
                                              num_layers=1, num_heads=2, width=8)
  variables = _init(model, (8,), jnp.int32)
  tokens = jnp.array([[3, 4, 5, 6, 0, 0, 0, 0], [7, 8, 9, 10, 11, 12, 0, 0]], jnp.int32)
  maps = np.asarray(attribution.occlusion(model.apply, variables, tokens, 1, window=1, fill=0))
  assert maps.shape == (2, 8) and maps.dtype == np.float32
  np.testing.assert_allclose(maps[0, 4:], 0.0, atol=1e-6)  # zero up to float rounding
  np.testing.assert_allclose(maps[1, 6:], 0.0, atol=1e-6)
  assert np.all(np.abs(maps[:, 0]) > 1e-4)
  with pytest.raises(ValueError, match="fill must be an integer"):
    attribution.occlusion(model.apply, variables, tokens, 1, window=1, fill=0.5)


# ---------------------------------------------------------------------------------------------
# Bad arguments.


def test_bad_arguments_are_clear_errors(tanh_mlp, linear_signal_model, tiny_lm):
  model, variables = tanh_mlp
  x = _inputs((2, 10))
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match=r"target_classes must lie in \[0, 3\)"):
    attribution.saliency(model.apply, variables, x, 3)
  with pytest.raises(ValueError, match=r"target_classes must be one int or \[batch\]"):
    attribution.saliency(model.apply, variables, x, np.array([0, 1, 2]))
  with pytest.raises(ValueError, match="reduce_channels"):
    attribution.saliency(model.apply, variables, x, 0, reduce_channels=True)
  with pytest.raises(ValueError, match=r"inputs must be a batch"):
    attribution.saliency(model.apply, variables, jnp.zeros((10,)), 0)
  with pytest.raises(ValueError, match="steps must be an integer >= 1"):
    attribution.integrated_gradients(model.apply, variables, x, 0, steps=0)
  with pytest.raises(ValueError, match="unknown integrated gradients method 'simpson'"):
    attribution.integrated_gradients(model.apply, variables, x, 0, method="simpson")
  with pytest.raises(ValueError, match=r"baseline must be a number, one example \(10,\)"):
    attribution.integrated_gradients(model.apply, variables, x, 0, baseline=jnp.zeros((3,)))
  with pytest.raises(ValueError, match="noise_scale must be a finite number >= 0"):
    attribution.smoothgrad(model.apply, variables, x, 0, key=key, noise_scale=-0.1)
  with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
    attribution.smoothgrad(model.apply, variables, x, 0, key=key, num_samples=0)
  with pytest.raises(ValueError, match="key must be a PRNG key"):
    attribution.smoothgrad(model.apply, variables, x, 0, key=7)
  signal_model, signal_variables, _ = linear_signal_model
  signals = _inputs((2, 16))
  with pytest.raises(ValueError, match=r"size 17 on input axis 1 must be in \[1, 16\]"):
    attribution.occlusion(signal_model.apply, signal_variables, signals, 0, window=17)
  with pytest.raises(ValueError, match=r"window \(2, 2\) has 2 axes"):
    attribution.occlusion(signal_model.apply, signal_variables, signals, 0, window=(2, 2))
  with pytest.raises(ValueError, match="stride"):
    attribution.occlusion(signal_model.apply, signal_variables, signals, 0, window=4, stride=0)
  lm, lm_variables = tiny_lm
  with pytest.raises(ValueError, match=r"must return \[batch, num_classes\].*pick one position"):
    attribution.occlusion(lm.apply, lm_variables, jnp.ones((2, 4), jnp.int32), 0, window=1)
