"""Transfer learning: partial restore by path, freezing, per-group optimizers, the config hook and
the MNIST-1D transfer experiment."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdl
from jdl import experiment, models, optim, runs, transfer

from experiments import mnist1d, mnist1d_transfer


def _state(hidden=(8,), num_classes=3, *, seed=0, tx=None, normalization=None):
  model = models.MLP(hidden=hidden, num_classes=num_classes, normalization=normalization)
  return jdl.create_train_state(model, tx or optax.adam(1e-2), np.zeros((1, 6), np.float32),
                                jax.random.PRNGKey(seed))


def _leaves(tree):
  return {path: np.asarray(leaf) for path, leaf in transfer.named_leaves(tree).items()}


def _assert_bitwise_equal(a, b, what):
  assert a.dtype == b.dtype and a.shape == b.shape, what
  assert a.tobytes() == b.tobytes(), what


def _floats(rates):
  return {name: float(rate) for name, rate in rates.items()}


def _batches(num_classes=3, seed=0):
  rng = np.random.default_rng(seed)
  return [{"input": rng.normal(size=(16, 6)).astype(np.float32),
           "label": rng.integers(0, num_classes, size=16).astype(np.int32)} for _ in range(5)]


def _train(state, num_classes=3):
  """Five steps of a compiled train step that donates the state's buffers, as jdl.fit does."""
  train_step = jax.jit(jdl.make_train_step(jdl.tasks.classification(jdl.softmax_cross_entropy)), donate_argnums=0)
  for batch in _batches(num_classes):
    state, _ = train_step(state, batch)
  return state


# ---------------------------------------------------------------------------------------------
# Partial restore.


def test_partial_restore_loads_every_matching_parameter_and_reports_the_rest():
  """A deeper model with another head: the shared first layer is copied bit for bit, the layer
  whose shape differs and the layer the source lacks keep their initialisation, and the report
  lists each with its shapes."""
  source = _state(hidden=(8,), num_classes=3, seed=1).params  # Dense_0 6->8, Dense_1 8->3
  target = _state(hidden=(8, 4), num_classes=5, seed=2).params  # ... Dense_1 8->4, Dense_2 4->5
  params, report = transfer.load_pretrained(target, source)

  assert report.loaded == ("Dense_0/bias", "Dense_0/kernel")
  assert {m.path: (m.source.shape, m.target.shape) for m in report.skipped_shape_mismatch} == {
      "Dense_1/bias": ((3,), (4,)), "Dense_1/kernel": ((8, 3), (8, 4))}
  assert report.missing_in_source == ("Dense_2/bias", "Dense_2/kernel")
  assert report.unused_in_source == () and report.skipped_by_pattern == ()
  got, src, init = _leaves(params), _leaves(source), _leaves(target)
  for path in report.loaded:
    _assert_bitwise_equal(got[path], src[path], path)
  for path in report.kept_initialised:
    _assert_bitwise_equal(got[path], init[path], path)
  assert jax.tree.structure(params) == jax.tree.structure(target)

  text = str(report)
  assert text.startswith("loaded 2 of 6 parameters (56 of 117 values)")
  assert "shape mismatch" in text and "float32[8, 4]" in text and "float32[8, 3]" in text
  assert "missing in source  Dense_2/kernel" in text and "loaded: Dense_0 (2)" in text


def test_rename_and_skip():
  """rename maps a source prefix onto the target's paths; skip keeps matched target parameters
  initialised; source parameters without a target are reported unused."""
  pretrained = _state(seed=1).params
  source = {"backbone": pretrained, "projector": {"kernel": jnp.ones((3, 2))}}
  target = _state(seed=2).params
  params, report = transfer.load_pretrained(target, source, rename={"backbone/": ""},
                                            skip=("Dense_1",))
  assert report.loaded == ("Dense_0/bias", "Dense_0/kernel")
  assert report.skipped_by_pattern == ("Dense_1/bias", "Dense_1/kernel")
  assert report.unused_in_source == ("projector/kernel",)
  got, src, init = _leaves(params), _leaves(pretrained), _leaves(target)
  _assert_bitwise_equal(got["Dense_0/kernel"], src["Dense_0/kernel"], "loaded")
  _assert_bitwise_equal(got["Dense_1/kernel"], init["Dense_1/kernel"], "skipped")
  # The reverse direction, with (old, new) pairs: target paths under a new prefix.
  wrapped, report = transfer.load_pretrained({"encoder": target}, pretrained,
                                             rename=[("", "encoder/")])
  assert len(report.loaded) == 4
  _assert_bitwise_equal(_leaves(wrapped)["encoder/Dense_1/bias"], src["Dense_1/bias"], "pairs")


