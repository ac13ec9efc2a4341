"""Recurrent layers and classifiers: the cell equations, padding, shapes, parameter counts, input
checks, learning, and the MNIST-1D GRU experiment on mock data."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

import jdl
from jdl import experiment, models
from jdl import metrics as metrics_lib
from jdl.models import recurrent

from experiments import mnist1d_gru


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _numpy_lstm(p, x_TxF):
  """Flax's LSTM equations, written out: the gates' input kernels have no bias, the recurrent
  ones do."""
  hidden = p["hi"]["kernel"].shape[0]
  h, c, outputs = np.zeros(hidden), np.zeros(hidden), []
  for x in x_TxF:
    gate = lambda g: x @ p["i" + g]["kernel"] + h @ p["h" + g]["kernel"] + p["h" + g]["bias"]
    i, f, g, o = _sigmoid(gate("i")), _sigmoid(gate("f")), np.tanh(gate("g")), _sigmoid(gate("o"))
    c = f * c + i * g
    h = o * np.tanh(c)
    outputs.append(h)
  return np.stack(outputs)


def _numpy_gru(p, x_TxF):
  """Flax's GRU equations, written out: the reset gate multiplies the recurrent product plus its
  bias, r * (W_hn h + b_hn), as in cuDNN and PyTorch (not W_hn (r * h) as Cho et al., 2014)."""
  hidden = p["hr"]["kernel"].shape[0]
  h, outputs = np.zeros(hidden), []
  for x in x_TxF:
    r = _sigmoid(x @ p["ir"]["kernel"] + p["ir"]["bias"] + h @ p["hr"]["kernel"])
    z = _sigmoid(x @ p["iz"]["kernel"] + p["iz"]["bias"] + h @ p["hz"]["kernel"])
    n = np.tanh(x @ p["in"]["kernel"] + p["in"]["bias"]
                + r * (h @ p["hn"]["kernel"] + p["hn"]["bias"]))
    h = (1.0 - z) * n + z * h
    outputs.append(h)
  return np.stack(outputs)


NUMPY_CELLS = {"lstm": _numpy_lstm, "gru": _numpy_gru}


def _random_variables(model, *args, seed=0, **kwargs):
  """Variables of `model` with every parameter drawn from N(0, 0.5^2) (so biases are non-zero
  too). Shapes from `jax.eval_shape` and values from numpy: initialising eagerly compiles one
  small program per random draw, which would make up most of this file's run time."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args, **kwargs)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: (0.5 * rng.normal(size=leaf.shape)).astype(np.float32), shapes)


