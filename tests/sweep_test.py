"""Sweeps: grids and random search, run_sweep and its reports, and the vmapped sweep, which must
end where separate runs end."""

import csv
import os

import jax
import numpy as np
import pytest

import jdl
from jdl import models, sweep, vmap_sweep

from experiments import mnist1d
from experiments import sweep as sweep_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Spaces and trials.


def test_grid_is_the_cartesian_product_with_the_last_key_fastest():
  space = {"optimizer.learning_rate": [1e-3, 1e-2], "optimizer.name": ["adam", "sgd"],
           "model.mlp.hidden": [(64,), (128, 64)], "model.mlp.activation": ["relu", "tanh", "gelu"]}
  trials = sweep.grid(space)
  assert len(trials) == 2 * 2 * 2 * 3
  assert trials[0] == {"optimizer.learning_rate": 1e-3, "optimizer.name": "adam",
                       "model.mlp.hidden": (64,), "model.mlp.activation": "relu"}
  assert trials[1]["model.mlp.activation"] == "tanh"
  assert trials[-1] == {"optimizer.learning_rate": 1e-2, "optimizer.name": "sgd",
                        "model.mlp.hidden": (128, 64), "model.mlp.activation": "gelu"}
  assert len({tuple(t.values()) for t in trials}) == len(trials)


@pytest.mark.parametrize("space,message", [
    ({}, "non-empty mapping"),
    ({"optimizer.name": "adam"}, "'optimizer.name' needs a non-empty list"),
    ({"optimizer.learning_rate": []}, "'optimizer.learning_rate' needs a non-empty list"),
    ({"optimizer.learning_rate": sweep.LogUniform(1e-4, 1e-1)}, "random_search"),
])
def test_grid_rejects_a_bad_space_naming_the_key(space, message):
  with pytest.raises(ValueError, match=message):
    sweep.grid(space)


def test_random_search_is_deterministic_for_a_seed_and_within_bounds():
  space = {"optimizer.learning_rate": sweep.LogUniform(1e-4, 1e-1),
           "optimizer.momentum": sweep.Uniform(0.5, 0.99),
           "batch_size": sweep.IntUniform(16, 18),
           "optimizer.name": ["adam", "sgd"]}
  trials = sweep.random_search(space, 300, seed=7)
  assert trials == sweep.random_search(space, 300, seed=7)
  assert trials != sweep.random_search(space, 300, seed=8)
  rates = np.array([t["optimizer.learning_rate"] for t in trials])
  assert rates.min() >= 1e-4 and rates.max() <= 1e-1
  # Log-uniform: about a third of the draws in each decade.
  assert 70 < np.sum(rates < 1e-3) < 130 and 70 < np.sum(rates > 1e-2) < 130
  assert all(0.5 <= t["optimizer.momentum"] <= 0.99 for t in trials)
  assert {t["batch_size"] for t in trials} == {16, 17, 18}
  assert all(isinstance(t["batch_size"], int) for t in trials)
  assert {t["optimizer.name"] for t in trials} == {"adam", "sgd"}


def test_distributions_reject_bad_bounds():
  with pytest.raises(ValueError, match="0 < low"):
    sweep.LogUniform(0.0, 1.0)
  with pytest.raises(ValueError, match="low < high"):
    sweep.Uniform(1.0, 1.0)
  with pytest.raises(ValueError, match="integer bounds"):
    sweep.IntUniform(1, 2.5)
  with pytest.raises(ValueError, match="num_trials >= 1"):
    sweep.random_search({"seed": [0]}, 0, seed=0)


