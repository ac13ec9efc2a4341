"""Checkpoints, resumption, preemption and the non-finite watch."""

import glob
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdl
from jdl import data as data_lib
from jdl import experiment, loop, models
from jdl import step as step_lib

from experiments import mnist1d

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _mlp_state(hidden=4, seed=0):
  return jdl.create_train_state(models.MLP(hidden=(hidden,), num_classes=3), optax.adam(1e-2),
                                np.zeros((1, 6), np.float32), jax.random.PRNGKey(seed))


def _saved_steps(checkpointer, steps_and_accuracies):
  state = _mlp_state()
  for step, accuracy in steps_and_accuracies:
    checkpointer.save(state.replace(step=jnp.asarray(step, jnp.int32)),
                      metrics={"test_accuracy": accuracy})
  checkpointer.wait()


def test_keeps_the_last_k_and_the_best(tmp_path):
  """With keep=2 and best_metric, the two newest and the most accurate checkpoint survive."""
  checkpointer = jdl.Checkpointer(str(tmp_path / "ckpt"), keep=2, best_metric="test_accuracy")
  _saved_steps(checkpointer, [(1, 0.5), (2, 0.9), (3, 0.6), (4, 0.7), (5, 0.65)])
  assert checkpointer.steps() == [2, 4, 5]
  lossy = jdl.Checkpointer(str(tmp_path / "loss"), keep=1, best_metric="test_loss")
  state = _mlp_state()
  for step, loss in [(1, 0.3), (2, 0.1), (3, 0.4)]:
    lossy.save(state.replace(step=jnp.asarray(step, jnp.int32)), metrics={"test_loss": loss})
  lossy.wait()
  assert lossy.steps() == [2, 3]  # a loss is best when lowest
  checkpointer.close()
  lossy.close()


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path):
  """A checkpoint whose files were cut short is reported, moved aside (not deleted), and the
  previous one is restored."""
  directory = tmp_path / "ckpt"
  checkpointer = jdl.Checkpointer(str(directory), keep=3)
  _saved_steps(checkpointer, [(1, 0.5), (2, 0.6)])
  data_files = [f for f in glob.glob(str(directory / "2" / "**" / "d" / "*"), recursive=True)
                if os.path.isfile(f)]
  assert data_files
  for name in data_files:
    with open(name, "r+b") as f:
      f.truncate(3)
  messages = []
  restored = checkpointer.restore_latest(_mlp_state(), log=messages.append)
  assert int(restored.step) == 1
  assert len(messages) == 1 and "checkpoint at step 2 is unusable" in messages[0]
  assert "trying the previous checkpoint" in messages[0]
  assert checkpointer.steps() == [1]
  moved = glob.glob(str(tmp_path / "ckpt_unusable" / "2.*"))
  assert len(moved) == 1 and os.listdir(moved[0])  # kept for inspection
  checkpointer.close()


def test_a_save_cut_short_by_a_crash_is_cleared_when_the_folder_is_next_opened(tmp_path):
  """The temporary folder of a save killed mid-write is removed by the next writable
  Checkpointer (a read-only one leaves it); checkpoints and other files stay."""
  directory = tmp_path / "ckpt"
  checkpointer = jdl.Checkpointer(str(directory))
  _saved_steps(checkpointer, [(1, 0.5)])
  checkpointer.close()
  leftover = directory / "2.orbax-checkpoint-tmp-1733" / "d"
  leftover.mkdir(parents=True)
  (leftover / "part").write_bytes(b"cut short")
  (directory / "notes.txt").write_text("mine")
  jdl.Checkpointer(str(directory), writable=False).close()
  assert leftover.exists()
  reopened = jdl.Checkpointer(str(directory))
  reopened.close()
  assert sorted(os.listdir(directory)) == ["1", "notes.txt"]
  assert reopened.steps() == [1]


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
  """Restoring into a model of another width names the first differing parameter and refuses
  to start over next to another run's checkpoints."""
  checkpointer = jdl.Checkpointer(str(tmp_path / "ckpt"))
  _saved_steps(checkpointer, [(1, 0.5)])
  with pytest.raises(jdl.CheckpointError, match=r"params/Dense_0/bias is shape \(4,\) there, but "
                                                r"this run has shape \(5,\)"):
    checkpointer.restore(_mlp_state(hidden=5), 1)
  with pytest.raises(jdl.CheckpointError, match="from another model"):
    checkpointer.restore_latest(_mlp_state(hidden=5), log=lambda message: None)
  checkpointer.close()