def _param_count(model, *args, **kwargs):
  """The model's number of parameters, from shapes alone."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args, **kwargs)
  return jdl.count_params(shapes["params"])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cells_match_numpy_equations_in_both_directions(cell):
  """Each step of the layer is the cell's equations with the layer's own parameters: the forward
  half reads 0..t, and the backward half of a sequence of length L, padded, reads L-1 down to t."""
  layer = models.Recurrent(3, cell=cell, bidirectional=True)
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (2, 5, 4)), np.float64)
  lengths = np.array([5, 3])
  variables = _random_variables(layer, jnp.zeros((1, 5, 4)))
  apply = jax.jit(lambda v, x, n: layer.apply(v, x, lengths=n))
  out = np.asarray(apply(variables, jnp.asarray(x, jnp.float32), lengths))
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  step = NUMPY_CELLS[cell]
  for b, length in enumerate(lengths):
    forward = step(params["forward"], x[b, :length])
    backward = step(params["backward"], x[b, :length][::-1])[::-1]
    np.testing.assert_allclose(out[b, :length, :3], forward, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[b, :length, 3:], backward, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[b, length:], 0.0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_padding_changes_nothing_for_the_real_positions(cell, bidirectional):
  """A sequence of length L padded to T (with garbage) gives at its first L positions the outputs
  it gives alone, and zeros after; a prefix mask gives the same, and a full-length row is the
  same with or without lengths."""
  layer = models.Recurrent(4, cell=cell, bidirectional=bidirectional)
  lengths = np.array([6, 3, 0])
  x = jax.random.normal(jax.random.PRNGKey(2), (3, 6, 3))
  real = (np.arange(6)[None, :] < lengths[:, None])[..., None]
  x = jnp.where(real, x, 100.0)  # garbage in the padding must not matter
  variables = _random_variables(layer, x)

  @jax.jit  # one compilation for the four runs
  def run(variables, x, lengths, mask):
    return (layer.apply(variables, x, lengths=lengths), layer.apply(variables, x, mask=mask),
            layer.apply(variables, x[1:2, :3]), layer.apply(variables, x))

  padded, masked, alone, unmasked = run(variables, x, lengths, real[..., 0])
  assert padded.shape == (3, 6, 8 if bidirectional else 4)
  np.testing.assert_allclose(padded[1, :3], alone[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(padded[0], unmasked[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(padded[1, 3:], 0.0)
  np.testing.assert_array_equal(padded[2], 0.0)
  np.testing.assert_array_equal(masked, padded)


@pytest.mark.parametrize("pooling, bidirectional, num_layers", [("last", True, 1),
                                                                ("mean", False, 2)])
def test_token_classifier_ignores_trailing_padding(pooling, bidirectional, num_layers):
  """Token ids padded with 0 give the logits of the unpadded sequence (through one or two
  layers); with `lengths` given the padding is not read from the tokens, with the same result."""
  model = models.RNNClassifier(num_classes=3, cell="gru", hidden=5, num_layers=num_layers,
                               bidirectional=bidirectional, vocab_size=20, embed_dim=4,
                               pooling=pooling)
  tokens = np.array([[3, 7, 1, 9, 0, 0, 0], [5, 2, 8, 4, 6, 11, 19]], np.int32)
  variables = _random_variables(model, tokens, train=False)

  @jax.jit
  def run(variables, tokens, lengths):
    apply = lambda *args, **kwargs: model.apply(variables, *args, train=False, **kwargs)
    return apply(tokens), apply(tokens[:1, :4]), apply(tokens, lengths=lengths)

  logits, alone, with_lengths = run(variables, tokens, np.array([4, 7]))
  assert logits.shape == (2, 3)
  np.testing.assert_allclose(logits[0], alone[0], rtol=1e-5, atol=1e-6)
  # Lengths given or read from the tokens: two computations, a few float32 ulps apart.
  np.testing.assert_allclose(with_lengths, logits, rtol=1e-5, atol=1e-6)


def test_last_pooling_picks_each_directions_final_state():
  """pool_sequence("last") takes the forward half at L-1 and the backward half at 0."""
  outputs = jnp.arange(2 * 4 * 4, dtype=jnp.float32).reshape(2, 4, 4)
  lengths = jnp.array([2, 4])
  pooled = recurrent.pool_sequence(outputs, "last", lengths=lengths, bidirectional=True)
  np.testing.assert_array_equal(pooled[0], [4, 5, 2, 3])  # forward at position 1, backward at 0
  np.testing.assert_array_equal(pooled[1], [28, 29, 18, 19])
  mean = recurrent.pool_sequence(outputs, "mean", lengths=lengths, bidirectional=True)
  np.testing.assert_allclose(mean[0], outputs[0, :2].mean(0))


def test_lengths_from_tokens_reads_the_last_non_padding_token():
  tokens = jnp.array([[4, 0, 5, 0, 0], [0, 0, 0, 0, 0], [1, 2, 3, 4, 5]])
  np.testing.assert_array_equal(recurrent.lengths_from_tokens(tokens), [3, 0, 5])


@pytest.mark.parametrize("cell, per_direction", [
    ("lstm", 4 * 5 * (3 + 5 + 1)),  # 4H(F + H + 1) = 180
    ("gru", 3 * 5 * (3 + 5 + 1) + 5),  # 3H(F + H + 1) + H = 140
])
def test_layer_parameter_counts_match_the_docstring(cell, per_direction):
  """F = 3 inputs, H = 5: the docstring's formulas, doubled when bidirectional."""
  x = jnp.zeros((1, 2, 3))
  for bidirectional, directions in ((False, 1), (True, 2)):
    layer = models.Recurrent(5, cell=cell, bidirectional=bidirectional)
    assert _param_count(layer, x) == directions * per_direction


