"""The fit loop: history, exact evaluation, hooks, resumption and bad labels."""

import jax
import numpy as np
import optax
import pytest

import jdl
from jdl import data as data_lib
from jdl import models, resident


def _problem(n=90, num_classes=3, seed=0):
  """A learnable toy problem: the label is the argmax of a fixed projection of the input."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 6)).astype(np.float32)
  y = (x @ rng.normal(size=(6, num_classes))).argmax(1).astype(np.int32)
  return x, y


def _setup(batch_size=16, seed=0):
  x, y = _problem()
  train = data_lib.ArraySource(x[:60], y[:60], batch_size, shuffle=True, seed=seed)
  test = data_lib.ArraySource(x[60:], y[60:], 7, shuffle=False)  # 30 = 4 * 7 + 2: padded
  state = jdl.create_train_state(models.MLP(hidden=(16,), num_classes=3), optax.adam(0.05),
                                 x[:1], jax.random.PRNGKey(seed))
  train_step, eval_step = jdl.make_steps()
  return state, train_step, eval_step, train, test, (x[60:], y[60:])


def test_fit_learns_and_records_one_entry_per_epoch(tmp_path):
  """History has one record per epoch with train and test metrics, and they go to metrics.jsonl."""
  state, train_step, eval_step, train, test, _ = _setup()
  calls = []
  with jdl.MetricWriter(str(tmp_path)) as writer:
    state, history = jdl.fit(state, train_step, eval_step, train, test, num_epochs=8,
                             hooks=[lambda step, s, record: calls.append((step, int(s.step)))],
                             writer=writer, progress=False)
  assert [r["step"] for r in history] == [4 * (i + 1) for i in range(8)]  # 60 / 16 -> 4 steps
  assert calls == [(r["step"], r["step"]) for r in history]
  assert history[-1]["test_accuracy"] > 0.8
  assert history[-1]["train_loss"] < history[0]["train_loss"]
  assert all(r["examples_per_second"] > 0 for r in history)
  written = jdl.read_jsonl(str(tmp_path))
  assert [w["test_accuracy"] for w in written] == pytest.approx([r["test_accuracy"] for r in history])


def test_evaluation_is_exact_over_the_whole_split():
  """The eval metrics equal the metrics computed on the whole test array at once."""
  state, train_step, eval_step, train, test, (x_test, y_test) = _setup()
  state, history = jdl.fit(state, train_step, eval_step, train, test, num_epochs=2, progress=False)
  logits = state.apply_fn(state.variables(), x_test, train=False)
  accuracy = float((np.asarray(logits).argmax(1) == y_test).mean())
  loss = float(jdl.softmax_cross_entropy(logits, y_test).mean())
  # The compiled evaluation and this eager one are two programs: the loss agrees to float32
  # rounding and the accuracy to the example (30 of them; padding counted would move it more).
  assert history[-1]["test_accuracy"] == pytest.approx(accuracy, abs=1.01 / 30)
  assert history[-1]["test_loss"] == pytest.approx(loss, rel=1e-5)


def test_num_steps_and_eval_every_steps():
  """num_steps wins over epochs; evaluation every k steps and at the last step."""
  state, train_step, eval_step, train, test, _ = _setup()
  state, history = jdl.fit(state, train_step, eval_step, train, test, num_steps=10,
                           eval_every_steps=3, progress=False)
  assert [r["step"] for r in history] == [3, 6, 9, 10]
  assert int(state.step) == 10


def test_resuming_mid_epoch_equals_an_uninterrupted_run():
  """fit continues from state.step with the same data order: 4 + 6 steps equal 10 steps."""
  state, train_step, eval_step, train, test, _ = _setup()
  straight, _ = jdl.fit(state, train_step, eval_step, train, None, num_steps=10, progress=False)
  state, train_step, eval_step, train, test, _ = _setup()
  half, _ = jdl.fit(state, train_step, eval_step, train, None, num_steps=5, progress=False)
  resumed, _ = jdl.fit(half, train_step, eval_step, train, None, num_steps=10, progress=False)
  jax.tree.map(np.testing.assert_array_equal, straight.params, resumed.params)


def test_label_out_of_range_for_the_model_fails_clearly():
  """A label >= the model's number of classes is an error naming the label and the range."""
  x, y = _problem()
  y = y.copy()
  y[5] = 7
  train = data_lib.ArraySource(x, y, 16, shuffle=False)
  state = jdl.create_train_state(models.MLP(hidden=(4,), num_classes=3), optax.sgd(0.1), x[:1],
                                 jax.random.PRNGKey(0))
  train_step, eval_step = jdl.make_steps()
  with pytest.raises(ValueError, match=r"found \[7\].*3 classes.*\[0, 2\]"):
    jdl.fit(state, train_step, eval_step, train, None, num_epochs=1, progress=False)


