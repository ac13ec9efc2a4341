"""The fit loop: history, exact evaluation, hooks, resumption and bad labels."""

import jax
import numpy as np
import optax
import pytest

import jdl
from jdl import data as data_lib
from jdl import models


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
  train_step, eval_step = jdl.make_classification_steps()
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
  assert history[-1]["test_accuracy"] == accuracy
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
  train_step, eval_step = jdl.make_classification_steps()
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


@pytest.mark.parametrize("device_resident", [True, False])
def test_fit_without_evaluation_trains_with_either_engine(device_resident):
  """No eval data and no eval step: each engine trains, and agrees with the other."""
  state, train_step, _, train, _, _ = _setup()
  trained, history = jdl.fit(state, train_step, None, train, None, num_steps=8, progress=False,
                             device_resident=device_resident)
  state, _, _, train, _, _ = _setup()  # fit donated the first state
  reference, _ = jdl.fit(state, train_step, None, train, None, num_steps=8, progress=False,
                         device_resident=not device_resident)
  assert [r["step"] for r in history] == [4, 8] and "test_accuracy" not in history[-1]
  for a, b in zip(jax.tree.leaves(trained.params), jax.tree.leaves(reference.params)):
    np.testing.assert_array_equal(a, b)


def test_fit_needs_a_length():
  """Neither epochs nor steps is an error."""
  state, train_step, eval_step, train, test, _ = _setup()
  with pytest.raises(ValueError, match="num_epochs or num_steps"):
    jdl.fit(state, train_step, eval_step, train, test)


@pytest.mark.parametrize("steps_per_call,progress", [(None, False), (3, False), (None, True)])
def test_device_resident_scan_equals_the_per_step_loop(steps_per_call, progress):
  """The resident engine (whole splits on the device, lax.scan over steps) gives bitwise the
  parameters, losses and eval metrics of the per-step host loop for the same seed, including a
  padded last batch (60 = 3 * 16 + 12), a resume in the middle of an epoch, and calls that cross
  epoch ends (4 steps an epoch; without a progress bar a call runs to the next evaluation)."""
  runs = []
  for resident in (False, True):
    state, train_step, eval_step, train, test, _ = _setup()
    state, first = jdl.fit(state, train_step, eval_step, train, test, num_steps=6,
                           eval_every_steps=5, progress=progress, device_resident=resident,
                           steps_per_call=steps_per_call)
    state, second = jdl.fit(state, train_step, eval_step, train, test, num_steps=14,
                            eval_every_steps=5, progress=progress, device_resident=resident,
                            steps_per_call=steps_per_call)
    runs.append((state, first + second))
  (host_state, host_history), (scan_state, scan_history) = runs
  jax.tree.map(np.testing.assert_array_equal, host_state.params, scan_state.params)
  jax.tree.map(np.testing.assert_array_equal, host_state.opt_state, scan_state.opt_state)
  assert [r["step"] for r in host_history] == [r["step"] for r in scan_history] == [5, 6, 10, 14]
  for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
    assert [r[key] for r in host_history] == [r[key] for r in scan_history], key


