"""Adversarial attacks, robust accuracy and adversarial training through the train step's
`adversary` option."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdl
from jdl import data as data_lib
from jdl import models
from jdl import step as step_lib
from jdl.analysis import adversarial

from experiments import mnist1d


def _init(model, input_shape, seed=0):
  init = jax.jit(functools.partial(model.init, train=False))
  return init(jax.random.PRNGKey(seed), jnp.zeros((1, *input_shape), jnp.float32))


@pytest.fixture(scope="module")
def random_mlp():
  """An untrained MLP on [B, 12] inputs in [0, 1], some of them exactly on the range's ends."""
  model = models.MLP(hidden=(16,), num_classes=3, activation="tanh")
  inputs = np.random.default_rng(1).uniform(size=(32, 12)).astype(np.float32)
  inputs[:4, :3] = 0.0
  inputs[4:8, :3] = 1.0
  labels = np.random.default_rng(2).integers(0, 3, 32).astype(np.int32)
  return model, _init(model, (12,)), inputs, labels


@pytest.fixture(scope="module")
def mnist1d_model(mnist1d_data_dir, tmp_path_factory):
  """An MLP trained on MNIST-1D for 200 steps with `jdl.train_and_evaluate`, and 500 test
  examples. MNIST-1D signals are standardised, not in [0, 1]: the valid range is the data's."""
  config = jdl.apply_overrides(mnist1d.get_config(), [
      f"data_dir={mnist1d_data_dir}", "model.name=mlp", "model.mlp.hidden=(32,)",
      "num_steps=200", "eval_every_steps=200", "progress=false", "batch_size=100",
      "eval_batch_size=500", "layout=none", "checkpoint=false"])
  state, history = jdl.train_and_evaluate(config, str(tmp_path_factory.mktemp("mnist1d_run")))
  builder = data_lib.get_builder("mnist1d", mnist1d_data_dir)
  inputs, labels = data_lib.load_split_arrays(builder, "test")
  inputs, labels = inputs[:500], labels[:500]
  value_range = (float(inputs.min()), float(inputs.max()))
  return state, inputs, labels, value_range, history[-1]["test_accuracy"]


# ---------------------------------------------------------------------------------------------
# The attacks' constraints.


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attacks_stay_inside_the_ball_and_the_range(random_mlp, norm):
  """FGSM and PGD results lie in the epsilon ball (per element for L-inf, per example over all
  elements for L2) and in [0, 1]; FGSM goes all the way to the ball's surface where it is not
  clipped, and PGD moves the inputs too."""
  model, variables, inputs, labels = random_mlp
  epsilon = 0.1
  results = {
      "fgsm": adversarial.fgsm(model.apply, variables, inputs, labels, epsilon=epsilon,
                               norm=norm),
      "pgd": adversarial.pgd(model.apply, variables, inputs, labels, epsilon=epsilon,
                             num_steps=5, norm=norm, key=jax.random.PRNGKey(0)),
  }
  for name, attacked in results.items():
    attacked = np.asarray(attacked)
    assert attacked.shape == inputs.shape and attacked.dtype == inputs.dtype, name
    delta = attacked - inputs
    if norm == "linf":
      assert np.abs(delta).max() <= epsilon + 1e-6, name
    else:
      assert np.sqrt((delta ** 2).sum(axis=1)).max() <= epsilon + 1e-6, name
    assert attacked.min() >= 0.0 and attacked.max() <= 1.0, name
    assert np.abs(delta).max() > 0.5 * (epsilon if norm == "linf" else epsilon / np.sqrt(12))
  delta = np.asarray(results["fgsm"]) - inputs
  interior = (inputs > epsilon) & (inputs < 1 - epsilon)  # no step of size epsilon is clipped
  if norm == "linf":
    np.testing.assert_allclose(np.abs(delta[interior]), epsilon, rtol=1e-5)
  else:
    unclipped = interior.all(axis=1)
    assert unclipped.sum() >= 3
    np.testing.assert_allclose(np.sqrt((delta[unclipped] ** 2).sum(axis=1)), epsilon, rtol=1e-5)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_epsilon_zero_leaves_inputs_unchanged(random_mlp, norm):
  model, variables, inputs, labels = random_mlp
  for attacked in [
      adversarial.fgsm(model.apply, variables, inputs, labels, epsilon=0.0, norm=norm),
      adversarial.pgd(model.apply, variables, inputs, labels, epsilon=0.0, num_steps=5, norm=norm,
                      key=jax.random.PRNGKey(0))]:
    np.testing.assert_array_equal(np.asarray(attacked), inputs)