# ---------------------------------------------------------------------------------------------
# Resumption through train_and_evaluate: a crash after the checkpoint of step 20, then the same
# command again, ends with the uninterrupted run's parameters.


class Crash(Exception):
  pass


def _crash_at(crash_step):
  def hook(step, state, record):
    del state, record
    if step == crash_step:
      raise Crash(f"simulated crash at step {step}")
  return hook


def _tiny_config(data_dir, overrides=()):
  return jdl.apply_overrides(mnist1d.get_config(), [
      f"data_dir={data_dir}", "model.name=mlp", "model.mlp.hidden=(16,)", "num_steps=60",
      "eval_every_steps=20", "progress=false", "batch_size=96", "eval_batch_size=500",
      "optimizer.schedule=warmup_cosine", "optimizer.warmup_steps=5", *overrides])


@pytest.mark.parametrize("layout,shuffle", [("none", True), ("shard", False), ("pmap", True)],
                         ids=["one-device-shuffled", "sharded-in-order", "pmap-shuffled"])
def test_crash_and_resume_equals_an_uninterrupted_run(tmp_path, mnist1d_data_dir, layout, shuffle):
  """Checkpoint at step 20, crash at 40, resume: the final parameters, optimizer state and the
  records of steps 40 and 60 are bitwise those of a run that was never interrupted (the same
  compiled programs run the same steps), on one device and sharded over 8 (the resident engine,
  drawing each epoch's order on the device or keeping the data in order) and replicated by pmap
  over 8 (the per-step engine, batches from the host); metrics.jsonl has each step once."""
  if layout != "none" and len(jax.devices()) < 8:
    pytest.skip("needs 8 devices")
  config = _tiny_config(mnist1d_data_dir, [f"layout={layout}", f"shuffle={shuffle}",
                                           "num_devices=0" if layout == "none" else "num_devices=8"])
  whole, whole_history = jdl.train_and_evaluate(config, str(tmp_path / "whole"))

  workdir = str(tmp_path / "interrupted")
  with pytest.raises(Crash):
    jdl.train_and_evaluate(config, workdir, hooks=[_crash_at(40)])
  assert jdl.Checkpointer(os.path.join(workdir, "checkpoints")).steps() == [20]
  resumed, resumed_history = jdl.train_and_evaluate(config, workdir)

  assert int(resumed.step) == 60
  jax.tree.map(np.testing.assert_array_equal, whole.params, resumed.params)
  jax.tree.map(np.testing.assert_array_equal, whole.opt_state, resumed.opt_state)
  for before, after in zip(whole_history[1:], resumed_history):
    assert before["step"] == after["step"]
    assert before["train_loss"] == after["train_loss"]
    assert before["test_accuracy"] == after["test_accuracy"]
  assert [r["step"] for r in jdl.read_jsonl(workdir)] == [20, 40, 60]


def test_resume_false_refuses_a_workdir_with_checkpoints(tmp_path, mnist1d_data_dir):
  config = _tiny_config(mnist1d_data_dir, ["num_steps=20", "layout=none"])
  jdl.train_and_evaluate(config, str(tmp_path))
  again = jdl.apply_overrides(config, ["resume=false"])
  with pytest.raises(ValueError, match="already holds checkpoints"):
    jdl.train_and_evaluate(again, str(tmp_path))
  assert (tmp_path / "versions.json").is_file() and (tmp_path / "config.json").is_file()


