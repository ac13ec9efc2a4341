"""Sharded state on eight CPU devices: FSDP and tensor parallel give the one-device numbers,
hold a fraction of the state a device, initialise straight into their layout, and save
checkpoints that restore onto other meshes. (Two processes: tests/faults_test.py, SIGTERM.)"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jdl
from jdl import data, models, optim, parallel, sharding

MESHES = {
    "replicated": {"data": 8},
    "fsdp8": {"fsdp": 8},
    "fsdp4_tensor2": {"fsdp": 4, "tensor": 2},
}


def _plan(shape, fsdp_min_size=64):
  return sharding.ShardingPlan(sharding.make_mesh(shape), fsdp_min_size=fsdp_min_size)


def test_mesh_has_named_axes_fills_the_rest_and_refuses_what_does_not_fit():
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  assert tuple(mesh.axis_names) == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert dict(sharding.make_mesh({"data": -1, "tensor": 2}).shape) == {
      "data": 4, "fsdp": 1, "tensor": 2}
  assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match=r"unknown mesh axes \['model'\]"):
    sharding.make_mesh({"model": 2})
  with pytest.raises(ValueError, match="needs 16 devices but only 8"):
    sharding.make_mesh({"fsdp": 8, "tensor": 2})
  with pytest.raises(ValueError, match="3 does not divide 8"):
    sharding.make_mesh({"data": -1, "tensor": 3})
  with pytest.raises(ValueError, match="sharding rule 'mlp' names mesh axes \\['model'\\]"):
    sharding.ShardingPlan(mesh, rules={"mlp": "model"})


def test_array_specs_follow_the_rules_where_the_axes_divide_and_fsdp_takes_the_rest():
  plan = _plan({"fsdp": 4, "tensor": 2}, fsdp_min_size=1000)
  assert plan.array_spec((784, 128), ("embed", "mlp")) == P("fsdp", "tensor")
  assert plan.array_spec((128, 4, 32), ("embed", "heads", "kv")) == P("fsdp", "tensor", None)
  # Three input channels: "fsdp" does not divide them, so it splits the largest dimension it does.
  assert plan.array_spec((3, 3, 3, 64), (None, None, "conv_in", "conv_out")) == P(
      None, None, None, ("fsdp", "tensor"))
  assert plan.array_spec((8192,)) == P("fsdp")  # unnamed and large: FSDP's default
  assert plan.array_spec((128,)) == P(None)  # unnamed and small: replicated
  assert plan.array_spec((65, 128), ("vocab", "embed")) == P(None, "fsdp")  # 2 does not divide 65
  custom = sharding.ShardingPlan(plan.mesh, rules={"embed": (), "mlp": ("fsdp", "tensor")})
  assert custom.array_spec((784, 128), ("embed", "mlp")) == P(None, ("fsdp", "tensor"))
  with pytest.raises(ValueError, match=r"names \('embed',\) do not fit an array of shape"):
    plan.array_spec((4, 4), ("embed",))


def _lm():
  return models.TransformerLM(num_classes=64, block_size=16, num_layers=2, num_heads=4, width=64)


@pytest.mark.parametrize("tx_name", ["adam", "accumulated_ema"])
def test_init_is_laid_out_as_the_rules_say_and_equals_the_unsharded_init(tx_name):
  """Parameters, Adam's moments, an EMA and accumulated gradients all split as their parameter;
  nothing of full size is replicated; the values are those of the one-device init."""
  tx = optax.adam(1e-3)
  if tx_name == "accumulated_ema":
    tx = optax.MultiSteps(optim.with_parameter_ema(tx, 0.9), every_k_schedule=2)
  plan = _plan({"fsdp": 4, "tensor": 2})
  tokens = np.zeros((1, 16), np.int32)
  sharded = jdl.create_train_state(_lm(), tx, tokens, jax.random.key(0),
                                   shardings=plan.state_shardings)
  reference = jdl.create_train_state(_lm(), tx, tokens, jax.random.key(0))
  assert dict(sharded.param_axes)["blocks_0/attention/qkv/kernel"] == (
      "embed", None, "heads", "kv")
  kernel = sharded.params["blocks_0"]["mlp_in"]["kernel"]
  assert kernel.sharding.spec == P("fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (16, 128)
  for leaf in jax.tree.leaves(sharded.opt_state):
    if leaf.ndim == 2 and leaf.shape == kernel.shape:
      assert leaf.sharding.spec == P("fsdp", "tensor")
  for path, leaf in jax.tree_util.tree_leaves_with_path(sharded):
    if leaf.size >= 64:
      assert not leaf.sharding.is_fully_replicated, jax.tree_util.keystr(path)
  same = lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  jax.tree.map(same, sharded.params, reference.params)
  jax.tree.map(same, sharded.opt_state, reference.opt_state)
  # Checkpoint checksums are computed where the shards are and agree across layouts.
  assert jdl.checkpoint.array_checksums(sharded) == jdl.checkpoint.array_checksums(reference)


def _lm_data():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, size=(64, 17)).astype(np.int32)
  return data.ArraySource(tokens[:, :-1], tokens[:, 1:], 16, shuffle=True, seed=1)


def _resnet_data():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(64, 8, 8, 3)).astype(np.float32)
  labels = rng.integers(0, 4, size=(64,)).astype(np.int32)
  return data.ArraySource(images, labels, 16, shuffle=True, seed=1)


def _resnet():
  return models.ResNet(stage_sizes=(1, 1), block="basic", num_classes=4, width=16,
                       layout="cifar")


def _fit(make_model, make_data, mesh_shape, num_steps=20):
  runner = (parallel.make_runner("none") if mesh_shape is None else
            parallel.make_runner("shard", mesh_shape=mesh_shape, fsdp_min_size=64))
  train = make_data()
  state = jdl.create_train_state(make_model(), optax.adam(3e-3), train.inputs[:1],
                                 jax.random.key(0), shardings=runner.state_shardings)
  train_step, _ = jdl.make_steps(jdl.tasks.classification())
  return jdl.fit(state, train_step, None, train, None, num_steps=num_steps, eval_every_steps=5,
                 progress=False, runner=runner)


@pytest.fixture(scope="module")
def one_device_runs():
  return {name: _fit(*makers, None) for name, makers in
          {"lm": (_lm, _lm_data), "resnet": (_resnet, _resnet_data)}.items()}


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("model", ["lm", "resnet"])
def test_sharded_runs_give_the_one_device_losses(one_device_runs, model, mesh):
  makers = {"lm": (_lm, _lm_data), "resnet": (_resnet, _resnet_data)}[model]
  state, history = _fit(*makers, MESHES[mesh])
  reference = one_device_runs[model][1]
  assert len(history) == len(reference) == 4
  np.testing.assert_allclose([r["train_loss"] for r in history],
                             [r["train_loss"] for r in reference], rtol=2e-4, atol=1e-6)
  kernels = [leaf for leaf in jax.tree.leaves(state.params) if leaf.ndim >= 2 and leaf.size >= 256]
  assert kernels and all(k.sharding.is_fully_replicated == (mesh == "replicated") for k in kernels)


def _argument_bytes(runner, state, batch):
  train_step, _ = jdl.make_steps(jdl.tasks.classification())
  compiled_step, _ = runner.compile(train_step, None)
  analysis = compiled_step.lower(state, batch).compile().memory_analysis()
  batch_bytes = sum(np.asarray(v).nbytes for v in jax.tree.leaves(dict(batch))) / 8
  return analysis.argument_size_in_bytes - batch_bytes


def test_fsdp_over_eight_devices_holds_an_eighth_of_the_state_a_device():
  model = models.TransformerLM(num_classes=64, block_size=16, num_layers=2, num_heads=4, width=128)
  tokens = np.zeros((16, 16), np.int32)
  per_device = {}
  for name in ("replicated", "fsdp8"):
    runner = parallel.make_runner("shard", mesh_shape=MESHES[name])
    state = jdl.create_train_state(model, optax.adam(1e-3), tokens[:1], jax.random.key(0),
                                   shardings=runner.state_shardings)
    batch = runner.place_batch({"input": tokens, "label": tokens})
    per_device[name] = _argument_bytes(runner, state, batch)
  ratio = per_device["fsdp8"] / per_device["replicated"]
  assert ratio <= 0.15, (ratio, per_device)


def test_checkpoint_saved_on_eight_devices_restores_on_four_by_two_and_on_one(tmp_path):
  train = _lm_data()
  batch = next(iter(train.epoch(0)))
  train_step, _ = jdl.make_steps(jdl.tasks.classification())
  tx = optax.adam(3e-3)

  def next_loss(runner, state):
    compiled, _ = runner.compile(train_step, None)
    _, metrics = compiled(runner.place_state(state), runner.place_batch(batch))
    metrics = runner.fetch_metrics(metrics)
    return float(metrics["loss_sum"]) / float(metrics["count"])

  saving = parallel.make_runner("shard", mesh_shape={"fsdp": 8}, fsdp_min_size=64)
  state, _ = _fit(_lm, _lm_data, {"fsdp": 8}, num_steps=5)
  with jdl.Checkpointer(str(tmp_path)) as checkpointer:
    checkpointer.save(state)
  expected = next_loss(saving, state)  # donates the state: after the save
  for shape in ({"fsdp": 4, "tensor": 2}, None):
    runner = (parallel.make_runner("none") if shape is None else
              parallel.make_runner("shard", mesh_shape=shape, fsdp_min_size=64))
    template = jdl.create_train_state(_lm(), tx, train.inputs[:1], jax.random.key(1),
                                      shardings=runner.state_shardings)
    with jdl.Checkpointer(str(tmp_path)) as checkpointer:
      restored = checkpointer.restore(template, 5)
    if shape is not None:
      kernel = restored.params["blocks_0"]["mlp_in"]["kernel"]
      assert kernel.sharding.spec == P("fsdp", "tensor")
    assert int(restored.step) == 5
    assert math.isclose(next_loss(runner, restored), expected, rel_tol=1e-5)