def test_a_zero_gradient_gives_a_zero_l2_step_not_nan(random_mlp):
  """A model with all-zero parameters has constant logits, so the loss gradient is zero: the
  normalised L2 direction is then zero (safe division), not NaN."""
  model, variables, inputs, labels = random_mlp
  zeros = jax.tree.map(jnp.zeros_like, variables)
  for attacked in [
      adversarial.fgsm(model.apply, zeros, inputs, labels, epsilon=0.1, norm="l2"),
      adversarial.pgd(model.apply, zeros, inputs, labels, epsilon=0.1, num_steps=5, norm="l2",
                      random_start=False)]:
    np.testing.assert_array_equal(np.asarray(attacked), inputs)


# ---------------------------------------------------------------------------------------------
# Robust accuracy on a trained model.


def test_pgd_is_stronger_than_fgsm_and_accuracy_falls_with_epsilon(mnist1d_model):
  """On an MLP trained on MNIST-1D: epsilon 0 gives the clean accuracy; robust accuracy does not
  rise with epsilon and ends far below the clean one; PGD lowers it at least as much as FGSM."""
  state, inputs, labels, value_range, clean_accuracy = mnist1d_model
  epsilons = [0.0, 0.05, 0.1, 0.2, 0.4]
  fgsm_curve = adversarial.robust_accuracy_curve(
      state.apply_fn, state.variables(), inputs, labels, epsilons, attack="fgsm",
      value_range=value_range, batch_size=200)
  pgd_curve = adversarial.robust_accuracy_curve(
      state.apply_fn, state.variables(), inputs, labels, epsilons[1:], attack="pgd",
      value_range=value_range, batch_size=200, num_steps=10, key=jax.random.PRNGKey(0))
  predictions = np.argmax(np.asarray(state.apply_fn(state.variables(), inputs, train=False)), -1)
  # Batched under jit and eager: two programs, which may disagree on an example that ties.
  assert fgsm_curve[0] == pytest.approx(np.mean(predictions == labels), abs=1.01 / 500)
  assert clean_accuracy > 0.3  # it learnt something (10 classes)
  for curve in (fgsm_curve, [fgsm_curve[0], *pgd_curve]):
    assert all(later <= earlier + 0.01 for earlier, later in zip(curve, curve[1:])), curve
    assert curve[-1] < curve[0] - 0.2, curve
  # At small epsilon the model is nearly linear in the ball and PGD finds what FGSM finds (0.338
  # vs 0.336 at 0.05 when this was written): equal within 5 examples; at 0.2 PGD is stronger.
  for pgd_accuracy, fgsm_accuracy in zip(pgd_curve, fgsm_curve[1:]):
    assert pgd_accuracy <= fgsm_accuracy + 0.01, (pgd_curve, fgsm_curve)
  assert pgd_curve[2] < fgsm_curve[3], (pgd_curve, fgsm_curve)


# ---------------------------------------------------------------------------------------------
# Adversarial training: the train step's `adversary`.