def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(tmp_path, mnist1d_data_dir,
                                                                 subprocess_env, capsys):
  """SIGTERM to a training process: it finishes its step, saves, says how to resume and exits
  with 143; the same command line (run here in the test's process) then continues from that
  checkpoint."""
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "experiments.mnist1d", f"--workdir={workdir}",
             f"--config.data_dir={mnist1d_data_dir}", "--config.model.name=mlp",
             "--config.layout=none", "--config.num_steps=1000000", "--config.progress=false",
             "--config.eval_every_steps=50"]
  process = subprocess.Popen(command, cwd=REPO_ROOT, env=subprocess_env(JAX_PLATFORMS="cpu"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 180
    records = workdir / "metrics.jsonl"
    while not (records.exists() and records.stat().st_size) and time.time() < deadline:
      time.sleep(0.2)  # the first evaluation (step 50) shows that training is under way
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
  finally:
    process.kill()
  assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
  assert "stopped by SIGTERM after step" in stderr and "Run the same command" in stderr
  steps = jdl.Checkpointer(str(workdir / "checkpoints")).steps()
  assert steps and f"stopped by SIGTERM after step {steps[-1]}" in stderr  # saved where it stopped

  capsys.readouterr()
  arguments = [*command[3:-3], f"--config.num_steps={steps[-1] + 5}", "--config.progress=false"]
  experiment.run_experiment(mnist1d.get_config, arguments, name="mnist1d")
  printed = capsys.readouterr().out
  assert f"resuming from the checkpoint of step {steps[-1]}" in printed
  assert f"after {steps[-1] + 5} steps" in printed


# ---------------------------------------------------------------------------------------------
# The non-finite watch.


@pytest.mark.parametrize("resident", [False, True])
def test_nan_at_step_k_stops_with_a_message_naming_step_k(tmp_path, resident):
  """A NaN input in the batch of step 7 stops the run with an error naming step 7 and the loss;
  the checkpoints saved before it are kept and none is saved after."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(100, 6)).astype(np.float32)
  y = rng.integers(0, 3, 100).astype(np.int32)
  x[6 * 10 + 3] = np.nan  # step 7 (1-based) trains on rows 60-69, in order
  train = data_lib.ArraySource(x, y, 10, shuffle=False)
  train_step, eval_step = jdl.make_steps(check_finite=True)
  checkpointer = jdl.Checkpointer(str(tmp_path / "ckpt"))
  with pytest.raises(jdl.NonFiniteError, match="the loss became NaN or infinite at step 7") as error:
    jdl.fit(_mlp_state(), train_step, eval_step, train, None, num_steps=30, eval_every_steps=5,
            progress=False, checkpointer=checkpointer, device_resident=resident)
  checkpointer.wait()
  assert checkpointer.steps() == [5]
  assert "last good checkpoint (step 5)" in str(error.value)
  checkpointer.close()
  # A step without the watch (a user's own) still cannot carry a NaN loss past fit.
  with pytest.raises(jdl.NonFiniteError, match="training loss became NaN or infinite by step 10"):
    jdl.fit(_mlp_state(), jdl.make_train_step(), eval_step, train, None, num_steps=30,
            eval_every_steps=5, progress=False, device_resident=resident)


def test_non_finite_gradient_names_the_parameter():
  """A loss whose value stays finite but whose gradient is NaN (the `where` trap: a masked-out
  log(0) still sends 0 * inf back) is named by the first parameter with a bad gradient."""

  def trap_loss(logits, labels):
    masked_log = jnp.where(logits > 1e30, jnp.log(logits * 0.0), 0.0)
    return jdl.softmax_cross_entropy(logits, labels) + jnp.sum(masked_log, axis=-1)

  train_step = jdl.make_train_step(jdl.tasks.classification(trap_loss), check_finite=True,
                                   gradient_norms=True)
  _, eval_step = jdl.make_steps()
  x = np.ones((10, 6), np.float32)
  y = np.zeros((10,), np.int32)
  metrics = jax.jit(train_step)(_mlp_state(), {"input": x, "label": y})[1]
  assert np.isfinite(float(metrics["loss_sum"])) and int(metrics["nonfinite_step"]) == 1
  with pytest.raises(jdl.NonFiniteError,
                     match="the gradient of parameter Dense_0/bias became NaN or infinite at step 1"):
    jdl.fit(_mlp_state(), train_step, eval_step, data_lib.ArraySource(x, y, 10, shuffle=False),
            None, num_steps=2, progress=False)


def _label_trap_loss(logits, labels):
  """Cross-entropy with a finite value and a NaN gradient for the examples labelled 2: their
  `log(0)` sits in the branch of a `where` that is never taken, and still sends 0 * inf back."""
  safe = (labels[:, None] != 2).astype(logits.dtype)
  masked_log = jnp.where(logits > 1e30, jnp.log(logits * 0.0 + safe), 0.0)
  return jdl.softmax_cross_entropy(logits, labels) + jnp.sum(masked_log, axis=-1)


def _trap_run(loss_fn, bad_row, *, resident, num_steps=50, gradient_norms=True):
  """`fit` on 100 examples in batches of 2 (no shuffling, one 50-step call when resident), with a
  NaN input or a label-2 trap at `bad_row`; returns (state, history) or the NonFiniteError."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(100, 6)).astype(np.float32)
  y = rng.integers(0, 2, 100).astype(np.int32)
  if bad_row is not None:
    if loss_fn is _label_trap_loss:
      y[bad_row] = 2
    else:
      x[bad_row] = np.nan
  train_step = jdl.make_train_step(jdl.tasks.classification(loss_fn), check_finite=True,
                                   gradient_norms=gradient_norms)
  _, eval_step = jdl.make_steps()
  try:
    return jdl.fit(_mlp_state(), train_step, eval_step,
                   data_lib.ArraySource(x, y, 2, shuffle=False), None, num_steps=num_steps,
                   eval_every_steps=50, progress=False, device_resident=resident)
  except jdl.NonFiniteError as error:
    return error


@pytest.mark.parametrize("loss, gradient_norms, message", [
    (_label_trap_loss, True, "the gradient of parameter Dense_0/bias became NaN or infinite at "
     "step 23; training stopped."),
    (_label_trap_loss, False, "the loss became NaN or infinite at step 24; training stopped. "
     "Parameters Dense_0/bias, Dense_0/kernel, Dense_1/bias ... are not finite: a gradient of "
     "step 24 or before was (gradient_norms=True names the first)."),
    (jdl.softmax_cross_entropy, False, "the loss became NaN or infinite at step 23; training "
     "stopped."),
])
def test_a_long_resident_call_names_the_step_and_parameter_of_the_per_step_loop(
    loss, gradient_norms, message):
  """A bad gradient or loss at step 23 inside one 50-step resident call stops the run with the
  message of the per-step engine: the same step and the same parameter (or the loss). Without
  gradient norms, the free loss-only watch names the next step, whose loss the NaN parameters
  spoil, and the parameters that are no longer finite."""
  for resident in (True, False):
    error = _trap_run(loss, 2 * 22 + 1, resident=resident, gradient_norms=gradient_norms)
    assert isinstance(error, jdl.NonFiniteError) and message in str(error), (resident, error)


def test_classification_steps_without_the_finite_check_train_the_same():
  """`check_finite=False` drops the watch's metrics and nothing else: same parameters and loss,
  and `fit` runs without the watch."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 6)).astype(np.float32)
  y = rng.integers(0, 3, 40).astype(np.int32)
  states = []
  for check in (True, False):
    train_step, eval_step = jdl.make_steps(check_finite=check)
    _, metrics = jax.jit(train_step)(_mlp_state(), {"input": x[:10], "label": y[:10]})
    assert ("nonfinite_step" in metrics) == check
    state, history = jdl.fit(_mlp_state(), train_step, eval_step,
                             data_lib.ArraySource(x, y, 10, shuffle=True), None, num_steps=6,
                             progress=False)
    states.append((state, history[-1]["train_loss"]))
  # With and without the watch the step compiles to two programs, which XLA may fuse differently:
  # six Adam steps a few float32 ulps apart.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               states[0][0].params, states[1][0].params)
  assert states[0][1] == pytest.approx(states[1][1], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Optimisation and regularisation keys of the config reach the run.


def test_resuming_with_another_seed_fails_and_keeps_the_saved_run(tmp_path, mnist1d_data_dir):
  """A workdir's checkpoints resume only under the config that wrote them, up to the keys a
  resume may change (`RESUMABLE_CHANGES`: the length of the run, say); another seed or learning
  rate is an error naming the keys, and the saved config and checkpoints are left as they were."""
  jdl.train_and_evaluate(_tiny_config(mnist1d_data_dir, ["layout=none", "num_steps=20"]),
                         str(tmp_path))
  saved_config = (tmp_path / "config.json").read_text()
  checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  with pytest.raises(ValueError, match=r"another config \(optimizer.learning_rate: 0.01 there, "
                                       r"0.002 now; seed: 0 there, 1 now\)"):
    jdl.train_and_evaluate(_tiny_config(mnist1d_data_dir, [
        "layout=none", "num_steps=20", "seed=1", "optimizer.learning_rate=0.002"]), str(tmp_path))
  assert (tmp_path / "config.json").read_text() == saved_config
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == checkpoints
  _, history = jdl.train_and_evaluate(
      _tiny_config(mnist1d_data_dir, ["layout=none", "num_steps=40", "check_finite=false"]),
      str(tmp_path))
  assert [record["step"] for record in history] == [40]


def test_config_check_finite_reaches_the_steps(tmp_path, mnist1d_data_dir, monkeypatch):
  """`check_finite=false` in the config builds the steps without the NaN/inf watch."""
  seen = []
  original = step_lib.make_steps

  def recording(*args, **kwargs):
    seen.append(kwargs["check_finite"])
    return original(*args, **kwargs)

  monkeypatch.setattr(step_lib, "make_steps", recording)
  config = _tiny_config(mnist1d_data_dir, ["layout=none", "num_steps=20", "check_finite=false"])
  jdl.train_and_evaluate(config, str(tmp_path))
  assert seen == [False]


def test_config_regularisation_and_precision_reach_the_run(tmp_path, mnist1d_data_dir):
  """EMA, accumulation, label smoothing, dropout, L2 and bfloat16 from the config: records log the
  scheduled learning rate of the last applied update, evaluation uses the averaged parameters,
  and the master weights stay float32."""
  config = _tiny_config(mnist1d_data_dir, [
      "layout=none", "num_steps=40", "optimizer.accumulate_steps=2", "optimizer.ema_decay=0.9",
      "label_smoothing=0.1", "compute_dtype=bfloat16", "model.mlp.dropout_rate=0.1", "l2=1e-4"])
  state, history = jdl.train_and_evaluate(config, str(tmp_path))
  schedule = jdl.make_schedule(config.optimizer, total_steps=40)
  for record in history:  # after train step s, update s // 2 - 1 was the last one applied
    assert record["learning_rate"] == pytest.approx(float(schedule(record["step"] // 2 - 1)), rel=1e-5)
  assert [record["step"] for record in history] == [20, 40]
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))

  builder = data_lib.get_builder("mnist1d", mnist1d_data_dir)
  x, y = data_lib.load_split_arrays(builder, "test")
  _, eval_step = jdl.make_steps(compute_dtype="bfloat16")
  test = data_lib.ArraySource(x, y, 500, shuffle=False)
  with_ema = jdl.evaluate(loop.evaluation_state(state), jax.jit(eval_step), test)
  without = jdl.evaluate(state, jax.jit(eval_step), test)
  # fit's evaluation (one compiled loop over the split) and `evaluate` (one call a batch) are two
  # programs: the loss a few float32 ulps apart, the accuracy within one example of 1000.
  assert history[-1]["test_accuracy"] == pytest.approx(with_ema["accuracy"], abs=1.01e-3)
  assert history[-1]["test_loss"] == pytest.approx(with_ema["loss"], rel=1e-5)
  assert with_ema["loss"] != without["loss"]