def test_long_resident_calls_equal_the_per_step_loop(monkeypatch):
  """Calls of 16 steps or more take the resident engine's fast path: each step checks only its
  loss, the parameters are probed once a call, and the evaluation program compiles in a thread
  while the first call runs. Parameters, losses and eval metrics are still bitwise those of the
  per-step loop."""
  submitted = []
  submit = jdl.loop._BACKGROUND.submit
  monkeypatch.setattr(jdl.loop._BACKGROUND, "submit",
                      lambda fn: submitted.append(fn) or submit(fn))
  runs = []
  for resident in (False, True):
    state, train_step, eval_step, train, test, _ = _setup()
    runs.append(jdl.fit(state, train_step, eval_step, train, test, num_steps=40,
                        eval_every_steps=20, progress=False, device_resident=resident))
  (host_state, host_history), (scan_state, scan_history) = runs
  assert len(submitted) == 1  # the resident run compiled its evaluation alongside, once
  jax.tree.map(np.testing.assert_array_equal, host_state.params, scan_state.params)
  jax.tree.map(np.testing.assert_array_equal, host_state.opt_state, scan_state.opt_state)
  assert [r["step"] for r in host_history] == [r["step"] for r in scan_history] == [20, 40]
  for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
    assert [r[key] for r in host_history] == [r[key] for r in scan_history], key


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
  device-resident data and with the per-step loop's exact results."""
  x, y = _problem(n=40)
  images = np.tile(x[:, :, None, None], (1, 1, 6, 1))  # [40, 6, 6, 1]
  model = models.CNN(num_classes=3, features=(2,), dense=4)
  train_step, eval_step = jdl.make_classification_steps()
  state = jdl.create_train_state(model, optax.adam(0.05), images[:1], jax.random.PRNGKey(0))
  batch = jdl.resident.gather_batch(images, y, np.zeros((8,), np.int32))
  assert jdl.resident.loops_are_slow(train_step, state, batch) == (jax.default_backend() == "cpu")
  mlp_state, _, _, _, _, _ = _setup()
  mlp_batch = jdl.resident.gather_batch(x[:8, :6], y[:8], np.zeros((8,), np.int32))
  assert not jdl.resident.loops_are_slow(train_step, mlp_state, mlp_batch)

  results = []
  for resident in (False, True):
    start = jdl.create_train_state(model, optax.adam(0.05), images[:1], jax.random.PRNGKey(0))
    train = data_lib.ArraySource(images[:32], y[:32], 8, shuffle=True)
    test = data_lib.ArraySource(images[32:], y[32:], 3, shuffle=False)
    results.append(jdl.fit(start, train_step, eval_step, train, test, num_steps=6,
                           eval_every_steps=4, progress=False, device_resident=resident))
  (host_state, host_history), (resident_state, resident_history) = results
  jax.tree.map(np.testing.assert_array_equal, host_state.params, resident_state.params)
  assert host_history[-1]["test_loss"] == resident_history[-1]["test_loss"]


def test_a_traced_step_replays_the_step_and_rejects_other_shapes():
  """`TracedStep` (the step traced once, its jaxpr replayed) computes what the step computes:
  bitwise under jit, up to rounding when replayed eagerly (operation by operation, unfused); and
  it says what it was traced for when called with another batch shape."""
  state, train_step, _, _, _, _ = _setup()
  x, y = _problem(n=16)
  batch = jdl.resident.gather_batch(x, y, np.arange(8, dtype=np.int32))
  traced = jdl.resident.TracedStep(train_step, state, batch)
  assert not jdl.resident.loops_are_slow(traced)
  want_state, want_sums = jax.jit(train_step)(state, batch)
  new_state, sums = jax.jit(traced)(state, batch)
  jax.tree.map(np.testing.assert_array_equal, new_state.params, want_state.params)
  jax.tree.map(np.testing.assert_array_equal, sums, want_sums)
  eager_state, _ = traced(state, batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               eager_state.params, want_state.params)
  short = jdl.resident.gather_batch(x, y, np.arange(4, dtype=np.int32))
  with pytest.raises(ValueError, match=r"float32\[4, 6\] where it was traced for a float32\[8, 6\]"):
    traced(state, short)


INIT_MODELS = [
    (models.CNN1D(num_classes=10, features=(4, 4), kernel_sizes=(5, 3)), np.zeros((1, 40), np.float32)),
    (models.ResNet(stage_sizes=(1,), block="basic", num_classes=3, width=4, layout="cifar"),
     np.zeros((1, 8, 8, 3), np.float32)),
    (models.TransformerEncoderClassifier(num_classes=2, vocab_size=11, max_length=6, num_layers=1,
                                         num_heads=2, width=8),
     np.zeros((1, 6), np.int32)),
    (models.MLP(hidden=(8,), num_classes=3, normalization="batch"), np.zeros((1, 6), np.float32)),
    (models.CNN(num_classes=3, features=(4,), dense=8), np.zeros((1, 8, 8, 1), np.float32)),
    (models.RNNClassifier(num_classes=3, cell="gru", hidden=8, vocab_size=11, embed_dim=4),
     np.zeros((1, 5), np.int32)),
    (models.RNNClassifier(num_classes=3, cell="lstm", hidden=8), np.zeros((1, 5, 2), np.float32)),
    (models.TransformerLM(num_classes=11, block_size=6, num_layers=1, num_heads=2, width=8),
     np.zeros((1, 6), np.int32)),
]