def _robust_task(num_examples, seed, num_weak=20, weak_mean=0.4, robust_agreement=0.9):
  """Two classes, y = +-1: one robust feature equal to y in 90% of the examples (-y otherwise)
  and 20 weak ones ~ N(0.4 y, 1). Together the weak ones predict y best (~96%), but an L-inf
  change of 0.5 reverses all of them while it cannot flip the robust feature, so an attacked
  model must lean on the robust feature (~90%) (Tsipras et al., 2019)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, num_examples).astype(np.int32)
  sign = 2.0 * labels - 1.0
  robust = sign * np.where(rng.random(num_examples) < robust_agreement, 1.0, -1.0)
  weak = weak_mean * sign[:, None] + rng.normal(size=(num_examples, num_weak))
  return np.concatenate([robust[:, None], weak], axis=1).astype(np.float32), labels


def _linear_state(num_features=21):
  return jdl.create_train_state(models.MLP(hidden=(), num_classes=2), optax.adam(0.05),
                                np.zeros((1, num_features), np.float32), jax.random.PRNGKey(0))


def test_adversary_step_is_the_plain_step_at_the_perturbed_inputs():
  """With `adversary`, the step's loss and gradient are those of the plain step on the batch the
  adversary returns for the current parameters and the step's key folded with ADVERSARY_STREAM;
  shapes are kept, and `fraction` replaces exactly that share of the batch."""
  inputs, labels = _robust_task(16, seed=0)
  batch = {"input": inputs, "label": labels}
  state = _linear_state()
  state, _ = jax.jit(jdl.make_train_step())(state, batch)  # not at the initial point
  adversary = adversarial.make_adversary(0.3, attack="pgd", num_steps=3, value_range=None)
  adversarial_step = jax.jit(jdl.make_train_step(adversary=adversary))
  plain_step = jax.jit(jdl.make_train_step())
  new_state, metrics = adversarial_step(state, batch)

  key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), step_lib.ADVERSARY_STREAM)
  attacked = adversary(state.apply_fn, state.variables(), key, batch)
  assert attacked["input"].shape == inputs.shape and attacked["label"] is labels
  assert np.abs(np.asarray(attacked["input"]) - inputs).max() == pytest.approx(0.3, rel=1e-5)
  expected_state, expected_metrics = plain_step(state, attacked)
  # The attack inside the compiled step and the attack alone are two programs: a few float32
  # ulps apart in the attacked inputs, and so in the update of this linear model.
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               (new_state.params, metrics), (expected_state.params, expected_metrics))
  clean_state, clean_metrics = plain_step(state, batch)
  assert float(metrics["loss_sum"]) > float(clean_metrics["loss_sum"])  # the attack hurts
  assert not np.allclose(np.asarray(new_state.params["Dense_0"]["kernel"]),
                         np.asarray(clean_state.params["Dense_0"]["kernel"]))

  half = adversarial.make_adversary(0.3, attack="fgsm", value_range=None, fraction=0.5)
  changed = np.any(np.asarray(half(state.apply_fn, state.variables(), key, batch)["input"])
                   != inputs, axis=1)
  assert changed.sum() == 8
  none = adversarial.make_adversary(0.3, attack="fgsm", value_range=None, fraction=0.0)
  np.testing.assert_array_equal(
      np.asarray(none(state.apply_fn, state.variables(), key, batch)["input"]), inputs)


def test_adversarial_training_raises_robust_accuracy():
  """On the task above, plain training leans on the weak features and PGD at epsilon 0.5 breaks
  it; training through `adversary` (PGD, 3 steps) keeps the robust accuracy near 90%."""
  train_inputs, train_labels = _robust_task(2048, seed=1)
  test_inputs, test_labels = _robust_task(1000, seed=2)

  def train(adversary, num_steps=150, batch_size=128):
    state = _linear_state()
    train_step = jax.jit(jdl.make_train_step(adversary=adversary))
    for index in range(num_steps):
      begin = index * batch_size % len(train_labels)
      state, _ = train_step(state, {"input": train_inputs[begin:begin + batch_size],
                                    "label": train_labels[begin:begin + batch_size]})
    return state

  def robust(state, epsilon):
    return adversarial.robust_accuracy(state.apply_fn, state.variables(), test_inputs,
                                       test_labels, attack="pgd", epsilon=epsilon,
                                       value_range=None, num_steps=10, key=jax.random.PRNGKey(3))

  plain = train(None)
  robustly = train(adversarial.make_adversary(0.5, attack="pgd", num_steps=3, value_range=None))
  assert robust(plain, 0.0) > 0.93  # the weak features are the better predictor when clean
  assert robust(robustly, 0.5) > 0.8
  assert robust(robustly, 0.5) > robust(plain, 0.5) + 0.3


# ---------------------------------------------------------------------------------------------
# Bad arguments.


def test_bad_arguments_are_clear_errors(random_mlp):
  model, variables, inputs, labels = random_mlp
  fgsm = functools.partial(adversarial.fgsm, model.apply, variables, inputs, labels)
  pgd = functools.partial(adversarial.pgd, model.apply, variables, inputs, labels)
  with pytest.raises(ValueError, match="epsilon must be a finite number >= 0"):
    fgsm(epsilon=-0.1)
  with pytest.raises(ValueError, match="unknown norm 'l1'"):
    fgsm(epsilon=0.1, norm="l1")
  with pytest.raises(ValueError, match=r"lo < hi; got \(1.0, 0.0\)"):
    fgsm(epsilon=0.1, value_range=(1.0, 0.0))
  with pytest.raises(ValueError, match="outside value_range"):
    fgsm(epsilon=0.1, value_range=(0.0, 0.5))
  with pytest.raises(ValueError, match="unknown loss 'hinge'"):
    fgsm(epsilon=0.1, loss="hinge")
  with pytest.raises(ValueError, match="floating batch"):
    adversarial.fgsm(model.apply, variables, inputs.astype(np.int32), labels, epsilon=0.1)
  with pytest.raises(ValueError, match=r"labels must be \[batch\]"):
    adversarial.fgsm(model.apply, variables, inputs, labels[:3], epsilon=0.1)
  with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
    pgd(epsilon=0.1, num_steps=0, key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="needs a PRNG key"):
    pgd(epsilon=0.1)
  with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
    pgd(epsilon=0.1, step_size=0.0, key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="unknown attack 'cw'"):
    adversarial.robust_accuracy(model.apply, variables, inputs, labels, attack="cw", epsilon=0.1)
  with pytest.raises(ValueError, match=r"fgsm takes no options \['num_steps'\]"):
    adversarial.robust_accuracy(model.apply, variables, inputs, labels, attack="fgsm",
                                epsilon=0.1, num_steps=3)
  with pytest.raises(ValueError, match="fraction must be in"):
    adversarial.make_adversary(0.1, fraction=1.5)
  with pytest.raises(ValueError, match="epsilon must be"):
    adversarial.make_adversary(float("nan"))


def test_config_adversarial_trains_on_attacked_batches(tmp_path, mnist1d_data_dir):
  """`config.adversarial.epsilon > 0` makes `train_and_evaluate` train on attacked batches: the
  same seed without it gives other parameters, and evaluation stays on clean data."""
  base = [f"data_dir={mnist1d_data_dir}", "model.name=mlp", "model.mlp.hidden=(16,)",
          "num_steps=8", "eval_every_steps=8", "progress=false", "layout=none", "checkpoint=false"]
  attacked = jdl.apply_overrides(mnist1d.get_config(), base + [
      "adversarial.epsilon=0.1", "adversarial.attack=fgsm", "adversarial.value_range=(-10.0, 10.0)"])
  plain = jdl.apply_overrides(mnist1d.get_config(), base)
  with_attack, history = jdl.train_and_evaluate(attacked, str(tmp_path / "attacked"))
  without, _ = jdl.train_and_evaluate(plain, str(tmp_path / "plain"))
  assert np.isfinite(history[-1]["test_loss"])
  differences = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), with_attack.params,
                             without.params)
  assert max(jax.tree.leaves(differences)) > 0
