"""The pure train and eval steps: gradients, masking, determinism and input checks."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import jdl
from jdl import augment as augment_lib
from jdl import models, parallel
from jdl import losses as losses_lib
from jdl import metrics as metrics_lib
from jdl import step as step_lib


def _state(model, tx, input_shape=(6,), seed=0):
  return jdl.create_train_state(model, tx, np.zeros((1, *input_shape), np.float32),
                                jax.random.PRNGKey(seed))


def _batch(n, input_shape=(6,), num_classes=3, seed=0, mask=None):
  rng = np.random.default_rng(seed)
  batch = {
      "input": rng.normal(size=(n, *input_shape)).astype(np.float32),
      "label": rng.integers(0, num_classes, size=n).astype(np.int32),
  }
  if mask is not None:
    batch["mask"] = np.asarray(mask)
  return batch


def _gradient_from_sgd_step(state, train_step, batch):
  """With plain SGD at learning rate 1, params - new_params is exactly the gradient."""
  new_state, _ = train_step(state, batch)
  return jax.tree.map(lambda a, b: a - b, state.params, new_state.params)


def test_train_step_gradient_matches_finite_differences():
  """The gradient the step applies equals central finite differences of the batch loss (float64)."""
  with jax.enable_x64():
    model = models.MLP(hidden=(4,), num_classes=3, activation="tanh")
    state = _state(model, optax.sgd(1.0))
    state = state.replace(params=jax.tree.map(lambda p: p.astype(jnp.float64), state.params))
    batch = jax.tree.map(jnp.asarray, _batch(5))
    batch["input"] = batch["input"].astype(jnp.float64)
    l2 = 0.01
    train_step = jax.jit(jdl.make_train_step(weight_penalty=jdl.make_weight_penalty(l2=l2)))
    applied = _gradient_from_sgd_step(state, train_step, batch)

    def loss(params):
      logits = model.apply({"params": params}, batch["input"], train=True)
      penalty = l2 * losses_lib.l2_penalty(params)
      return jnp.mean(jdl.softmax_cross_entropy(logits, batch["label"])) + penalty

    flat, unravel = ravel_pytree(state.params)
    eps = 1e-6
    # Both sides of every central difference, as one compiled, vmapped loss (float64).
    bumps = jnp.concatenate([jnp.eye(flat.size), -jnp.eye(flat.size)]) * eps
    values = jax.jit(jax.vmap(lambda bump: loss(unravel(flat + bump))))(bumps)
    numeric = np.asarray(values[:flat.size] - values[flat.size:]) / (2 * eps)
    np.testing.assert_allclose(ravel_pytree(applied)[0], numeric, rtol=1e-5, atol=1e-9)


def test_padded_batch_gives_the_update_of_its_real_examples():
  """Padding masked out of a batch changes neither the update nor the metrics."""
  model = models.MLP(hidden=(8,), num_classes=3)
  state = _state(model, optax.sgd(0.1))
  real = _batch(5)
  padded = jdl.data.pad_batch(real["input"], real["label"], 8)
  padded["input"][5:] = 100.0  # garbage in the padding must not matter
  train_step = jax.jit(jdl.make_train_step())
  state_real, metrics_real = train_step(state, real)
  state_padded, metrics_padded = train_step(state, padded)
  # Batches of 5 and 8 rows compile to two programs whose sums over rows may round differently.
  chex_close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
  jax.tree.map(chex_close, state_real.params, state_padded.params)
  jax.tree.map(chex_close, metrics_real, metrics_padded)
  assert int(metrics_padded["count"]) == 5


def test_mini_batch_gradient_is_the_mean_of_stochastic_gradients():
  """Batch, mini-batch and stochastic gradient descent differ only in batch size: the gradient of
  a batch is the mean of its one-example gradients."""
  model = models.MLP(hidden=(8,), num_classes=3)
  state = _state(model, optax.sgd(1.0))
  train_step = jax.jit(jdl.make_train_step())
  batch = _batch(4)
  full = _gradient_from_sgd_step(state, train_step, batch)
  singles = [
      _gradient_from_sgd_step(state, train_step, {k: v[i:i + 1] for k, v in batch.items()})
      for i in range(4)
  ]
  mean_single = jax.tree.map(lambda *g: sum(g) / 4, *singles)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), full, mean_single)


def test_same_seed_gives_identical_parameters_and_training():
  """Two runs from the same seed are bitwise identical; another seed differs."""
  model = models.MLP(hidden=(16,), num_classes=3, dropout_rate=0.5)
  train_step = jax.jit(jdl.make_train_step())

  def run(seed):
    state = _state(model, optax.adam(1e-2), seed=seed)
    for i in range(3):
      state, _ = train_step(state, _batch(8, seed=i))
    return state.params

  first, second, other = run(0), run(0), run(1)
  jax.tree.map(np.testing.assert_array_equal, first, second)
  assert not np.array_equal(first["Dense_0"]["kernel"], other["Dense_0"]["kernel"])


def test_dropout_is_on_in_training_and_off_in_evaluation():
  """Eval is deterministic; training draws a fresh dropout mask every step."""
  model = models.MLP(hidden=(64,), num_classes=3, dropout_rate=0.5)
  state = _state(model, optax.sgd(0.0))
  batch = _batch(16)
  eval_step = jax.jit(jdl.make_eval_step())
  assert jax.tree.map(float, eval_step(state, batch)) == jax.tree.map(float, eval_step(state, batch))
  train_step = jax.jit(jdl.make_train_step())
  state1, metrics1 = train_step(state, batch)
  _, metrics2 = train_step(state1, batch)  # learning rate 0: same params, next step's key
  assert float(metrics1["loss_sum"]) != float(metrics2["loss_sum"])


def test_model_state_is_updated_by_training_and_used_in_evaluation():
  """Mutable collections (BatchNorm statistics) come back from the step and change."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  class WithBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
      x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
      return nn.Dense(3)(x)

  state = _state(WithBatchNorm(), optax.sgd(0.1))
  assert "batch_stats" in state.model_state
  new_state, _ = jax.jit(jdl.make_train_step())(state, _batch(8))
  before = state.model_state["batch_stats"]["BatchNorm_0"]["mean"]
  after = new_state.model_state["batch_stats"]["BatchNorm_0"]["mean"]
  assert not np.allclose(before, after)
  assert int(new_state.step) == 1