@pytest.mark.parametrize("model, sample", INIT_MODELS)
def test_create_train_state_gives_the_compiled_flax_and_optax_initial_values(model, sample):
  """The state holds what `jax.jit(model.init)` and `tx.init` give with the documented split of
  the key, bitwise (the init is compiled for compile time on the CPU, which changes no value),
  and what the eager `model.init` gives up to float rounding: parameters, model state (BatchNorm
  statistics) and optimizer state."""
  tx = optax.adam(1e-3)
  state = jdl.create_train_state(model, tx, sample, jax.random.PRNGKey(5))
  init_key, dropout_key, _ = jax.random.split(jax.random.PRNGKey(5), 3)
  init = lambda rngs: model.init(rngs, sample, train=False)
  rngs = {"params": init_key, "dropout": dropout_key}
  compiled, eager = dict(jax.jit(init)(rngs)), dict(init(rngs))
  params = compiled.pop("params")
  jax.tree.map(np.testing.assert_array_equal, state.params, params)
  jax.tree.map(np.testing.assert_array_equal, state.model_state, compiled)
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, tx.init(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               state.params, eager["params"])


def test_an_xla_without_the_init_options_compiles_the_init_at_o1_alone(monkeypatch):
  """An XLA that does not know one of `INIT_COMPILER_OPTIONS` (a later one may drop its loop
  emitters) still initialises, with the same values."""
  from jdl import state as state_lib  # pylint: disable=import-outside-toplevel

  if jax.default_backend() != "cpu":
    pytest.skip("the init's compiler options are for the CPU")
  model, sample = models.MLP(hidden=(4,), num_classes=3), np.zeros((1, 6), np.float32)
  want = jdl.create_train_state(model, optax.sgd(0.1), sample, jax.random.PRNGKey(1)).params
  compiled = dict(state_lib._COMPILED)  # pylint: disable=protected-access
  for fn in (state_lib._init, state_lib._tx_init):  # pylint: disable=protected-access
    compiled[(fn, True)] = jax.jit(fn, static_argnums=0,
                                   compiler_options={"xla_no_such_option_here": True})
  monkeypatch.setattr(state_lib, "_COMPILED", compiled)
  got = jdl.create_train_state(models.MLP(hidden=(4,), num_classes=3), optax.sgd(0.1), sample,
                               jax.random.PRNGKey(1)).params
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_create_train_state_can_be_traced_inside_jit_and_vmap():
  """Inside a traced function (as vmapped sweeps build their states) the init is traced into
  it; each vmapped state is the one built alone with its key."""
  model = models.MLP(hidden=(4,), num_classes=3)
  sample = np.zeros((1, 6), np.float32)
  make = lambda key: jdl.create_train_state(model, optax.sgd(0.1), sample, key).params
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  stacked = jax.jit(jax.vmap(make))(keys)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[1], b, rtol=1e-6, atol=1e-7),
               stacked, make(keys[1]))


@pytest.mark.parametrize("model, sample", INIT_MODELS)
def test_start_train_state_gives_create_train_states_values_and_shapes(model, sample):
  """`start_train_state` computes on its thread what `create_train_state` computes, bitwise, and
  its `abstract` has the result's structure, static fields, shapes, dtypes and weak types."""
  tx = optax.adam(1e-3)
  pending = jdl.start_train_state(model, tx, sample, jax.random.PRNGKey(5))
  got = pending.result()
  assert pending.done()
  want = jdl.create_train_state(model, tx, sample, jax.random.PRNGKey(5))
  jax.tree.map(np.testing.assert_array_equal, got, want)  # also asserts the same static fields
  assert jax.tree.structure(pending.abstract) == jax.tree.structure(got)
  assert jax.tree.leaves(pending.abstract) == jax.tree.leaves(jax.eval_shape(lambda: got))