def test_patterns_and_prefixes_that_match_nothing_are_errors():
  """A misspelt pattern or prefix fails loudly and lists the paths there are."""
  params = _state().params
  paths = r"Dense_0/bias, Dense_0/kernel, Dense_1/bias, Dense_1/kernel"
  with pytest.raises(ValueError, match=r"freeze pattern\(s\) \['Dense_9'\] match no parameter.*"
                                       + paths):
    transfer.trainable_mask(params, ("Dense_0", "Dense_9"))
  with pytest.raises(ValueError, match="match no parameter"):
    transfer.freeze(optax.adam(1e-3), params, "dense_0/*")  # case-sensitive
  with pytest.raises(ValueError, match=r"group 'group_0' pattern\(s\) \['Conv_\*'\] match no"):
    transfer.per_group_optimizer([("Conv_*", {"learning_rate": 1e-2})], params, default={})
  with pytest.raises(ValueError, match=r"skip pattern\(s\) \['Head'\] match no parameter"):
    transfer.load_pretrained(params, params, skip="Head")
  with pytest.raises(ValueError, match=r"rename prefix\(es\) \['backbone/'\] start no source"):
    transfer.load_pretrained(params, params, rename={"backbone/": ""})
  with pytest.raises(ValueError, match="nothing would be loaded"):
    transfer.load_pretrained(params, {"other": params})
  with pytest.raises(ValueError, match="are both renamed to 'Dense_0/kernel'"):
    transfer.load_pretrained(params, {"a": {"kernel": 1.0 * params["Dense_0"]["kernel"]},
                                      "Dense_0": {"kernel": params["Dense_0"]["kernel"]}},
                             rename={"a/": "Dense_0/"})
  # "Dense_1" names a module, so it does not reach "Dense_10"; a glob does what it says.
  assert transfer.path_matches("Dense_1/kernel", "Dense_1")
  assert not transfer.path_matches("Dense_10/kernel", "Dense_1")
  assert transfer.path_matches("Dense_10/kernel", "Dense_1*")


def test_batch_stats_are_loaded_and_the_optimizer_starts_fresh():
  """load_pretrained_state copies BatchNorm statistics too, and re-initialises the optimizer
  state (Adam's moments at zero, its count at 0) instead of copying the source's. The loaded
  arrays are copies: training the new state, which donates its buffers, leaves the source
  intact."""
  source = _train(_state(normalization="batch", seed=1))
  target = _state(num_classes=5, normalization="batch", seed=2)
  state, report = transfer.load_pretrained_state(target, source)
  assert "batch_stats/BatchNorm_0/mean" in report.loaded
  assert "batch_stats/BatchNorm_0/var" in report.loaded
  assert "BatchNorm_0/scale" in report.loaded
  assert {m.path for m in report.skipped_shape_mismatch} == {"Dense_1/bias", "Dense_1/kernel"}
  got, src = _leaves(state.model_state), _leaves(source.model_state)
  for path in got:
    _assert_bitwise_equal(got[path], src[path], path)
  assert not np.array_equal(src["batch_stats/BatchNorm_0/mean"], 0)  # trained, not initial
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(target.opt_state)
  assert int(state.opt_state[0].count) == 0 and int(source.opt_state[0].count) == 5
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(state.opt_state[0].mu))
  assert int(state.step) == 0
  source_params = _leaves(source.params)
  _train(state)
  for path, value in _leaves(source.params).items():
    _assert_bitwise_equal(value, source_params[path], f"source {path} after training the copy")


# ---------------------------------------------------------------------------------------------
# Freezing and per-group optimizers.


@pytest.mark.parametrize("config", [
    {"name": "adamw", "learning_rate": 1e-2, "weight_decay": 0.1, "weight_decay_mask": "all",
     "b1": 0.9},
    {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "weight_decay": 0.01,
     "weight_decay_mask": "all", "clip_norm": 1.0},
], ids=["adamw", "sgd-momentum"])
def test_frozen_parameters_never_change(config):
  """Frozen parameters stay bitwise equal through training with weight decay and momentum;
  the others move. The learning rate is still readable from the state."""
  params = _state().params
  tx = transfer.freeze(jdl.make_optimizer(config), params, ("Dense_0",))
  state = _train(_state(tx=tx))
  before, after = _leaves(params), _leaves(state.params)
  for path in ("Dense_0/kernel", "Dense_0/bias"):
    _assert_bitwise_equal(after[path], before[path], path)
  for path in ("Dense_1/kernel", "Dense_1/bias"):
    assert not np.array_equal(after[path], before[path]), path
  assert float(jdl.current_learning_rate(state.opt_state)) == pytest.approx(
      config["learning_rate"])
  assert _floats(transfer.group_learning_rates(state.opt_state)) == pytest.approx(
      {"trainable": config["learning_rate"]})
  mask = transfer.trainable_mask(params, "Dense_0/*")
  assert mask == {"Dense_0": {"bias": False, "kernel": False},
                  "Dense_1": {"bias": True, "kernel": True}}


