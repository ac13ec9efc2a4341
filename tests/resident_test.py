"""The device-resident engine: one compiled train program for every call length, a donated state,
and the batches of the host path."""

import jax
import numpy as np
import optax
import pytest

import jdl
from jdl import data as data_lib
from jdl import models, resident


def _problem(n=60, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 6)).astype(np.float32)
  y = (x @ rng.normal(size=(6, 3))).argmax(1).astype(np.int32)
  return x, y


def _engine_and_state(steps_per_call=None):
  """An engine over 44 training examples in batches of 8 (5 full steps and a padded sixth an
  epoch, shuffled) and 16 evaluation examples in batches of 5 (the last padded)."""
  x, y = _problem()
  train = data_lib.ArraySource(x[:44], y[:44], 8, shuffle=True, seed=1)
  test = data_lib.ArraySource(x[44:], y[44:], 5, shuffle=False)
  train_step, eval_step = jdl.make_steps()
  engine = resident.ResidentEngine(train_step, eval_step, train, test,
                                   steps_per_call=steps_per_call)
  state = jdl.create_train_state(models.MLP(hidden=(8,), num_classes=3), optax.adam(0.05), x[:1],
                                 jax.random.PRNGKey(0))
  return engine, state


def _advance(engine, state, lengths):
  """Calls `engine.advance` with each length in turn; returns the state and the merged sums."""
  step, total = 0, jdl.empty_metrics()
  for length in lengths:
    state, sums, advanced = engine.advance(state, step, step + length)
    assert advanced == length
    step += advanced
    total = jdl.merge_metrics(total, sums)
  assert int(state.step) == step
  return state, jax.device_get(total)


def test_every_call_length_runs_one_compiled_program_to_the_same_parameters(caplog):
  """`compile` and then calls of 1, 3, 7 and 2 steps (crossing two epoch ends, 6 steps an epoch)
  compile the train program once, and reach bitwise the parameters of one 13-step call: the same
  program runs the same steps on the same batches, only its trip count differs."""
  engine, state = _engine_and_state()
  with jax.log_compiles():
    engine.compile(state)
    pieces, piece_sums = _advance(engine, state, (1, 3, 7, 2))
  compiled = [r.getMessage() for r in caplog.records
              if "Finished XLA compilation of jit(chunk)" in r.getMessage()]
  assert engine.loop and len(compiled) == 1, compiled
  assert engine._chunk._cache_size() == 1  # pylint: disable=protected-access

  whole_engine, state = _engine_and_state()
  whole, whole_sums = _advance(whole_engine, state, (13,))
  jax.tree.map(np.testing.assert_array_equal, pieces.params, whole.params)
  jax.tree.map(np.testing.assert_array_equal, pieces.opt_state, whole.opt_state)
  assert int(piece_sums["count"]) == int(whole_sums["count"]) == 13 * 8 - 2 * 4  # 2 padded batches
  assert int(piece_sums["accuracy_sum"]) == int(whole_sums["accuracy_sum"])
  # The loss sums add the same 13 batch sums in another grouping: float32 rounding of a dozen
  # additions of numbers below 100, a few ulps each.
  np.testing.assert_allclose(piece_sums["loss_sum"], whole_sums["loss_sum"], rtol=1e-6)


def test_steps_per_call_caps_each_call():
  """With `steps_per_call=4` a call asked for 10 steps runs 4."""
  engine, state = _engine_and_state(steps_per_call=4)
  state, _, advanced = engine.advance(state, 0, 10)
  assert advanced == 4 and int(state.step) == 4


def test_advance_donates_the_state_it_is_given():
  """The state passed to `advance` is donated: its buffers are reused by the result and deleted,
  so a caller cannot read stale parameters by mistake; the returned state is live."""
  engine, state = _engine_and_state()
  given = jax.tree.leaves(state)
  new_state, _, _ = engine.advance(state, 0, 3)
  assert all(leaf.is_deleted() for leaf in given if isinstance(leaf, jax.Array))
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new_state)
                 if isinstance(leaf, jax.Array))
  with pytest.raises(RuntimeError, match="deleted"):
    np.asarray(state.params["Dense_0"]["kernel"])


def test_evaluate_sums_the_whole_split_with_the_padding_masked():
  """`evaluate` returns the eval step's sums over all 16 examples (batches of 5, the last padded):
  the count, the correct predictions and, up to float32 rounding of four batch sums, the loss of
  the model applied to the whole split at once."""
  engine, state = _engine_and_state()
  state, _, _ = engine.advance(state, 0, 5)
  sums = jax.device_get(engine.evaluate(state))
  x, y = _problem()
  logits = state.apply_fn(state.variables(), x[44:], train=False)
  assert int(sums["count"]) == 16
  assert int(sums["accuracy_sum"]) == int((np.asarray(logits).argmax(1) == y[44:]).sum())
  np.testing.assert_allclose(sums["loss_sum"], float(jdl.softmax_cross_entropy(logits, y[44:]).sum()),
                             rtol=1e-5)


def test_a_chunk_crosses_epochs_with_the_orders_of_the_host_source():
  """The chunk draws each epoch's order on the device: one step with an identity train step that
  records its batch sees, at every step of three epochs, the rows the host source gives."""
  x, y = _problem(n=20)
  source = data_lib.ArraySource(x, y, 6, shuffle=True, seed=4)  # 3 full batches and one of 2
  data = resident.ResidentData(*jax.device_put(resident.with_padding_row(x, y)), batch_size=6,
                               shuffle=True, seed=4)

  def recording_step(state, batch):  # the "state" is the labels of the latest batch
    del state
    labels = jax.numpy.where(batch["mask"], batch["label"], -1)
    return labels, {"count": batch["mask"].sum()}

  chunk = jax.jit(resident.make_train_chunk(recording_step, data))
  order = data.initial_order()
  seen = []
  for step in range(12):
    labels, sums, order = chunk(np.zeros(6, np.int32), data.inputs, data.labels, order,
                                np.int32(step), np.int32(1))
    seen.append(np.asarray(labels))
  host = [np.where(b["mask"], b["label"], -1) for e in range(3) for b in source.epoch(e)]
  np.testing.assert_array_equal(np.stack(seen), np.stack(host))
  assert int(sums["count"]) == 2