def test_start_train_state_checks_its_input_before_returning():
  """A bad sample, or a model that rejects it, raises at the call, as `create_train_state` does,
  not later from the background thread."""
  model = models.CNN(num_classes=3, features=(4,), dense=8)
  with pytest.raises(ValueError, match="leading batch dimension"):
    jdl.start_train_state(model, optax.sgd(0.1), np.zeros((0, 8, 8, 1), np.float32),
                          jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"CNN expects images .* got shape \(1, 8\)"):
    jdl.start_train_state(model, optax.sgd(0.1), np.zeros((1, 8), np.float32),
                          jax.random.PRNGKey(0))


def test_start_train_state_of_an_unhashable_model_or_inside_jit_is_computed_at_once():
  """A model that cannot key the compiled init's cache is initialised eagerly, and inside a
  traced function the init is traced into it, both on the calling thread: the pending state is
  then already done, with the same values."""
  model = models.MLP(hidden=[4], num_classes=3)  # a list: unhashable
  sample = np.zeros((1, 6), np.float32)
  pending = jdl.start_train_state(model, optax.sgd(0.1), sample, jax.random.PRNGKey(2))
  assert pending.done()
  want = jdl.create_train_state(model, optax.sgd(0.1), sample, jax.random.PRNGKey(2))
  jax.tree.map(np.testing.assert_array_equal, pending.result().params, want.params)
  assert jax.tree.leaves(pending.abstract) == jax.tree.leaves(jax.eval_shape(lambda: want))
  hashable = models.MLP(hidden=(4,), num_classes=3)
  traced = jax.jit(lambda key: jdl.start_train_state(hashable, optax.sgd(0.1), sample, key)
                   .result().params)(jax.random.PRNGKey(2))
  alone = jdl.create_train_state(hashable, optax.sgd(0.1), sample, jax.random.PRNGKey(2)).params
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), traced, alone)


@pytest.mark.parametrize("engine", ["resident", "host", "sharded"])
def test_fit_from_a_pending_state_equals_fit_from_the_state(engine, caplog):
  """`fit` trains a `PendingTrainState` to bitwise the parameters and metrics it reaches from the
  finished state. On one device the resident engine compiles its first call from the shapes while
  the state initialises, and the call then finds that program: it compiles once."""
  runner = jdl.parallel.make_runner("shard" if engine == "sharded" else "none", batch_size=16)
  x, _ = _problem()
  runs = []
  for pending in (False, True):
    _, train_step, eval_step, train, test, _ = _setup()
    start = jdl.start_train_state if pending else jdl.create_train_state
    state = start(models.MLP(hidden=(16,), num_classes=3), optax.adam(0.05), x[:1],
                  jax.random.PRNGKey(0))
    caplog.clear()
    with jax.log_compiles():
      runs.append(jdl.fit(state, train_step, eval_step, train, test, num_steps=40,
                          eval_every_steps=20, progress=False, runner=runner,
                          device_resident=engine != "host"))
    if engine == "resident":
      compiled = [r.getMessage() for r in caplog.records if "Finished XLA compilation of jit(probed)"
                  in r.getMessage()]
      assert len(compiled) == 1, compiled
  (plain_state, plain_history), (pending_state, pending_history) = runs
  jax.tree.map(np.testing.assert_array_equal, plain_state.params, pending_state.params)
  jax.tree.map(np.testing.assert_array_equal, plain_state.opt_state, pending_state.opt_state)
  for key in ("step", "train_loss", "train_accuracy", "test_loss", "test_accuracy"):
    assert [r[key] for r in plain_history] == [r[key] for r in pending_history], key