def test_freeze_refuses_an_optimizer_with_a_parameter_ema():
  params = _state().params
  with pytest.raises(ValueError, match="per_group_optimizer"):
    transfer.freeze(jdl.make_optimizer({"ema_decay": 0.9}), params, "Dense_0")


def test_per_group_learning_rates_under_sgd():
  """Under plain SGD each group moves by exactly -lr * grad with its own lr; a group with
  learning rate 0 does not move; group_learning_rates reads each trainable group's rate."""
  params = _state().params
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5) + jnp.arange(p.size).reshape(p.shape)
                       / 7, params)
  tx = transfer.per_group_optimizer(
      [("head", "Dense_1/kernel", {"learning_rate": 0.1}),
       ("Dense_1", {"learning_rate": 0.0}),  # Dense_1/bias: the kernel went to "head"
       ], params, default={"name": "sgd", "learning_rate": 0.01})
  opt_state = tx.init(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  new = _leaves(optax.apply_updates(params, updates))
  old, g = _leaves(params), _leaves(grads)
  expected = {"Dense_1/kernel": 0.1, "Dense_0/kernel": 0.01, "Dense_0/bias": 0.01}
  for path, learning_rate in expected.items():
    np.testing.assert_array_equal(
        new[path], old[path] + g[path] * -np.float32(learning_rate), err_msg=path)
  _assert_bitwise_equal(new["Dense_1/bias"], old["Dense_1/bias"], "lr 0")
  rates = _floats(transfer.group_learning_rates(opt_state))
  assert rates == pytest.approx({"head": 0.1, "default": 0.01})
  # jdl.current_learning_rate needs a single rate and refuses several (see group_learning_rates).
  with pytest.raises(ValueError, match="found 2"):
    jdl.current_learning_rate(opt_state)


def test_per_group_optimizer_checks_and_whole_optimizer_keys():
  """A group shadowed by an earlier one is an error; accumulate_steps and ema_decay come from
  default and wrap all groups, so the EMA covers every parameter and frozen ones stay put."""
  params = _state().params
  with pytest.raises(ValueError, match=r"group\(s\) \['group_1'\] claim no parameter"):
    transfer.per_group_optimizer([("Dense_*", None), ("Dense_0", None)], params, default={})
  with pytest.raises(ValueError, match="applies to the whole optimizer"):
    transfer.per_group_optimizer([("Dense_0", {"ema_decay": 0.5})], params, default={})
  tx = transfer.per_group_optimizer(
      [("Dense_0", {"frozen": True})], params,
      default={"name": "sgd", "learning_rate": 0.1, "ema_decay": 0.5, "accumulate_steps": 2})
  state = _train(_state(tx=tx))  # 5 micro-steps: 2 applied updates
  ema = optim.ema_parameters(state.opt_state)
  assert jax.tree.structure(ema) == jax.tree.structure(params)
  _assert_bitwise_equal(np.asarray(ema["Dense_0"]["kernel"]),
                        np.asarray(params["Dense_0"]["kernel"]), "frozen in the EMA")
  _assert_bitwise_equal(np.asarray(state.params["Dense_0"]["kernel"]),
                        np.asarray(params["Dense_0"]["kernel"]), "frozen")
  assert not np.array_equal(state.params["Dense_1"]["kernel"], params["Dense_1"]["kernel"])
  with pytest.raises(ValueError, match="found 0"):  # a plain optimizer's state has no groups
    transfer.group_learning_rates(optax.adam(1e-3).init(params))


# ---------------------------------------------------------------------------------------------
# From a trained workdir, and the config hook.


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory, mnist1d_data_dir):
  """A tiny MNIST-1D MLP with BatchNorm, trained by train_and_evaluate."""
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  config = mnist1d.get_config()
  config.model.mlp.normalization = "batch"
  config = jdl.apply_overrides(config, [
      f"data_dir={mnist1d_data_dir}", "model.name=mlp", "model.mlp.hidden=(16,)", "num_steps=20",
      "eval_every_steps=20", "progress=false",
      "batch_size=100", "eval_batch_size=500", "layout=none"])
  jdl.train_and_evaluate(config, workdir)
  return workdir


