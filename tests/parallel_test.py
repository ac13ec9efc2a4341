"""One train step, every device layout: jit on one device, sharded jit and pmap on eight CPU
devices, and two processes of four devices each, all giving the same numbers."""

import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

import jdl
from jdl import data, models, parallel, sharding

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _problem():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(94, 6)).astype(np.float32)
  y = (x @ rng.normal(size=(6, 3))).argmax(1).astype(np.int32)
  return x, y


def _train(layout, eval_batch_size, num_devices=None, num_steps=12):
  """12 steps of the BatchNorm MLP (no dropout) under `layout`; returns (state, history). (The
  multi-process worker, multihost_worker.py, trains the same.)"""
  x, y = _problem()
  train = data.ArraySource(x[:64], y[:64], 16, shuffle=True, seed=3)  # 4 full steps an epoch
  test = data.ArraySource(x[64:], y[64:], eval_batch_size, shuffle=False)  # 30 examples
  runner = parallel.make_runner(layout, num_devices=num_devices, batch_size=16)
  model = models.MLP(hidden=(16,), num_classes=3, normalization="batch", axis_name=runner.axis_name)
  state = jdl.create_train_state(model, optax.adam(0.05), x[:1], jax.random.PRNGKey(0))
  train_step, eval_step = jdl.make_steps(jdl.tasks.classification(top_k=(2,)),
                                         axis_name=runner.axis_name)
  return jdl.fit(state, train_step, eval_step, train, test, num_steps=num_steps,
                 eval_every_steps=2, progress=False, runner=runner)


@pytest.fixture(scope="module")
def single_device_runs():
  assert jax.device_count() == 8, "conftest should give eight CPU devices"
  return {size: _train("none", size) for size in (16, 13)}


def _assert_same_run(run, reference):
  (state, history), (ref_state, ref_history) = run, reference
  for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "test_top2_accuracy"):
    np.testing.assert_allclose([r[key] for r in history], [r[key] for r in ref_history],
                               rtol=2e-5, atol=1e-6, err_msg=key)
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  jax.tree.map(close, state.params, ref_state.params)
  jax.tree.map(close, state.model_state, ref_state.model_state)
  assert int(state.step) == int(ref_state.step) == 12


@pytest.mark.parametrize("layout", ["shard", "pmap"])
@pytest.mark.parametrize("eval_batch_size", [16, 13])
def test_layouts_agree_with_one_device(single_device_runs, layout, eval_batch_size):
  """Sharded jit and pmap on 8 devices give the single-device loss trajectory, metrics and final
  parameters (and BatchNorm statistics), with eval batches that do (16) and do not (13) divide
  evenly over the devices; the last eval batch is padded and masked either way."""
  _assert_same_run(_train(layout, eval_batch_size), single_device_runs[eval_batch_size])


def test_auto_layout_shards_over_every_device_that_divides_the_batch():
  """auto: shard over all 8 devices for batch 16, over 5 for batch 100, none for one device."""
  assert parallel.make_runner("auto", batch_size=16).num_devices == 8
  runner = parallel.make_runner("auto", batch_size=100)
  assert runner.layout == "shard" and runner.num_devices == 5
  assert parallel.make_runner("auto", num_devices=1).layout == "none"


def test_pmap_gives_each_device_its_own_dropout_key():
  """Under pmap the step folds the device index into its key: identical shards of a batch get
  different dropout masks, so per-device losses differ."""
  runner = parallel.make_runner("pmap", num_devices=2)
  model = models.MLP(hidden=(64,), num_classes=3, dropout_rate=0.5)
  x = np.ones((4, 6), np.float32)
  state = jdl.create_train_state(model, optax.sgd(0.0), x[:1], jax.random.PRNGKey(0))

  def per_device_loss(outputs, batch, mask):
    del mask
    losses = jdl.softmax_cross_entropy(outputs, batch["label"])
    return {"per_device_loss_max": jax.lax.all_gather(losses.sum(), runner.axis_name)}

  task = jdl.Task(loss=lambda outputs, batch: jdl.softmax_cross_entropy(outputs, batch["label"]),
                  metrics=(per_device_loss,))
  step = jdl.make_train_step(task, axis_name=runner.axis_name)
  train, _ = runner.compile(step, jdl.make_eval_step())
  _, metrics = train(runner.place_state(state),
                     runner.place_batch({"input": x, "label": np.zeros(4, np.int32)}))
  per_device = np.asarray(metrics["per_device_loss_max"])[0]
  assert per_device[0] != per_device[1]