def test_override_text_round_trips_through_apply_overrides():
  trial = {"optimizer.learning_rate": np.float32(0.003), "optimizer.name": "sgd",
           "model.mlp.hidden": [128, 64], "optimizer.nesterov": True, "batch_size": np.int64(7),
           "optimizer.clip_norm": None, "top_k": (5,)}
  config = jdl.apply_overrides(jdl.base_config(), sweep.trial_overrides(trial))
  assert config.optimizer.learning_rate == pytest.approx(0.003)
  assert config.optimizer.name == "sgd" and config.optimizer.nesterov is True
  assert config.model.mlp.hidden == (128, 64) and config.top_k == (5,)
  assert config.batch_size == 7 and config.optimizer.clip_norm is None


def test_space_from_json_makes_tuples_and_distributions():
  space = sweep.space_from_json({"model.mlp.hidden": [[64], [128, 64]],
                                 "optimizer.learning_rate": {"log_uniform": [1e-4, 1e-2]}})
  assert space["model.mlp.hidden"] == [(64,), (128, 64)]
  assert space["optimizer.learning_rate"] == sweep.LogUniform(1e-4, 1e-2)
  with pytest.raises(ValueError, match="a distribution is one of"):
    sweep.space_from_json({"optimizer.learning_rate": {"normal": [0, 1]}})


# ---------------------------------------------------------------------------------------------
# run_sweep with a fake train function, and its reports.


def _fake_train(calls):
  """A stand-in for train_and_evaluate: accuracy peaks at learning rate 1e-2, a learning rate of 1
  'diverges'."""

  def train(config, workdir):
    calls.append((config, workdir))
    rate = config.optimizer.learning_rate
    if rate >= 1.0:
      raise jdl.NonFiniteError("the loss became NaN or infinite at step 3; training stopped.")
    accuracy = 0.9 - 0.1 * abs(np.log10(rate) + 2) + (0.01 if config.optimizer.name == "adam" else 0)
    return None, [{"step": 10, "train_loss": 0.5, "test_accuracy": 0.1},
                  {"step": 20, "train_loss": 1.0 - accuracy, "test_accuracy": accuracy}]

  return train


def test_run_sweep_records_rows_failures_and_writes_sorted_reports(tmp_path):
  calls = []
  trials = sweep.grid({"optimizer.learning_rate": [1e-3, 1e-2, 1.0],
                       "optimizer.name": ["adam", "sgd"]})
  trials.append({"model.mlp.hidden": "not a tuple"})  # rejected by the config's type check
  rows = sweep.run_sweep(jdl.base_config(), trials, str(tmp_path),
                         train=_fake_train(calls), log=None)

  assert len(rows) == len(trials) == 7 and [r["trial"] for r in rows] == list(range(7))
  assert [c[1] for c in calls] == [str(tmp_path / f"trial_{i}") for i in range(6)]
  assert calls[3][0].optimizer.learning_rate == 1e-2 and calls[3][0].optimizer.name == "sgd"
  ok = [r for r in rows if r["status"] == "ok"]
  assert len(ok) == 4 and all(r["step"] == 20 and r["seconds"] >= 0 for r in ok)
  assert rows[2]["params"] == {"optimizer.learning_rate": 1e-2, "optimizer.name": "adam"}
  assert rows[2]["test_accuracy"] == pytest.approx(0.91)
  failed = {r["trial"]: r["error"] for r in rows if r["status"] == "failed"}
  assert set(failed) == {4, 5, 6}
  assert failed[4].startswith("NonFiniteError: the loss became NaN")
  assert failed[6].startswith("ConfigError:") and "model.mlp.hidden" in failed[6]
  assert sweep.best_row(rows) is rows[2]
  assert sweep.best_row(rows, "train_loss", "min") is rows[2]

  csv_path, markdown_path = sweep.write_results(rows, str(tmp_path))
  with open(csv_path, encoding="utf-8") as f:
    table = list(csv.DictReader(f))
  assert [int(r["trial"]) for r in table] == [2, 3, 0, 1, 4, 5, 6]  # best first, failed last
  assert [r["best"] for r in table] == ["True"] + ["False"] * 6
  assert table[0]["optimizer.learning_rate"] == "0.01" and table[0]["optimizer.name"] == "adam"
  assert table[-1]["model.mlp.hidden"] == "not a tuple" and table[-1]["status"] == "failed"
  markdown = open(markdown_path, encoding="utf-8").read().splitlines()
  assert markdown[0].startswith("| rank | trial | optimizer.learning_rate | optimizer.name | "
                                "model.mlp.hidden | test_accuracy |")
  assert markdown[2].startswith("| 1 | 2 | 0.01 | adam |") and markdown[2].endswith("| best |")
  assert "failed: NonFiniteError" in markdown[-3]

  png = sweep.plot_sweep(rows, str(tmp_path / "sweep.png"), x="optimizer.learning_rate",
                         group_by=["optimizer.name"])
  assert open(png, "rb").read(8) == PNG_MAGIC
  categorical = sweep.plot_sweep(rows, str(tmp_path / "names.png"), x="optimizer.name")
  assert os.path.getsize(categorical) > 1000
  with pytest.raises(ValueError, match="not a swept key"):
    sweep.plot_sweep(rows, str(tmp_path / "bad.png"), x="optimizer.momentum")

  # The same sweep again resumes its own trials; a different one is refused before any training.
  again = sweep.run_sweep(jdl.base_config(), trials[:2], str(tmp_path),
                          train=_fake_train(calls), log=None)
  assert [r["test_accuracy"] for r in again] == [r["test_accuracy"] for r in rows[:2]]
  with pytest.raises(ValueError, match="trial_0 holds the run of another trial"):
    sweep.run_sweep(jdl.base_config(), [{"optimizer.learning_rate": 0.5}],
                    str(tmp_path), train=_fake_train(calls), log=None)
  assert len(calls) == 8