@pytest.mark.parametrize(
    "batch, message",
    [
        ({"input": np.zeros((4, 7), np.float32), "label": np.zeros(4, np.int32)}, r"does not fit the model"),
        ({"input": np.zeros((0, 6), np.float32), "label": np.zeros(0, np.int32)}, "empty batch"),
        ({"input": np.zeros((4, 6), np.float32)}, r"targets from batch\['label'\]"),
        ({"input": np.zeros((4, 6), np.float32), "label": np.zeros(3, np.int32)}, "do not fit outputs"),
        ({"input": np.zeros((4, 6), np.float32), "label": np.zeros((4, 1), np.int32)},
         "do not fit outputs"),
        ({"input": np.zeros((4, 6), np.float32), "label": np.zeros(4, np.float32)},
         "integer class labels"),
        ({"input": np.zeros((4, 6), np.float32), "label": np.zeros(4, np.int32),
          "mask": np.ones(3, bool)}, "'mask' has shape"),
    ],
)
def test_bad_batches_fail_while_tracing_with_clear_messages(batch, message):
  """Shape mistakes are caught at trace time with a message naming the shapes."""
  state = _state(models.MLP(hidden=(4,), num_classes=3), optax.sgd(0.1))
  with pytest.raises(ValueError, match=message):
    jax.jit(jdl.make_train_step())(state, batch)
  with pytest.raises(ValueError, match=message):
    jax.jit(jdl.make_eval_step())(state, batch)


def test_non_numeric_batch_is_rejected():
  """A batch of strings cannot reach the device; the host-side check names the problem."""
  with pytest.raises(ValueError, match="numeric"):
    jdl.data.check_inputs(np.array([["a", "b"]]))


def test_create_train_state_rejects_a_sample_without_batch_dimension():
  """sample_input must carry a leading batch dimension."""
  with pytest.raises(ValueError, match="leading batch dimension"):
    jdl.create_train_state(models.MLP(hidden=(), num_classes=2), optax.sgd(0.1),
                           np.zeros((0, 3), np.float32), jax.random.PRNGKey(0))


# ---------------------------------------------------------------------------------------------
# Augmentation inside the step, and mixup's blended loss.


def test_augmenting_step_equals_plain_step_on_the_augmented_batch():
  """The step augments with its own key, `fold_in(fold_in(rng, step), AUGMENT_STREAM)`: the result
  is that of a plain step on the batch augmented outside with that key, and dropout's key is
  unchanged (the state without augmentation keeps its trajectory)."""
  spec = {"crop_padding": 1, "flip": True, "cutout_size": 2, "brightness": 0.1}
  augment = augment_lib.make_augment(spec)
  model = models.MLP(hidden=(8,), num_classes=3, dropout_rate=0.5)  # flattens the images
  state = _state(model, optax.sgd(0.1), input_shape=(6, 6, 1))
  state = state.replace(step=jnp.asarray(3, state.step.dtype))
  batch = jax.tree.map(jnp.asarray, _batch(4, input_shape=(6, 6, 1)))
  batch["input"] = jnp.abs(batch["input"]) / 4  # inside the value range (0, 1)

  augmenting = jax.jit(jdl.make_train_step(augment=augment))
  plain = jax.jit(jdl.make_train_step())
  new_state, metrics = augmenting(state, batch)
  key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), step_lib.AUGMENT_STREAM)
  expected_state, expected_metrics = plain(state, jax.jit(augment)(key, batch))
  # Augmenting inside the compiled step and before it are two programs: the same draws, and
  # results a few float32 ulps apart.
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, new_state.params, expected_state.params)
  jax.tree.map(close, metrics, expected_metrics)
  unaugmented, _ = plain(state, batch)
  assert not np.array_equal(ravel_pytree(unaugmented.params)[0],
                            ravel_pytree(new_state.params)[0])