def test_indivisible_training_batch_names_both_numbers():
  """A global batch of 12 on 8 devices is an error naming 12 and 8, for every layout and at
  placement time."""
  for layout in ("shard", "pmap"):
    with pytest.raises(ValueError, match=r"batch size 12 is not divisible by the 8 devices that"):
      parallel.make_runner(layout, batch_size=12)
  runner = parallel.make_runner("shard")
  batch = {"input": np.zeros((12, 6), np.float32), "label": np.zeros(12, np.int32)}
  with pytest.raises(ValueError, match=r"batch of 12 examples cannot be split evenly over 8"):
    runner.place_batch(batch)


def test_mesh_larger_than_the_devices_present_names_both_numbers():
  """Asking for 16 devices where 8 exist is an error naming both numbers."""
  with pytest.raises(ValueError, match=r"needs 16 devices but only 8 are present"):
    parallel.make_runner("shard", num_devices=16)
  with pytest.raises(ValueError, match=r"pmap over 16 devices was requested but this process has 8"):
    parallel.make_runner("pmap", num_devices=16)
  with pytest.raises(ValueError, match="unknown layout"):
    parallel.make_runner("ddp")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _worker_env(subprocess_env, devices, **extra):
  """A worker's environment: `devices` CPU devices (the user's other XLA flags kept), no JAX_*
  variable of this process, and `extra`."""
  env = {k: v for k, v in subprocess_env(devices).items() if not k.startswith("JAX_")}
  return {**env, "PYTHONPATH": str(ROOT), **extra}


def test_two_processes_of_four_devices_equal_one_process_of_eight(tmp_path, subprocess_env):
  """2 processes x 4 CPU devices (jax.distributed over loopback, gloo collectives) end with the
  parameters, BatchNorm statistics and losses of 1 process x 8 devices (this one, sharded)."""
  multi = tmp_path / "multi.npz"
  address = f"127.0.0.1:{_free_port()}"
  workers = [
      subprocess.Popen(
          [sys.executable, str(WORKER), str(multi)],
          env=_worker_env(subprocess_env, 4, JAX_COORDINATOR_ADDRESS=address,
                          JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank)),
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for rank in range(2)
  ]
  state, history = _train("shard", 10, num_steps=8)  # the workers' run, while they run
  outputs = []
  for worker in workers:
    try:
      outputs.append(worker.communicate(timeout=300)[0])
    finally:
      worker.kill()
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output[-3000:]
  two = np.load(multi)
  assert int(two["devices"]) == 8 and int(two["processes"]) == 2
  one = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
         jax.tree_util.tree_leaves_with_path((state.params, state.model_state))}
  one["train_loss"] = [r["train_loss"] for r in history]
  one["test_accuracy"] = [r["test_accuracy"] for r in history]
  assert sorted(one) == sorted(set(two.files) - {"devices", "processes"})
  # Other collectives (gloo between processes) add in another order: float32 rounding apart.
  for key, value in one.items():
    np.testing.assert_allclose(two[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_pmap_refuses_a_multi_process_run(tmp_path, subprocess_env):
  """pmap is single-process here: in a 2-process run it fails with a message pointing to 'shard'."""
  address = f"127.0.0.1:{_free_port()}"
  workers = [
      subprocess.Popen(
          [sys.executable, str(WORKER), str(tmp_path / "pmap.npz"), "pmap"],
          env=_worker_env(subprocess_env, 2, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                          JAX_PROCESS_ID=str(rank)),
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for rank in range(2)
  ]
  for worker in workers:
    try:
      output = worker.communicate(timeout=300)[0]
    finally:
      worker.kill()
    assert worker.returncode != 0
    assert "layout 'pmap' runs within one process" in output and "'shard'" in output


def test_batch_and_state_helpers_round_trip():
  """shard_batch splits a batch over the mesh; replicate copies a tree to every device;
  unreplicate takes the first copy of a pmap-stacked tree."""
  mesh = sharding.make_mesh()
  batch = {"input": np.arange(16, dtype=np.float32).reshape(8, 2), "label": np.arange(8)}
  sharded = parallel.shard_batch(batch, mesh)
  assert len(sharded["input"].addressable_shards) == 8
  assert sharded["input"].addressable_shards[3].data.shape == (1, 2)
  np.testing.assert_array_equal(np.asarray(sharded["input"]), batch["input"])
  tree = {"w": np.ones((3,), np.float32)}
  replicated = parallel.replicate(tree, mesh)
  assert replicated["w"].sharding.is_fully_replicated
  stacked = {"w": np.stack([np.full(3, i, np.float32) for i in range(8)])}
  np.testing.assert_array_equal(parallel.unreplicate(stacked)["w"], np.zeros(3))