def test_run_sweep_refuses_an_unknown_key_before_training(tmp_path):
  calls = []
  with pytest.raises(jdl.ConfigError, match="'optimizer.learning_rat'.*'optimizer.learning_rate'"):
    sweep.run_sweep(jdl.base_config(), [{"optimizer.learning_rat": 1e-3}],
                    str(tmp_path), train=_fake_train(calls), log=None)
  assert not calls
  with pytest.raises(ValueError, match="mode must be one of"):
    sweep.run_sweep(jdl.base_config(), [], str(tmp_path), mode="maximum")


def test_command_line_runs_a_grid_and_rejects_bad_input(tmp_path, capsys):
  calls = []
  workdir = tmp_path / "cli"
  rows = sweep_cli.run(
      ["--base=experiments.mnist1d", f"--workdir={workdir}", "--config.model.name=mlp",
       '--space={"optimizer.learning_rate": [1e-3, 1e-2], "model.mlp.hidden": [[8], [16, 8]]}'],
      train=_fake_train(calls))
  assert len(rows) == 4 and calls[0][0].model.name == "mlp"
  assert calls[1][0].model.mlp.hidden == (16, 8)
  assert all((workdir / name).is_file() for name in ("results.csv", "results.md", "sweep.png"))
  assert "| rank | trial | optimizer.learning_rate | model.mlp.hidden |" in capsys.readouterr().out

  with pytest.raises(jdl.ConfigError, match="--space is not valid JSON"):
    sweep_cli.run(["--space={'optimizer.learning_rate': [1e-3]}"])
  with pytest.raises(jdl.ConfigError, match="unknown config key 'optimizer.lr'"):
    sweep_cli.run(['--space={"optimizer.lr": [1e-3]}'])
  with pytest.raises(jdl.ConfigError, match="--random=N"):
    sweep_cli.run(['--space={"optimizer.learning_rate": {"log_uniform": [1e-4, 1e-2]}}'])
  with pytest.raises(jdl.ConfigError, match="cannot import"):
    sweep_cli.run(["--base=experiments.nope", '--space={"seed": [0]}'])
  with pytest.raises(jdl.ConfigError, match="unexpected argument '--lr=3'"):
    sweep_cli.run(['--space={"seed": [0]}', "--lr=3"])
  assert len(calls) == 4