def test_mixup_batch_trains_on_the_weighted_sum_of_both_losses():
  """With `mix_label` and `mix_weight` the gradient is that of
  mean(w * CE(label) + (1 - w) * CE(mix_label)), padding excluded."""
  model = models.MLP(hidden=(4,), num_classes=3)
  state = _state(model, optax.sgd(1.0))
  batch = jax.tree.map(jnp.asarray, _batch(5, mask=[True, True, True, True, False]))
  batch["mix_label"] = (batch["label"] + 1) % 3
  batch["mix_weight"] = jnp.asarray([1.0, 0.7, 0.5, 0.0, 0.3])
  applied = _gradient_from_sgd_step(state, jax.jit(jdl.make_train_step()), batch)

  def loss(params):
    logits = model.apply({"params": params}, batch["input"][:4], train=True)
    w = batch["mix_weight"][:4]
    per_example = (w * jdl.softmax_cross_entropy(logits, batch["label"][:4])
                   + (1 - w) * jdl.softmax_cross_entropy(logits, batch["mix_label"][:4]))
    return jnp.mean(per_example)

  expected = jax.jit(jax.grad(loss))(state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               applied, expected)
  with pytest.raises(ValueError, match="'mix_weight'"):
    jdl.make_train_step()(state, {k: v for k, v in batch.items() if k != "mix_weight"})


def test_augmentation_is_the_same_sharded_over_8_devices_and_on_one():
  """On-device augmentation draws for the global batch, so the sharded step equals one device."""
  devices = jax.devices()
  if len(devices) < 8:
    pytest.skip("needs 8 devices")
  augment = augment_lib.make_augment({"crop_padding": 1, "flip": True, "mixup_alpha": 0.4})
  model = models.MLP(hidden=(8,), num_classes=3)  # flattens the images
  state = _state(model, optax.sgd(0.1), input_shape=(6, 6, 1))
  batch = jax.tree.map(jnp.asarray, _batch(16, input_shape=(6, 6, 1)))
  batch["input"] = jnp.abs(batch["input"]) / 4
  step = jdl.make_train_step(augment=augment)
  single, single_metrics = jax.jit(step)(state, batch)
  runner = parallel.make_runner("shard", num_devices=8, batch_size=16)
  compiled, _ = runner.compile(step, jdl.make_eval_step())
  sharded, sharded_metrics = compiled(runner.place_state(state), runner.place_batch(batch))
  sharded = runner.fetch_state(sharded)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               single.params, sharded.params)
  np.testing.assert_allclose(runner.fetch_metrics(sharded_metrics)["loss_sum"],
                             single_metrics["loss_sum"], rtol=1e-5)


