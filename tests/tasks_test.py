"""Any task through the same step, fit and logs: regression, custom metrics, a VAE with its own
random stream, pytree inputs in every layout, typed keys, scalar losses and auxiliary terms, uint8
pixels scaled on the device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

import jdl
from jdl import models, parallel, vmap_sweep
from jdl.data import ArraySource
from tests.experiments_test import read_tensorboard_scalars


def _regression_problem(n=83, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 5)).astype(np.float32)
  y = (x @ rng.normal(size=(5, 1)) + 0.3 * rng.normal(size=(n, 1))).astype(np.float32)
  return x, y


def test_linear_regression_through_fit_reaches_the_least_squares_fit(tmp_path):
  """The diabetes experiment: a linear model trained by Adam on the MSE ends within 1% of the
  closed-form least-squares training MSE (what both minimise), and near its test MSE."""
  from experiments import diabetes_regression

  config = diabetes_regression.get_config()
  config.progress = False
  result = diabetes_regression.train(config, str(tmp_path))
  assert result["train_mse"] <= 1.01 * result["least_squares_train_mse"], result
  assert result["test_mse"] == pytest.approx(result["least_squares_test_mse"], rel=0.02)
  records = jdl.read_jsonl(str(tmp_path))
  assert records[-1]["test_loss"] == pytest.approx(result["test_mse"])


def test_custom_metrics_are_exact_over_a_padded_split_in_history_jsonl_and_tensorboard(tmp_path):
  """Regression's mean absolute error and largest absolute error, and a metric of the user's own
  (the largest squared error), over 23 test examples in batches of 10 (the last one padded with
  garbage-free zeros): the values are those of the whole split, and they reach the history,
  metrics.jsonl and TensorBoard alike."""
  x, y = _regression_problem()

  def squared_error_max(outputs, batch, mask):
    keep = jdl.metrics.broadcast_mask(mask, outputs.shape).astype(bool)
    return {"squared_error_max": jnp.max(jnp.where(keep, (outputs - batch["label"]) ** 2, -1.0))}

  base = jdl.tasks.regression()
  task = jdl.Task(loss=base.loss, metrics=base.metrics + (squared_error_max,))
  state = jdl.create_train_state(models.MLP(hidden=(), num_classes=1), optax.adam(0.05), x[:1],
                                 jax.random.key(0))
  train_step, eval_step = jdl.make_steps(task)
  writer = jdl.MetricWriter(str(tmp_path))
  state, history = jdl.fit(state, train_step, eval_step, ArraySource(x[:60], y[:60], 16,
                                                                     shuffle=True),
                           ArraySource(x[60:], y[60:], 10, shuffle=False), num_steps=8,
                           eval_every_steps=4, writer=writer, progress=False)
  writer.close()
  predictions = np.asarray(state.apply_fn(state.variables(), x[60:], train=False))
  errors = np.abs(predictions - y[60:]).astype(np.float64)
  final = history[-1]
  assert final["test_mean_absolute_error"] == pytest.approx(errors.mean(), rel=1e-5)
  assert final["test_absolute_error_max"] == pytest.approx(errors.max(), rel=1e-5)
  assert final["test_squared_error_max"] == pytest.approx((errors ** 2).max(), rel=1e-5)
  assert final["test_loss"] == pytest.approx((errors ** 2).mean(), rel=1e-5)
  assert "train_mean_absolute_error" in final and "train_squared_error_max" in final
  records = jdl.read_jsonl(str(tmp_path))
  scalars = read_tensorboard_scalars(tmp_path / "tensorboard")
  for key in ("test_mean_absolute_error", "test_absolute_error_max", "test_squared_error_max",
              "train_squared_error_max"):
    assert [r[key] for r in records] == [h[key] for h in history], key
    assert scalars[key][8] == pytest.approx(final[key], rel=1e-6), key


def test_a_label_shape_that_does_not_fit_is_an_error_not_a_wrong_number():
  """`[B]` targets for `[B, 1]` outputs would broadcast to `[B, B]`; the task refuses them."""
  x, y = _regression_problem()
  state = jdl.create_train_state(models.MLP(hidden=(), num_classes=1), optax.sgd(0.1), x[:1],
                                 jax.random.key(0))
  train_step, eval_step = jdl.make_steps(jdl.tasks.regression())
  with pytest.raises(ValueError, match="one shape"):
    jdl.fit(state, train_step, eval_step, ArraySource(x, y[:, 0], 16, shuffle=False), None,
            num_steps=1, progress=False)


def _vae_run(num_steps, *, state=None, checkpointer=None, seed=0):
  rng = np.random.default_rng(0)
  signals = np.cumsum(rng.normal(size=(96, 12)), axis=1).astype(np.float32) / 3.0
  labels = np.zeros(96, np.int32)
  model = models.VAE(hidden=(16,), latent=2)
  task = jdl.Task(loss=models.elbo_loss, rng_streams=("sample",))
  if state is None:
    state = jdl.create_train_state(model, optax.adam(1e-2), signals[:1], jax.random.key(seed),
                                   rng_streams=task.rng_streams)
  train_step, eval_step = jdl.make_steps(task, check_finite=True)
  return jdl.fit(state, train_step, eval_step, ArraySource(signals[:64], labels[:64], 16,
                                                           shuffle=True, seed=1),
                 ArraySource(signals[64:], labels[64:], 32, shuffle=False), num_steps=num_steps,
                 eval_every_steps=4, progress=False, checkpointer=checkpointer)


def test_the_vae_trains_with_its_own_stream_and_resumes_bitwise(tmp_path):
  """The VAE draws codes from its "sample" stream, logs the ELBO's terms, learns, and a run
  stopped at step 4 and resumed from its checkpoint ends with the parameters of an
  uninterrupted 12-step run, bit for bit."""
  whole, history = _vae_run(12)
  assert {"train_kl", "train_reconstruction", "test_elbo", "test_kl"} <= set(history[-1])
  assert history[-1]["test_elbo"] > history[0]["test_elbo"]
  assert history[-1]["test_elbo"] == pytest.approx(
      -(history[-1]["test_reconstruction"] + history[-1]["test_kl"]), rel=1e-5)
  checkpointer = jdl.Checkpointer(str(tmp_path / "ckpt"))
  _vae_run(4, checkpointer=checkpointer)
  checkpointer.wait()
  template = _vae_run(1)[0]  # any state of the same structure
  restored = checkpointer.restore_latest(template)
  assert int(restored.step) == 4
  resumed, _ = _vae_run(12, state=restored)
  checkpointer.close()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params),
               jax.device_get(whole.params))
  other_seed, _ = _vae_run(12, seed=1)
  assert not np.allclose(other_seed.params["to_mean"]["kernel"], whole.params["to_mean"]["kernel"])


class _TwoInputs(nn.Module):
  """A model of a dict of two arrays: a signal and side features."""

  @nn.compact
  def __call__(self, inputs, *, train: bool):
    del train
    hidden = nn.Dense(8)(inputs["signal"]) + nn.Dense(8)(inputs["side"])
    return nn.Dense(3)(nn.relu(hidden))


@pytest.mark.parametrize("layout", ["shard", "pmap"])
def test_a_two_input_model_trains_alike_under_jit_sharded_jit_and_pmap(layout):
  """A dict of two inputs, a typed key (`jax.random.key`), 8 CPU devices: sharded jit and pmap
  reach the parameters of plain jit on one device (float32 tolerance)."""
  rng = np.random.default_rng(0)
  inputs = {"signal": rng.normal(size=(64, 6)).astype(np.float32),
            "side": rng.normal(size=(64, 2)).astype(np.float32)}
  labels = rng.integers(0, 3, 64).astype(np.int32)

  def train(layout):
    runner = parallel.make_runner(layout, num_devices=None if layout == "none" else 8,
                                  batch_size=16)
    sample = {key: value[:1] for key, value in inputs.items()}
    state = jdl.create_train_state(_TwoInputs(), optax.adam(0.05), sample, jax.random.key(0))
    train_step, eval_step = jdl.make_steps(axis_name=runner.axis_name, check_finite=True)
    state, history = jdl.fit(state, train_step, eval_step, ArraySource(inputs, labels, 16,
                                                                       shuffle=True, seed=2),
                             ArraySource(inputs, labels, 24, shuffle=False), num_steps=6,
                             eval_every_steps=3, progress=False, runner=runner)
    return jax.device_get(state.params), history[-1]

  (single, single_record), (other, other_record) = train("none"), train(layout)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), single, other)
  assert other_record["test_accuracy"] == pytest.approx(single_record["test_accuracy"], abs=1e-9)
  assert other_record["test_loss"] == pytest.approx(single_record["test_loss"], rel=1e-5)


def test_create_train_state_takes_pytree_inputs_and_names_uneven_ones():
  state = jdl.create_train_state(_TwoInputs(), optax.sgd(0.1), {
      "signal": np.zeros((2, 6), np.float32), "side": np.zeros((2, 2), np.float32)},
                                 jax.random.key(0))
  assert state.input_shape == ((2,), (6,))  # in the dict's key order, as jax.tree flattens it
  with pytest.raises(ValueError, match="the same for every array"):
    jdl.create_train_state(_TwoInputs(), optax.sgd(0.1), {
        "signal": np.zeros((2, 6), np.float32), "side": np.zeros((3, 2), np.float32)},
                           jax.random.key(0))


def test_a_scalar_loss_with_auxiliary_terms_gives_the_per_example_gradient():
  """A loss returning the batch's mean (a scalar) trains like the same loss per example, and its
  auxiliary terms are reported as means (a scalar term per batch, a per-example term per
  example)."""
  x, y = _regression_problem(16)
  state = jdl.create_train_state(models.MLP(hidden=(4,), num_classes=1), optax.sgd(0.1), x[:1],
                                 jax.random.key(0))
  per_example = jdl.Task(loss=lambda out, batch: jnp.mean((out - batch["label"]) ** 2, axis=-1))

  def scalar_loss(out, batch):
    errors = jnp.mean((out - batch["label"]) ** 2, axis=-1)
    return jnp.mean(errors), {"batch_max": jnp.max(errors), "error": errors}

  a, metrics_a = jax.jit(jdl.make_train_step(per_example))(state, {"input": x, "label": y})
  b, metrics_b = jax.jit(jdl.make_train_step(jdl.Task(loss=scalar_loss)))(
      state, {"input": x, "label": y})
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7), a.params,
               b.params)
  values = jdl.compute_metrics(metrics_b)
  assert values["loss"] == pytest.approx(jdl.compute_metrics(metrics_a)["loss"], rel=1e-5)
  assert values["error"] == pytest.approx(values["loss"], rel=1e-5)
  assert values["batch_max"] >= values["error"]


def test_gradient_norms_are_those_of_the_gradient():
  x, y = _regression_problem(16)
  state = jdl.create_train_state(models.MLP(hidden=(4,), num_classes=1), optax.sgd(0.1), x[:1],
                                 jax.random.key(0))
  task = jdl.tasks.regression()
  _, metrics = jax.jit(jdl.make_train_step(task, gradient_norms=True))(
      state, {"input": x, "label": y})

  def loss(params):
    out = state.apply_fn({"params": params}, x, train=False)
    return jnp.mean((out - y) ** 2)

  values = jdl.compute_metrics(metrics)
  expected = float(optax.tree.norm(jax.grad(loss)(state.params)))
  assert values["grad_norm"] == pytest.approx(expected, rel=1e-5)
  assert values["grad_norm_max"] == pytest.approx(expected, rel=1e-5)
  assert values["param_norm"] == pytest.approx(float(optax.tree.norm(state.params)), rel=1e-6)


def test_the_learning_rate_of_a_plain_optax_schedule():
  """`optax.adamw(schedule)` keeps only a step count: given the schedule, the rate of the latest
  update is read from it; without, the error says what to pass."""
  schedule = optax.linear_schedule(1.0, 0.0, 10)
  x, y = _regression_problem(8)
  state = jdl.create_train_state(models.MLP(hidden=(), num_classes=1), optax.adamw(schedule),
                                 x[:1], jax.random.key(0))
  step = jax.jit(jdl.make_train_step(jdl.tasks.regression()))
  for _ in range(3):
    state, _ = step(state, {"input": x, "label": y})
  assert float(jdl.current_learning_rate(state.opt_state, schedule)) == pytest.approx(0.8)
  with pytest.raises(ValueError, match="pass the schedule"):
    jdl.current_learning_rate(state.opt_state)


@pytest.mark.parametrize("resident", [True, False])
def test_several_evaluation_sources_each_with_its_own_name_and_cadence(resident):
  """A validation split every 2 steps and a test split every 6: records at 2, 4 and 6, each with
  the train means since the last one and the sources due then, with the values `evaluate` gives."""
  x, y = _regression_problem(90)
  state = jdl.create_train_state(models.MLP(hidden=(4,), num_classes=1), optax.adam(0.02),
                                 x[:1], jax.random.key(0))
  train_step, eval_step = jdl.make_steps(jdl.tasks.regression())
  sources = {"val": ArraySource(x[50:70], y[50:70], 8, shuffle=False),
             "test": ArraySource(x[70:], y[70:], 6, shuffle=False)}
  state, history = jdl.fit(state, train_step, eval_step, ArraySource(x[:50], y[:50], 10,
                                                                     shuffle=True),
                           sources, num_steps=6, eval_every_steps={"val": 2, "test": 6},
                           progress=False, device_resident=resident)
  assert [r["step"] for r in history] == [2, 4, 6]
  assert ["val_loss" in r for r in history] == [True, True, True]
  assert ["test_loss" in r for r in history] == [False, False, True]
  for name, source in sources.items():
    expected = jdl.evaluate(state, jax.jit(eval_step), source)
    assert history[-1][f"{name}_mean_absolute_error"] == pytest.approx(
        expected["mean_absolute_error"], rel=1e-5)
  with pytest.raises(ValueError, match=r"names \['valid'\], which are not evaluation sources"):
    jdl.fit(state, train_step, eval_step, ArraySource(x[:50], y[:50], 10, shuffle=True), sources,
            num_steps=2, eval_every_steps={"valid": 2}, progress=False)


class _SowingModel(nn.Module):
  """BatchNorm statistics (a mutable collection carried from step to step) and a sown value."""

  @nn.compact
  def __call__(self, x, *, training: bool):
    hidden = nn.BatchNorm(use_running_average=not training)(nn.Dense(8)(x))
    self.sow("intermediates", "hidden", hidden)
    return nn.Dense(3)(nn.relu(hidden))


def test_mutable_collections_and_a_training_keyword_of_another_name_go_through_fit():
  """A model that says `training` instead of `train`, keeps BatchNorm statistics and sows
  intermediates trains through the resident loop: the statistics move, the sown values are not
  carried (they would grow every step)."""
  x, _ = _regression_problem(48)
  y = (x[:, 0] > 0).astype(np.int32)
  state = jdl.create_train_state(_SowingModel(), optax.adam(0.05), x[:1], jax.random.key(0))
  assert set(state.model_state) == {"batch_stats"}
  before = jax.device_get(state.model_state["batch_stats"])
  state, history = jdl.fit(state, *jdl.make_steps(), ArraySource(x, y, 16, shuffle=True),
                           ArraySource(x, y, 16, shuffle=False), num_steps=6, progress=False,
                           device_resident=True)
  assert not np.allclose(state.model_state["batch_stats"]["BatchNorm_0"]["mean"],
                         before["BatchNorm_0"]["mean"])
  assert history[-1]["test_accuracy"] > 0.6


@pytest.mark.parametrize("resident", [True, False])
def test_records_carry_mfu_after_the_first_interval(tmp_path, resident):
  """A run that logs reports its model FLOPs utilisation from the second record on (the first
  interval holds the compilation), a fraction in (0, 1], also in metrics.jsonl; both engines."""
  x, y = _regression_problem(64)
  state = jdl.create_train_state(models.MLP(hidden=(16,), num_classes=1), optax.adam(0.01),
                                 x[:1], jax.random.key(0))
  with jdl.MetricWriter(str(tmp_path)) as writer:
    _, history = jdl.fit(state, *jdl.make_steps(jdl.tasks.regression()),
                         ArraySource(x, y, 16, shuffle=True), None, num_steps=40,
                         eval_every_steps=10, writer=writer, progress=False,
                         device_resident=resident)
  assert "mfu" not in history[0]
  assert all(0.0 < record["mfu"] <= 1.0 for record in history[1:])
  assert [r.get("mfu") for r in jdl.read_jsonl(str(tmp_path))] == [r.get("mfu") for r in history]


# ---------------------------------------------------------------------------------------------
# uint8 pixels: carried as uint8, scaled to [0, 1] in the step (`Task.prepare`).


@pytest.fixture(scope="module")
def pixel_data(tmp_path_factory):
  """Mock Fashion-MNIST in memory: 40 uint8 train images in batches of 16 (the last one padded),
  40 test images in batches of 32, and the same arrays scaled to float32 on the host."""
  with tfds.testing.mock_data(num_examples=40):
    train, test, meta = jdl.data.load_classification_data(
        "fashion_mnist", batch_size=16, eval_batch_size=32,
        data_dir=str(tmp_path_factory.mktemp("tfds")))
  scaled = [ArraySource(jdl.data.scale_inputs(source.inputs), source.labels, source.batch_size,
                        shuffle=source.shuffle) for source in (train, test)]
  return (train, test), scaled, meta


def _pixel_state(meta):
  return jdl.create_train_state(models.MLP(hidden=(16,), num_classes=meta.num_classes),
                                optax.adam(1e-2), np.zeros((1, *meta.input_shape), np.float32),
                                jax.random.key(0))


@pytest.mark.parametrize("resident", [True, False])
def test_uint8_pixels_train_through_fit_as_host_scaled_floats_do(pixel_data, resident):
  """`classification(pixels=True)` on uint8 sources trains through `fit` (either engine) to the
  records and parameters of the plain task on the same images scaled on the host, bit for bit:
  augmentation on the device sees the same [0, 1] floats, and `evaluate` agrees."""
  (train, test), (train_scaled, test_scaled), meta = pixel_data
  assert meta.pixels and train.inputs.dtype == np.uint8 and train_scaled.inputs.dtype == np.float32
  augment = jdl.augment.make_augment({"flip": True, "brightness": 0.1})
  results = []
  for task, sources in ((jdl.tasks.classification(pixels=True), (train, test)),
                        (jdl.tasks.classification(), (train_scaled, test_scaled))):
    train_step, eval_step = jdl.make_steps(task, augment=augment)
    state, history = jdl.fit(_pixel_state(meta), train_step, eval_step, *sources, num_epochs=2,
                             progress=False, device_resident=resident)
    results.append((state, history, jdl.evaluate(state, jax.jit(eval_step), sources[1])))
  (state, history, evaluated), (state_scaled, history_scaled, evaluated_scaled) = results
  keys = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")
  assert [[r[k] for k in keys] for r in history] == [[r[k] for k in keys] for r in history_scaled]
  assert evaluated == evaluated_scaled
  for leaf, leaf_scaled in zip(jax.tree.leaves(state.params), jax.tree.leaves(state_scaled.params)):
    np.testing.assert_array_equal(leaf, leaf_scaled)


def test_a_vmapped_sweep_trains_uint8_pixels_as_host_scaled_floats(pixel_data):
  """`train_vmapped` keeps uint8 pixels on the device and its members end where they do on the
  host-scaled images, bit for bit (the model initialised from float32 inputs, `sample_input`)."""
  (train, test), (train_scaled, test_scaled), meta = pixel_data
  model = models.MLP(hidden=(16,), num_classes=meta.num_classes)
  runs = []
  for pixels, sources in ((True, (train, test)), (False, (train_scaled, test_scaled))):
    train_step, eval_step = jdl.make_steps(jdl.tasks.classification(pixels=pixels))
    runs.append(vmap_sweep.train_vmapped(
        model, {"learning_rate": 1e-2}, *sources, num_steps=4, learning_rates=[1e-2, 3e-2],
        train_step=train_step, eval_step=eval_step,
        sample_input=np.zeros((1, *meta.input_shape), np.float32)))
  np.testing.assert_array_equal(runs[0].history[-1]["test_loss"], runs[1].history[-1]["test_loss"])
  for leaf, leaf_scaled in zip(jax.tree.leaves(runs[0].params), jax.tree.leaves(runs[1].params)):
    np.testing.assert_array_equal(leaf, leaf_scaled)


def test_evaluate_classifier_scales_uint8_pixels_on_the_device(pixel_data):
  """The analysis path: `evaluate_classifier(..., pixels=True)` on uint8 images gives the outputs
  of the host-scaled images; uint8 images without `pixels` are refused, not run as 0..255."""
  from jdl.analysis import evaluation  # pylint: disable=import-outside-toplevel

  (_, test), (_, test_scaled), meta = pixel_data
  state = _pixel_state(meta)
  report = evaluation.evaluate_classifier(state, test.inputs, test.labels, pixels=True,
                                          batch_size=16)
  expected = evaluation.evaluate_classifier(state, test_scaled.inputs, test.labels, batch_size=16)
  assert report.accuracy == expected.accuracy and report.log_loss == expected.log_loss
  np.testing.assert_array_equal(report.confusion, expected.confusion)
  with pytest.raises(ValueError, match="pixels=True"):
    evaluation.predict(state, test.inputs)


def test_pixels_are_explicit_and_wrong_dtypes_fail_while_tracing():
  """Only the key a task names as pixels is scaled (a uint8 token id elsewhere stays uint8);
  uint8 inputs to a task without pixels, a model initialised on uint8 pixels, integer ids given
  as pixels and a prepare that is no function are each a clear error."""
  pixels = np.arange(48, dtype=np.uint8).reshape(3, 4, 4, 1)
  tokens = np.arange(3, dtype=np.uint8)
  prepared = jdl.tasks.scale_pixels("image")({"image": pixels, "tokens": tokens})
  assert prepared["image"].dtype == jnp.float32 and prepared["tokens"].dtype == np.uint8
  np.testing.assert_array_equal(prepared["image"], pixels / np.float32(255.0))
  with pytest.raises(ValueError, match="must be uint8"):
    jdl.tasks.unit_pixels(pixels.astype(np.int32))
  with pytest.raises(TypeError, match="Task.prepare must be a function"):
    jdl.Task(loss=lambda outputs, batch: outputs, prepare="scale")
  model = models.MLP(hidden=(), num_classes=2)
  batch = {"input": pixels, "label": np.zeros(3, np.int32)}
  float_state = jdl.create_train_state(model, optax.sgd(0.1), pixels[:1] / np.float32(255.0),
                                       jax.random.key(0))
  with pytest.raises(ValueError, match=r"classification\(pixels=True\)"):
    jax.eval_shape(jdl.make_train_step(), float_state, batch)
  uint8_state = jdl.create_train_state(model, optax.sgd(0.1), pixels[:1], jax.random.key(0))
  with pytest.raises(ValueError, match="unit_pixels"):
    jax.eval_shape(jdl.make_eval_step(jdl.tasks.classification(pixels=True)), uint8_state, batch)