def test_mnist1d_gru_has_the_documented_parameter_count_and_shapes():
  """2 * (3*6*8 + 6) = 300 GRU parameters plus Dense 480 -> 10: 5,110, built by name."""
  model = models.build_model({"name": "mnist1d_gru"}, num_classes=10)
  assert isinstance(model, models.Mnist1dGRU)
  assert (model.cell, model.hidden, model.bidirectional) == ("gru", 6, True)
  assert (model.pooling, model.initializer) == ("flatten", "uniform")
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((2, 40)), train=False)
  assert jdl.count_params(variables["params"]) == 5_110
  assert variables["params"]["Dense_0"]["kernel"].shape == (480, 10)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, jnp.ones((3, 40)))
  assert logits.shape == (3, 10)


def test_classifier_docstring_example_and_signal_shapes():
  """The RNNClassifier docstring's count, and [B, T] / [B, T, F] signals with each pooling."""
  lstm = models.RNNClassifier(num_classes=2, vocab_size=10_000)
  count = _param_count(lstm, jnp.ones((1, 12), jnp.int32), train=False)
  assert count == 1_280_000 + 4 * 128 * (128 + 128 + 1) + 129 * 2 == 1_411_842
  for pooling, head_inputs, shape in (("last", 8, (3, 7)), ("mean", 8, (3, 7, 1)),
                                      ("flatten", 7 * 8, (3, 7))):
    model = models.RNNClassifier(num_classes=4, cell="lstm", hidden=4, bidirectional=True,
                                 pooling=pooling, output="softmax")
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape), train=False)
    assert variables["params"]["Dense_0"]["kernel"].shape == (head_inputs, 4)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, jnp.zeros(shape))
    assert out.shape == (3, 4)
  variables = _random_variables(model, jnp.zeros((3, 7)), train=False)
  probs = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.ones((3, 7)))
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)


def test_bad_inputs_fail_with_clear_messages():
  layer = models.Recurrent(4, cell="gru")
  x = jnp.zeros((2, 5, 3))
  variables = _random_variables(layer, x)
  apply = lambda *args, **kwargs: layer.apply(variables, *args, **kwargs)
  with pytest.raises(ValueError, match=r"Recurrent expects sequences \[batch, time, features\]"):
    apply(jnp.zeros((2, 5)))
  with pytest.raises(ValueError, match=r"lengths must lie in \[0, 5\].*from 2 to 6"):
    apply(x, lengths=np.array([6, 2]))
  with pytest.raises(ValueError, match=r"lengths must lie in \[0, 5\]"):
    apply(x, lengths=np.array([-1, 2]))
  with pytest.raises(ValueError, match=r"lengths must be integers of shape \[batch\] = \(2,\)"):
    apply(x, lengths=np.array([1.0, 2.0]))
  with pytest.raises(ValueError, match=r"lengths must be integers of shape"):
    apply(x, lengths=np.array([1, 2, 3]))
  with pytest.raises(ValueError, match="either lengths .* or mask .*, not both"):
    apply(x, lengths=np.array([1, 2]), mask=np.ones((2, 5), bool))
  with pytest.raises(ValueError, match=r"mask must have shape \[batch, time\] = \(2, 5\)"):
    apply(x, mask=np.ones((2, 4), bool))
  with pytest.raises(ValueError, match=r"mask rows \[1\] are not prefixes"):
    apply(x, mask=np.array([[1, 1, 0, 0, 0], [1, 0, 1, 0, 0]], bool))
  with pytest.raises(ValueError, match="unknown cell 'rnn'; expected one of"):
    models.Recurrent(4, cell="rnn")
  with pytest.raises(ValueError, match="unknown pooling 'max'; expected one of"):
    models.RNNClassifier(num_classes=2, pooling="max")
  with pytest.raises(ValueError, match="unknown initializer 'xavier'"):
    models.RNNClassifier(num_classes=2, initializer="xavier")
  with pytest.raises(ValueError, match="num_layers must be >= 1"):
    models.RNNClassifier(num_classes=2, num_layers=0)
  tokens_model = models.RNNClassifier(num_classes=2, hidden=3, vocab_size=10, embed_dim=2)
  with pytest.raises(ValueError, match=r"vocab_size=10 expects integer token ids \[batch, time\]"):
    tokens_model.init(jax.random.PRNGKey(0), jnp.zeros((2, 5)), train=False)
  with pytest.raises(ValueError, match=r"token ids must lie in \[0, 10\)"):
    tokens_model.init(jax.random.PRNGKey(0), jnp.full((2, 5), 10), train=False)
  signal_model = models.RNNClassifier(num_classes=2, hidden=3)
  with pytest.raises(ValueError, match="integer inputs of shape .* but vocab_size is None"):
    signal_model.init(jax.random.PRNGKey(0), jnp.zeros((2, 5), jnp.int32), train=False)
  with pytest.raises(ValueError, match=r"RNNClassifier expects signals \[batch, time\] or"):
    signal_model.init(jax.random.PRNGKey(0), jnp.zeros((2, 5, 3, 1)), train=False)