def _dot_operand_dtypes(fn, *args):
  """The operand dtypes of every matrix product in `fn`'s jaxpr (forward and backward)."""
  found = set()

  def visit(jaxpr):
    for equation in jaxpr.eqns:
      if equation.primitive.name == "dot_general":
        found.add(tuple(str(v.aval.dtype) for v in equation.invars))
      for sub in jax.extend.core.jaxprs_in_params(equation.params):
        visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_bfloat16_compute_trains_and_keeps_float32_master_weights():
  """compute_dtype=bfloat16: every matrix product runs in bfloat16, the loss falls, and the
  parameters, optimizer state and BatchNorm statistics stay float32."""
  model = models.MLP(hidden=(16,), num_classes=3, normalization="batch")
  state = _state(model, optax.adam(1e-2))
  batch = jax.tree.map(jnp.asarray, _batch(64))
  batch["label"] = jnp.argmax(batch["input"][:, :3], axis=1)  # learnable
  train_step = jdl.make_train_step(compute_dtype="bfloat16")
  assert _dot_operand_dtypes(train_step, state, batch) == {("bfloat16", "bfloat16")}
  step = jax.jit(train_step)
  losses = []
  for _ in range(40):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss_sum"] / metrics["count"]))
  assert losses[-1] < 0.3 * losses[0]
  for leaf in jax.tree.leaves((state.params, state.opt_state, state.model_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  eval_step = jdl.make_eval_step(compute_dtype=jnp.bfloat16)
  metrics = jax.jit(eval_step)(state, batch)
  assert metrics["loss_sum"].dtype == jnp.float32
  np.testing.assert_allclose(metrics["loss_sum"] / 64, losses[-1], rtol=0.3)


def test_bfloat16_and_float32_steps_agree_to_bfloat16_precision():
  """One step in bfloat16 moves the parameters almost as the float32 step does."""
  model = models.MLP(hidden=(16,), num_classes=3)
  state = _state(model, optax.sgd(0.1))
  batch = jax.tree.map(jnp.asarray, _batch(32))
  full, _ = jax.jit(jdl.make_train_step())(state, batch)
  half, _ = jax.jit(jdl.make_train_step(compute_dtype=jnp.bfloat16))(state, batch)
  delta_full, _ = ravel_pytree(jax.tree.map(jnp.subtract, full.params, state.params))
  delta_half, _ = ravel_pytree(jax.tree.map(jnp.subtract, half.params, state.params))
  assert not np.array_equal(delta_full, delta_half)  # it did compute in bfloat16
  np.testing.assert_allclose(delta_half, delta_full, atol=0.05 * float(jnp.abs(delta_full).max()))


def test_compute_dtype_must_be_floating():
  """An integer or unknown compute dtype is refused with the usual choices."""
  with pytest.raises(ValueError, match="compute_dtype must be a floating dtype"):
    jdl.make_train_step(compute_dtype="int8")
  with pytest.raises(ValueError, match="compute_dtype must be a floating dtype"):
    jdl.make_eval_step(compute_dtype="bf16")
  with pytest.raises(ValueError, match="float16 needs loss scaling"):
    jdl.make_train_step(compute_dtype="float16")
  assert jdl.step.check_compute_dtype("auto") == (
      jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)


def test_per_token_labels_train_on_the_mean_loss_over_real_tokens():
  """A language model's `[batch, time]` labels: the step's gradient is that of the mean per-token
  cross-entropy over the real rows (a padding row, garbage in it, changes nothing), and the
  metrics count real tokens."""
  model = models.TransformerLM(num_classes=7, block_size=5, num_layers=1, num_heads=2, width=8)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 7, size=(5, 6)).astype(np.int32)
  padded = {"input": tokens[:, :-1], "label": tokens[:, 1:], "mask": np.array([True] * 4 + [False])}
  state = _state_for(model, tokens[:1, :-1])
  train_step = jax.jit(jdl.make_train_step())
  applied = _gradient_from_sgd_step(state, train_step, padded)

  def mean_token_loss(params):  # over the 4 real rows only
    logits = model.apply({"params": params}, padded["input"][:4], train=False)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, padded["label"][:4]))

  expected = jax.jit(jax.grad(mean_token_loss))(state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), applied, expected)
  _, metrics = train_step(state, padded)
  assert int(metrics["count"]) == 4 * 5


def test_token_model_refuses_float_inputs():
  """A model initialised on integer token ids fails clearly when fed real values."""
  model = models.TransformerLM(num_classes=7, block_size=5, num_layers=1, num_heads=2, width=8)
  state = _state_for(model, np.zeros((1, 5), np.int32))
  batch = {"input": np.zeros((2, 5), np.float32), "label": np.zeros((2, 5), np.int32)}
  with pytest.raises(ValueError, match="initialised with int32 inputs; token ids must be integers"):
    jdl.make_train_step()(state, batch)


def _state_for(model, sample):
  return jdl.create_train_state(model, optax.sgd(1.0), sample, jax.random.PRNGKey(0))


@pytest.mark.parametrize("penalty", [None, 1e-3])
def test_four_micro_batches_in_one_step_equal_one_step_on_the_whole_batch(penalty):
  """Gradient accumulation inside the step: 4 micro-batches of 4 (the last one partly padding)
  give the parameters, optimizer state and metrics of one step on the 16 examples."""
  model = models.MLP(hidden=(8,), num_classes=3)
  state = _state(model, optax.adam(0.1))
  batch = jdl.data.pad_batch(*(lambda b: (b["input"], b["label"]))(_batch(13)), 16)
  penalty = penalty and jdl.make_weight_penalty(l2=penalty)
  whole, whole_sums = jax.jit(jdl.make_train_step(weight_penalty=penalty))(state, batch)
  parts, parts_sums = jax.jit(jdl.make_train_step(weight_penalty=penalty, microbatches=4))(
      state, batch)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, (whole.params, whole.opt_state), (parts.params, parts.opt_state))
  assert int(parts_sums["count"]) == int(whole_sums["count"]) == 13
  close(parts_sums["loss_sum"], whole_sums["loss_sum"])
  assert int(parts_sums["accuracy_sum"]) == int(whole_sums["accuracy_sum"])
  with pytest.raises(ValueError, match="cannot be split into 3 equal micro-batches"):
    jax.jit(jdl.make_train_step(microbatches=3))(state, batch)