def test_non_numeric_or_empty_batches_fail_clearly():
  """A source that yields strings or empty batches is stopped with a message naming the problem."""
  state, train_step, eval_step, train, test, _ = _setup()

  class BadSource:
    num_examples, batch_size, steps_per_epoch = 2, 2, 1

    def __init__(self, inputs):
      self.inputs = inputs

    def epoch(self, index):
      del index
      yield {"input": self.inputs, "label": np.zeros(len(self.inputs), np.int32),
             "mask": np.ones(len(self.inputs), bool)}

  with pytest.raises(ValueError, match="training inputs must be numeric"):
    jdl.fit(state, train_step, eval_step, BadSource(np.array([["a"] * 6] * 2)), None,
            num_epochs=1, progress=False)
  with pytest.raises(ValueError, match="training inputs are empty"):
    jdl.fit(state, train_step, eval_step, BadSource(np.zeros((0, 6), np.float32)), None,
            num_epochs=1, progress=False)


def _assert_same_training(run, reference):
  """Two runs of the same steps on the same batches by different programs (the resident loop
  and the per-step engine compile the step into different programs, which XLA may fuse and
  vectorise differently, with AVX2 or AVX-512 widths): each step may round a few float32 ulps
  differently, and over a few dozen Adam steps on this well-conditioned toy problem that stays
  far below a relative 1e-5. Accuracies count examples; they may differ by one example whose
  logits tie to rounding, no more."""
  (state, history), (ref_state, ref_history) = run, reference
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, state.params, ref_state.params)
  jax.tree.map(close, state.opt_state, ref_state.opt_state)
  assert int(state.step) == int(ref_state.step)
  assert [r["step"] for r in history] == [r["step"] for r in ref_history]
  for key in ("train_loss", "test_loss"):
    if key in ref_history[-1]:
      np.testing.assert_allclose([r[key] for r in history], [r[key] for r in ref_history],
                                 rtol=1e-5, err_msg=key)
  for key in ("train_accuracy", "test_accuracy"):
    if key in ref_history[-1]:
      np.testing.assert_allclose([r[key] for r in history], [r[key] for r in ref_history],
                                 atol=1 / 16 + 1e-9, err_msg=key)  # one example of a batch


def test_fit_without_evaluation_trains_with_either_engine():
  """No eval data and no eval step: each engine trains, and they agree."""
  runs = []
  for device_resident in (True, False):
    state, train_step, _, train, _, _ = _setup()  # fit donates the state: a new one each run
    runs.append(jdl.fit(state, train_step, None, train, None, num_steps=8, progress=False,
                        device_resident=device_resident))
  history = runs[0][1]
  assert [r["step"] for r in history] == [4, 8] and "test_accuracy" not in history[-1]
  _assert_same_training(*runs)


def test_fit_needs_a_length():
  """Neither epochs nor steps is an error."""
  state, train_step, eval_step, train, test, _ = _setup()
  with pytest.raises(ValueError, match="num_epochs or num_steps"):
    jdl.fit(state, train_step, eval_step, train, test)


def _interrupted_run(resident, steps_per_call=None, progress=False):
  """6 steps, then a second `fit` to 14 (a resume in the middle of the second epoch), evaluating
  every 5 steps; returns the final state and the records of both."""
  state, train_step, eval_step, train, test, _ = _setup()
  kwargs = dict(eval_every_steps=5, progress=progress, device_resident=resident,
                steps_per_call=steps_per_call)
  state, first = jdl.fit(state, train_step, eval_step, train, test, num_steps=6, **kwargs)
  state, second = jdl.fit(state, train_step, eval_step, train, test, num_steps=14, **kwargs)
  return state, first + second


@pytest.fixture(scope="module")
def per_step_run():
  return _interrupted_run(resident=False)


@pytest.mark.parametrize("steps_per_call,progress", [(None, False), (3, True)])
def test_device_resident_engine_equals_the_per_step_loop(per_step_run, steps_per_call, progress):
  """The resident engine (whole splits on the device, a compiled loop over steps) gives the
  parameters, losses and eval metrics of the per-step host loop for the same seed, including a
  padded last batch (60 = 3 * 16 + 12), a resume in the middle of an epoch, and calls that cross
  epoch ends (4 steps an epoch; without a progress bar a call runs to the next evaluation) or
  stop every 3 steps."""
  run = _interrupted_run(True, steps_per_call, progress)
  assert [r["step"] for r in run[1]] == [5, 6, 10, 14]
  _assert_same_training(run, per_step_run)