# ---------------------------------------------------------------------------------------------
# The vmapped sweep.


@pytest.mark.parametrize("config", [
    {"name": "adam", "learning_rate": 3e-3},
    {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
    {"name": "adamw", "learning_rate": 1e-2, "weight_decay": 1e-2, "schedule": "warmup_cosine",
     "warmup_steps": 2, "clip_norm": 0.5},
    {"name": "rmsprop", "learning_rate": 1e-3, "ema_decay": 0.9, "accumulate_steps": 2},
], ids=["adam", "sgd-momentum-decay", "adamw-cosine-clip", "rmsprop-ema-accumulate"])
def test_member_optimizer_updates_like_make_optimizer(config):
  """The member optimizer (learning rate in the state) gives make_optimizer's parameters to float
  rounding, for every rule, schedule, clipping, weight decay, EMA and accumulation."""
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}
  reference, member = jdl.make_optimizer(config, total_steps=8), vmap_sweep.make_member_optimizer(
      {**config, "learning_rate": 1.0}, total_steps=8)
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
           for _ in range(8)]

  def train(opt_state, tx_index):
    tx, trained = (reference, member)[tx_index], params
    for step_grads in grads:
      updates, opt_state = tx.update(step_grads, opt_state, trained)
      trained = jax.tree.map(lambda p, u: p + u, trained, updates)
    return trained

  train = jax.jit(train, static_argnums=1)
  params_a = train(reference.init(params), 0)
  params_b = train(vmap_sweep.set_member_learning_rate(member.init(params), config["learning_rate"]), 1)
  # Two programs (the rate a constant, or a value in the state): a few float32 ulps per update.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               params_a, params_b)
  assert not np.allclose(params_a["w"], params["w"])


def _tiny_problem(num_examples=80, features=8, classes=3):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(num_examples, features)).astype(np.float32)
  y = ((x[:, 0] + x[:, 1] > 0).astype(np.int32) + (x[:, 2] > 0.5)).astype(np.int32)
  train = jdl.data.ArraySource(x[:64], y[:64], 16, shuffle=True, seed=3)
  test = jdl.data.ArraySource(x[64:], y[64:], 16, shuffle=False)
  return x, train, test, classes


def _separate_run(model, optimizer_config, x, train, test, seed, steps, train_step, eval_step):
  state = jdl.create_train_state(model, jdl.make_optimizer(optimizer_config), x[:1],
                                 jax.random.PRNGKey(seed))
  return jdl.fit(state, train_step, eval_step, train, test, num_steps=steps, eval_every_steps=steps,
                 progress=False, device_resident=True)


def test_vmapped_members_equal_separate_runs_and_a_diverging_member_is_contained():
  """Three members with their own learning rates and seeds (initialisation and dropout keys),
  trained at once on the same batches, end with the parameters and accuracies of three jdl.fit
  runs built with make_optimizer at those rates from those seeds, on the same data order; a fourth
  member whose loss blows up is reported as failed and changes nothing for the others."""
  x, train, test, classes = _tiny_problem()
  model = models.MLP(hidden=(8,), num_classes=classes, dropout_rate=0.3)
  rates, seeds, steps = [1e-3, 1e-2, 1e-1], [0, 1, 2], 12
  train_step, eval_step = jdl.make_train_step(check_finite=True), jdl.make_eval_step()
  run = vmap_sweep.train_vmapped(model, {"name": "adam"}, train, test, num_steps=steps,
                            learning_rates=[*rates, 1e30], seeds=[*seeds, 0],
                            eval_every_steps=steps, train_step=train_step, eval_step=eval_step)
  assert run.num_members == 4 and run.history[-1]["step"] == steps
  for i, (rate, seed) in enumerate(zip(rates, seeds)):
    state, history = _separate_run(model, {"name": "adam", "learning_rate": rate}, x, train, test,
                                   seed, steps, train_step, eval_step)
    # A vmapped program and a plain one round differently (a few float32 ulps a step); the
    # accuracies count examples and may differ by one that ties to rounding.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 run.member_state(i).params, state.params)
    assert run.history[-1]["test_accuracy"][i] == pytest.approx(history[-1]["test_accuracy"],
                                                                abs=1 / 16 + 1e-9)
    assert run.history[-1]["train_loss"][i] == pytest.approx(history[-1]["train_loss"], rel=1e-5)
    assert int(run.member_state(i).step) == steps
  kernels = np.asarray(run.params["Dense_0"]["kernel"])
  assert not np.allclose(kernels[0], kernels[1])  # the learning rates and seeds made a difference
  assert run.nonfinite_step[3] > 0 and list(run.nonfinite_step[:3]) == [0, 0, 0]
  rows = run.rows()
  assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
  assert "NaN or infinite at step" in rows[3]["error"]
  assert rows[1]["params"] == {"optimizer.learning_rate": 1e-2, "seed": 1}