def _membership_task(n, seed):
  """Token sequences of 3-8 ids from 1-9, padded with 0 to 8; label 1 when id 7 appears."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((n, 8), np.int32)
  for row, length in enumerate(rng.integers(3, 9, size=n)):
    tokens[row, :length] = rng.integers(1, 10, size=length)
  return tokens, (tokens == 7).any(axis=1).astype(np.int32)


def test_lstm_classifier_learns_a_padded_token_task_through_jdl():
  """create_train_state + make_train_step: a one-layer LSTM learns whether a token occurs in a
  variable-length sequence (about half the rows contain it) and generalises to new rows."""
  model = models.RNNClassifier(num_classes=2, cell="lstm", hidden=16, vocab_size=10, embed_dim=8,
                               pooling="last", dropout_rate=0.1, initializer="uniform")
  tokens, labels = _membership_task(256, seed=0)
  # Under jit: one compilation instead of one per random draw (the same state, sooner).
  state = jax.jit(functools.partial(jdl.create_train_state, model, optax.adam(2e-2), tokens[:1]))(
      jax.random.PRNGKey(0))
  train_step = jax.jit(jdl.make_train_step())
  eval_step = jax.jit(jdl.make_eval_step())
  test_tokens, test_labels = _membership_task(256, seed=1)
  before = jdl.compute_metrics(eval_step(state, {"input": test_tokens, "label": test_labels}))
  for step in range(120):
    rows = np.arange(step * 32, step * 32 + 32) % 256
    state, _ = train_step(state, {"input": tokens[rows], "label": labels[rows]})
  after = jdl.compute_metrics(eval_step(state, {"input": test_tokens, "label": test_labels}))
  assert after["loss"] < 0.5 * before["loss"], (before, after)
  assert after["accuracy"] >= 0.9, after


def test_mnist1d_gru_experiment_runs_on_mock_data(tmp_path):
  """Four steps of the experiment on 64 mock MNIST-1D examples: finite metrics, the paper's
  model (5,110 parameters) and config, and no attempt to generate or download the real data."""

  def refuse(*args, **kwargs):
    raise AssertionError("the real data were requested")

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tfds.download.DownloadManager, "download_and_extract", refuse)
    patch.setattr(tfds.download.DownloadManager, "download", refuse)
    with tfds.testing.mock_data(num_examples=64):
      state, history = experiment.run_experiment(
          mnist1d_gru.get_config,
          ["--workdir=" + str(tmp_path), "--config.data_dir=" + str(tmp_path / "tfds"),
           "--config.num_steps=4", "--config.eval_every_steps=4", "--config.batch_size=16",
           "--config.eval_batch_size=32", "--config.progress=false", "--config.layout=none",
           "--config.checkpoint=false"],
          name="mnist1d_gru")
  record = history[-1]
  assert record["step"] == 4 == int(state.step)
  assert all(np.isfinite(record[k]) for k in ("train_loss", "test_loss", "test_accuracy"))
  assert jdl.count_params(state.params) == 5_110
  # PyTorch's initialisation: every GRU parameter starts within 1/sqrt(6) = 0.408 of zero and four
  # Adam steps of 0.01 move it by about 0.04 at most (Flax's gives input weights ~ N(0, 1)).
  assert max(float(jnp.abs(p).max()) for p in jax.tree.leaves(state.params["Recurrent_0"])) < 0.45
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model"]["name"] == "mnist1d_gru"
  assert config["optimizer"]["learning_rate"] == 1e-2 and config["batch_size"] == 16