def test_device_resident_needs_in_memory_sources():
  """Forcing the resident engine on a streaming source is a clear error."""
  state, train_step, eval_step, train, test, (x, y) = _setup()
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  stream = data_lib.TFDataSource(tf.data.Dataset.from_tensor_slices((x, y)), len(y), 10, shuffle=False)
  with pytest.raises(ValueError, match="device_resident=True needs in-memory sources"):
    jdl.fit(state, train_step, eval_step, stream, None, num_steps=2, progress=False,
            device_resident=True)


def test_convolutions_on_the_cpu_run_one_step_per_call_and_still_match_the_per_step_loop():
  """On the CPU a convolution inside a compiled loop is many times slower, so the resident engine
  detects convolutions in the traced step and runs one step per call (no loop), still on
  device-resident data and with the per-step loop's results."""
  x, y = _problem(n=40)
  images = np.tile(x[:, :, None, None], (1, 1, 6, 1))  # [40, 6, 6, 1]
  model = models.CNN(num_classes=3, features=(2,), dense=4)
  train_step, eval_step = jdl.make_steps()
  state = jdl.create_train_state(model, optax.adam(0.05), images[:1], jax.random.PRNGKey(0))
  batch = resident.gather_batch(images, y, np.zeros((8,), np.int32))
  on_cpu = jax.default_backend() == "cpu"
  assert resident.loops_are_slow(train_step, state, batch) == on_cpu
  mlp_state, _, _, _, _, _ = _setup()
  mlp_batch = resident.gather_batch(x[:8, :6], y[:8], np.zeros((8,), np.int32))
  assert not resident.loops_are_slow(train_step, mlp_state, mlp_batch)

  results = []
  for device_resident in (False, True):
    start = jdl.create_train_state(model, optax.adam(0.05), images[:1], jax.random.PRNGKey(0))
    train = data_lib.ArraySource(images[:32], y[:32], 8, shuffle=True)
    test = data_lib.ArraySource(images[32:], y[32:], 3, shuffle=False)
    engine = resident.ResidentEngine(train_step, eval_step, train, test) if device_resident else None
    if engine is not None:
      _, _, advanced = engine.advance(start, 0, 4)
      assert advanced == (1 if on_cpu else 4) and engine.loop == (not on_cpu)
      start = jdl.create_train_state(model, optax.adam(0.05), images[:1], jax.random.PRNGKey(0))
    results.append(jdl.fit(start, train_step, eval_step, train, test, num_steps=6,
                           eval_every_steps=4, progress=False, device_resident=device_resident))
  _assert_same_training(*results)


# Random initial values computed by two programs (the state's compiled init and flax's `init`
# under `jax.jit`, or a jit and a vmap) may round differently: a few float32 ulps of values of
# order 1.
INIT_CLOSE = dict(rtol=2e-6, atol=1e-7)


def test_create_train_state_gives_the_flax_and_optax_initial_values():
  """The state holds what `model.init` and `tx.init` give with the documented split of the key,
  up to float rounding: parameters, model state (BatchNorm statistics) and optimizer state."""
  model = models.MLP(hidden=(8,), num_classes=3, normalization="batch", dropout_rate=0.1)
  sample = np.zeros((1, 6), np.float32)
  tx = optax.adam(1e-3)
  state = jdl.create_train_state(model, tx, sample, jax.random.PRNGKey(5))
  init_key, dropout_key, _ = jax.random.split(jax.random.PRNGKey(5), 3)
  variables = dict(jax.jit(lambda rngs: model.init(rngs, sample, train=False))(
      {"params": init_key, "dropout": dropout_key}))
  params = variables.pop("params")
  close = lambda a, b: np.testing.assert_allclose(a, b, **INIT_CLOSE)
  jax.tree.map(close, state.params, params)
  jax.tree.map(close, state.model_state, variables)
  jax.tree.map(close, state.opt_state, tx.init(params))
  assert set(state.model_state) == {"batch_stats"}
  other = jdl.create_train_state(model, tx, sample, jax.random.PRNGKey(6))
  assert not np.allclose(other.params["Dense_0"]["kernel"], state.params["Dense_0"]["kernel"])


def test_create_train_state_can_be_traced_inside_jit_and_vmap():
  """Inside a traced function (as vmapped sweeps build their states) the init is traced into
  it; each vmapped state is the one built alone with its key."""
  model = models.MLP(hidden=(4,), num_classes=3)
  sample = np.zeros((1, 6), np.float32)
  make = lambda key: jdl.create_train_state(model, optax.sgd(0.1), sample, key).params
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  stacked = jax.jit(jax.vmap(make))(keys)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[1], b, **INIT_CLOSE),
               stacked, make(keys[1]))