def test_train_vmapped_rejects_mismatched_member_lists():
  x, train, test, classes = _tiny_problem()
  del x, test
  with pytest.raises(ValueError, match="seeds has 2 values but the sweep has 3 members"):
    vmap_sweep.train_vmapped(models.MLP(hidden=(4,), num_classes=classes), {"name": "adam"}, train,
                        num_steps=2, learning_rates=[1e-3, 1e-2, 1e-1], seeds=[0, 1])
  with pytest.raises(ValueError, match="finite and > 0"):
    vmap_sweep.train_vmapped(models.MLP(hidden=(4,), num_classes=classes), {"name": "adam"}, train,
                        num_steps=2, learning_rates=[0.0])


# ---------------------------------------------------------------------------------------------
# Real runs on MNIST-1D.


def _tiny_mnist1d_config(data_dir):
  return jdl.apply_overrides(mnist1d.get_config(), [
      f"data_dir={data_dir}", "model.name=mlp", "model.mlp.hidden=(16,)", "num_steps=40",
      "eval_every_steps=40", "progress=false", "batch_size=96", "eval_batch_size=500",
      "checkpoint=false", "layout=none"])


def test_real_sweep_on_mnist1d_and_its_vmapped_twin(tmp_path, mnist1d_data_dir):
  """run_sweep trains two learning rates for real; vmap_sweep on the same trials ends with the
  same parameters and test accuracies, in one vmapped run."""
  config = _tiny_mnist1d_config(mnist1d_data_dir)
  trials = sweep.grid({"optimizer.learning_rate": [3e-3, 3e-2]})
  states = []

  def train(trial_config, workdir):
    state, history = jdl.train_and_evaluate(trial_config, workdir)
    states.append(state)
    return state, history

  rows = sweep.run_sweep(config, trials, str(tmp_path), train=train, log=None)
  assert [r["status"] for r in rows] == ["ok", "ok"], rows
  for row, trial in zip(rows, trials):
    assert row["step"] == 40 and 0.1 < row["test_accuracy"] <= 1.0
    assert row["learning_rate"] == pytest.approx(trial["optimizer.learning_rate"])
    assert os.path.isfile(os.path.join(row["workdir"], "metrics.jsonl"))

  run = vmap_sweep.vmap_sweep(config, trials)
  for i, (row, state) in enumerate(zip(rows, states)):
    # Vmapped and separate runs are different programs: see the test above.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 run.member_state(i).params, state.params)
    assert run.history[-1]["test_accuracy"][i] == pytest.approx(row["test_accuracy"], abs=1.01e-3)
  vmapped_rows = run.rows()
  assert [r["params"]["optimizer.learning_rate"] for r in vmapped_rows] == [3e-3, 3e-2]
  with pytest.raises(jdl.ConfigError, match="varies only"):
    vmap_sweep.vmap_sweep(config, [{"optimizer.name": "sgd"}])