def test_load_pretrained_from_workdir(trained_workdir):
  """The trained run's params and BatchNorm statistics go into a model with a 5-class head; the
  head keeps its initialisation and the optimizer starts fresh."""
  run = runs.load_run(trained_workdir, log=lambda message: None)
  model = models.MLP(hidden=(16,), num_classes=5, normalization="batch")
  tx = jdl.make_optimizer({"name": "adam", "learning_rate": 1e-3})
  target = jdl.create_train_state(model, tx, np.zeros((1, 40), np.float32),
                                  jax.random.PRNGKey(3))
  init = _leaves(target.params)
  state, report = runs.load_pretrained_from_workdir(target, trained_workdir)
  assert set(report.loaded) == {"Dense_0/kernel", "BatchNorm_0/scale", "BatchNorm_0/bias",
                                "batch_stats/BatchNorm_0/mean", "batch_stats/BatchNorm_0/var"}
  assert {m.path for m in report.skipped_shape_mismatch} == {"Dense_1/kernel", "Dense_1/bias"}
  got = {**_leaves(state.params), **_leaves(state.model_state)}
  src = {**_leaves(run.state.params), **_leaves(run.state.model_state)}
  for path in report.loaded:
    _assert_bitwise_equal(got[path], src[path], path)
  _assert_bitwise_equal(got["Dense_1/kernel"], init["Dense_1/kernel"], "head")
  fresh = _leaves(tx.init(state.params))
  for path, value in _leaves(state.opt_state).items():
    _assert_bitwise_equal(value, fresh[path], f"opt_state {path}")
  assert int(run.state.step) == 20 and int(state.step) == 0


def test_apply_transfer_config(trained_workdir):
  """config.transfer: freeze the backbone, load from the workdir, re-initialise the head; a
  train step then moves the head only."""
  config = transfer.transfer_config()
  config.init_from = trained_workdir
  config.skip = ("Dense_1",)
  config.freeze = ("Dense_0", "BatchNorm_0")
  model = models.MLP(hidden=(16,), num_classes=10, normalization="batch")
  target = jdl.create_train_state(model, jdl.make_optimizer({"learning_rate": 1e-2}),
                                  np.zeros((1, 40), np.float32), jax.random.PRNGKey(3))
  messages = []
  state = runs.apply_transfer_config(target, config, log=messages.append)
  assert "initialised from" in messages[-1] and "skipped (pattern)  Dense_1/kernel" in messages[-1]
  run = runs.load_run(trained_workdir, log=lambda message: None)
  _assert_bitwise_equal(np.asarray(state.params["Dense_0"]["kernel"]),
                        np.asarray(run.state.params["Dense_0"]["kernel"]), "loaded")
  rng = np.random.default_rng(0)
  batch = {"input": rng.normal(size=(8, 40)).astype(np.float32),
           "label": rng.integers(0, 10, size=8).astype(np.int32)}
  before = _leaves(state.params)
  after, _ = jax.jit(jdl.make_steps()[0])(state, batch)
  after = _leaves(after.params)
  for path in ("Dense_0/kernel", "BatchNorm_0/scale", "BatchNorm_0/bias"):
    _assert_bitwise_equal(after[path], before[path], path)
  assert not np.array_equal(after["Dense_1/kernel"], before["Dense_1/kernel"])
  # The structural part alone, as a fine-tuned run's checkpoint template needs it.
  template = runs.apply_transfer_config(target, config, load=False)
  assert jax.tree.structure(template.opt_state) == jax.tree.structure(state.opt_state)
  assert runs.apply_transfer_config(target, None) is target
  with pytest.raises(ValueError, match="unknown config.transfer keys"):
    runs.apply_transfer_config(target, {"init_form": trained_workdir})


# ---------------------------------------------------------------------------------------------
# The experiment.


def test_mnist1d_transfer_experiment_prints_its_table(tmp_path, mnist1d_data_dir, capsys):
  """A tiny run (an MLP, few steps, one seed, three of the methods) prints the table."""
  rows = experiment.run_experiment(
      mnist1d_transfer.get_config,
      ["--workdir=" + str(tmp_path), "--config.data_dir=" + mnist1d_data_dir,
       "--config.model.name=mlp", "--config.model.mlp.hidden=(16,)",
       "--config.pretrain.num_steps=40", "--config.finetune.num_steps=10",
       "--config.finetune.shots=(5,)", "--config.seeds=(0,)",
       "--config.methods=('frozen', 'finetune_lowlr', 'scratch')"],
      name="mnist1d_transfer", train=mnist1d_transfer.run)
  assert [(r["shots"], r["method"]) for r in rows] == [
      (5, "frozen"), (5, "finetune_lowlr"), (5, "scratch")]
  for row in rows:
    assert 0.0 <= row["test_accuracy"] <= 1.0 and len(row["accuracies"]) == 1
  out = capsys.readouterr().out
  assert "test accuracy" in out and "finetune_lowlr" in out
  assert "head ('Dense_1',) re-initialised" in out  # the last module, found by itself
  assert "skipped (pattern)  Dense_1/kernel" in out  # the transfer report
  assert (tmp_path / "results.json").is_file()
