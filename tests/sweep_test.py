"""Sweeps on Optuna: spaces, studies kept in SQLite (resumed after a kill, shared by two workers),
pruning from evaluation records, the results, and the vmapped sweep, which must end where
separate runs end."""

import csv
import os
import subprocess
import sys
import time

import jax
import numpy as np
import optuna
import pytest

import jdl
from jdl import models, sweep, vmap_sweep
from jdl.analysis import plots

from experiments import mnist1d
from experiments import sweep as sweep_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WORKER = os.path.join(os.path.dirname(__file__), "sweep_worker.py")


# ---------------------------------------------------------------------------------------------
# Spaces.


def test_space_from_json_gives_optuna_distributions():
  space = sweep.space_from_json({
      "optimizer.learning_rate": {"log_uniform": [1e-4, 1e-1]},
      "optimizer.momentum": {"uniform": [0.5, 0.99]}, "batch_size": {"int": [16, 64]},
      "model.mlp.hidden": [[64], [128, 64]], "optimizer.name": ["adam", "sgd"]})
  assert space["optimizer.learning_rate"] == optuna.distributions.FloatDistribution(
      1e-4, 1e-1, log=True)
  assert space["optimizer.momentum"] == optuna.distributions.FloatDistribution(0.5, 0.99)
  assert space["batch_size"] == optuna.distributions.IntDistribution(16, 64)
  # Tuples are kept as their override text, which Optuna can store and the config reads back.
  assert space["model.mlp.hidden"].choices == ("(64,)", "(128, 64)")
  assert space["optimizer.name"].choices == ("adam", "sgd")
  config = jdl.apply_overrides(jdl.base_config(), sweep.trial_overrides(
      {"model.mlp.hidden": "(128, 64)", "optimizer.learning_rate": 3e-3}))
  assert config.model.mlp.hidden == (128, 64) and config.optimizer.learning_rate == 3e-3
  assert sweep.grid_size({k: space[k] for k in ("model.mlp.hidden", "optimizer.name")}) == 4
  with pytest.raises(ValueError, match="a grid needs a list of values for 'optimizer.learning_"):
    sweep.grid_of(space)


@pytest.mark.parametrize("space,message", [
    ({}, "non-empty JSON object"),
    ({"optimizer.name": "adam"}, "'optimizer.name' needs a list of choices"),
    ({"optimizer.learning_rate": []}, "empty list of choices"),
    ({"optimizer.learning_rate": {"normal": [0, 1]}}, "needs a list of choices or one of"),
    ({"optimizer.learning_rate": {"log_uniform": [0, 1]}}, "0 < low < high"),
    ({"batch_size": {"int": [1, 2.5]}}, "integers low <= high"),
])
def test_space_from_json_rejects_a_bad_space_naming_the_key(space, message):
  with pytest.raises(ValueError, match=message):
    sweep.space_from_json(space)


def test_override_text_round_trips_through_apply_overrides():
  trial = {"optimizer.learning_rate": np.float32(0.003), "optimizer.name": "sgd",
           "model.mlp.hidden": [128, 64], "optimizer.nesterov": True, "batch_size": np.int64(7),
           "optimizer.clip_norm": None, "top_k": (5,)}
  config = jdl.apply_overrides(jdl.base_config(), sweep.trial_overrides(trial))
  assert config.optimizer.learning_rate == pytest.approx(0.003)
  assert config.optimizer.name == "sgd" and config.optimizer.nesterov is True
  assert config.model.mlp.hidden == (128, 64) and config.top_k == (5,)
  assert config.batch_size == 7 and config.optimizer.clip_norm is None


# ---------------------------------------------------------------------------------------------
# Studies with a stand-in for training.


def _fake_train(calls):
  """A stand-in for train_and_evaluate: accuracy peaks at learning rate 1e-2 and grows over two
  evaluations (reported through the hooks); a learning rate of 1 'diverges'."""

  def train(config, workdir, hooks):
    calls.append((config, workdir))
    rate = config.optimizer.learning_rate
    if rate >= 1.0:
      raise jdl.NonFiniteError("the loss became NaN or infinite at step 3; training stopped.")
    accuracy = 0.9 - 0.1 * abs(np.log10(rate) + 2) + 0.01 * (config.optimizer.name == "adam")
    history = []
    for step, value in ((10, accuracy - 0.2), (20, accuracy)):
      history.append({"step": step, "train_loss": 1.0 - value, "test_accuracy": value})
      for hook in hooks:
        hook(step, None, history[-1])
    return None, history

  return train


def test_grid_study_records_failures_and_writes_sorted_results(tmp_path):
  calls = []
  space = sweep.space_from_json({"optimizer.learning_rate": [1e-3, 1e-2, 1.0],
                                 "optimizer.name": ["adam", "sgd"]})
  study = sweep.open_study(str(tmp_path), space, sampler=sweep.make_sampler("grid", space),
                           pruner=sweep.make_pruner("none"))
  assert (tmp_path / "study.db").is_file()
  sweep.run_study(study, jdl.base_config(), space, str(tmp_path), 6, train=_fake_train(calls),
                  log=None)
  rows = sweep.study_rows(study)
  assert len(rows) == len(calls) == 6 and [r["trial"] for r in rows] == list(range(6))
  points = {(r["params"]["optimizer.learning_rate"], r["params"]["optimizer.name"]) for r in rows}
  assert len(points) == 6  # every grid point once
  assert {c[1] for c in calls} == {str(tmp_path / f"trial_{i}") for i in range(6)}
  failed = [r for r in rows if r["status"] == "failed"]
  assert len(failed) == 2 and all(r["error"].startswith("NonFiniteError: the loss became NaN")
                                  for r in failed)
  best = sweep.best_row(rows)
  assert best["params"] == {"optimizer.learning_rate": 1e-2, "optimizer.name": "adam"}
  assert best["test_accuracy"] == pytest.approx(0.91) and best["step"] == 20
  assert study.best_trial.number == best["trial"]
  # The study is in the SQLite file: any process can read it back.
  stored = optuna.load_study(study_name="sweep", storage=sweep.default_storage(str(tmp_path)))
  assert [t.params for t in stored.trials] == [t.params for t in study.trials]

  csv_path, markdown_path = sweep.write_results(rows, str(tmp_path))
  with open(csv_path, encoding="utf-8") as f:
    table = list(csv.DictReader(f))
  assert [r["best"] for r in table] == ["True"] + ["False"] * 5
  assert [r["status"] for r in table] == ["ok"] * 4 + ["failed"] * 2  # best first, failed last
  assert table[0]["optimizer.learning_rate"] == "0.01" and table[0]["optimizer.name"] == "adam"
  markdown = open(markdown_path, encoding="utf-8").read().splitlines()
  assert markdown[0].startswith("| rank | trial | optimizer.learning_rate | optimizer.name | "
                                "test_accuracy |")
  assert "| 0.01 | adam | 0.9100 |" in markdown[2] and markdown[2].endswith("| best |")
  assert "failed: NonFiniteError" in markdown[-1]
  png = plots.plot_sweep(rows, str(tmp_path / "sweep.png"), x="optimizer.learning_rate")
  assert open(png, "rb").read(8) == PNG_MAGIC
  assert os.path.getsize(plots.plot_sweep(rows, str(tmp_path / "names.png"),
                                          x="optimizer.name")) > 1000
  assert os.path.getsize(plots.plot_trial_curves(rows, str(tmp_path / "history.png"))) > 1000
  for row in rows:  # every evaluation was reported to the study
    if row["status"] == "ok":
      assert list(row["curve"]) == [10, 20] and row["curve"][20] == row["test_accuracy"]
      assert row["curve"][10] == pytest.approx(row["curve"][20] - 0.2)
  with pytest.raises(ValueError, match="not a swept key"):
    plots.plot_sweep(rows, str(tmp_path / "bad.png"), x="optimizer.momentum")

  # The grid is done: running the study again trains nothing; another space is refused.
  sweep.run_study(study, jdl.base_config(), space, str(tmp_path), 6, train=_fake_train(calls))
  assert len(calls) == 6
  with pytest.raises(jdl.ConfigError, match="sweeps another space"):
    sweep.open_study(str(tmp_path), sweep.space_from_json({"seed": [0, 1]}))
  with pytest.raises(jdl.ConfigError, match="to maximize its metric, not to minimize"):
    sweep.open_study(str(tmp_path), space, mode="min")


def test_run_study_refuses_an_unknown_key_before_training(tmp_path):
  calls = []
  space = sweep.space_from_json({"optimizer.learning_rat": [1e-3]})
  study = sweep.open_study(str(tmp_path), space)
  with pytest.raises(jdl.ConfigError, match="'optimizer.learning_rat'.*'optimizer.learning_rate'"):
    sweep.run_study(study, jdl.base_config(), space, str(tmp_path), 1, train=_fake_train(calls))
  assert not calls and not study.trials
  with pytest.raises(ValueError, match="mode must be one of"):
    sweep.open_study(str(tmp_path / "other"), space, mode="maximum")


def test_command_line_runs_a_study_and_rejects_bad_input(tmp_path, capsys):
  calls = []
  workdir = tmp_path / "cli"
  rows = sweep_cli.run(
      ["--base=experiments.mnist1d", f"--workdir={workdir}", "--config.model.name=mlp",
       "--trials=3", "--seed=0",
       '--space={"optimizer.learning_rate": {"log_uniform": [1e-4, 1e-1]}, '
       '"model.mlp.hidden": [[8], [16, 8]]}'], train=_fake_train(calls))
  assert len(rows) == 3 and all(c[0].model.name == "mlp" for c in calls)
  assert {c[0].model.mlp.hidden for c in calls} <= {(8,), (16, 8)}
  assert all(1e-4 <= c[0].optimizer.learning_rate <= 1e-1 for c in calls)
  for name in ("results.csv", "results.md", "sweep.png", "history.png", "study.db"):
    assert (workdir / name).is_file(), name
  assert "| rank | trial | optimizer.learning_rate | model.mlp.hidden |" in capsys.readouterr().out
  # The same command again: the study has its 3 trials, so nothing trains; --trials=4 adds one.
  sweep_cli.run([f"--workdir={workdir}", "--config.model.name=mlp", "--trials=4",
                 '--space={"optimizer.learning_rate": {"log_uniform": [1e-4, 1e-1]}, '
                 '"model.mlp.hidden": [[8], [16, 8]]}'], train=_fake_train(calls))
  assert len(calls) == 4 and calls[-1][1] == str(workdir / "trial_3")
  space_file = tmp_path / "space.json"  # the same space from a file: one more trial
  space_file.write_text('{"optimizer.learning_rate": {"log_uniform": [1e-4, 1e-1]}, '
                        '"model.mlp.hidden": [[8], [16, 8]]}')
  sweep_cli.run([f"--workdir={workdir}", "--config.model.name=mlp", "--trials=5",
                 f"--space={space_file}"], train=_fake_train(calls))
  assert len(calls) == 5

  with pytest.raises(jdl.ConfigError, match="--space is not valid JSON"):
    sweep_cli.run(["--space={'optimizer.learning_rate': [1e-3]}"])
  with pytest.raises(jdl.ConfigError, match="unknown config key 'optimizer.lr'"):
    sweep_cli.run(['--space={"optimizer.lr": [1e-3]}'])
  with pytest.raises(jdl.ConfigError, match="a grid needs a list of values"):
    sweep_cli.run(["--sampler=grid", f"--workdir={tmp_path / 'g'}",
                   '--space={"optimizer.learning_rate": {"log_uniform": [1e-4, 1e-2]}}'])
  with pytest.raises(jdl.ConfigError, match="cannot import"):
    sweep_cli.run(["--base=experiments.nope", '--space={"seed": [0]}'])
  with pytest.raises(jdl.ConfigError, match="unexpected argument '--lr=3'"):
    sweep_cli.run(['--space={"seed": [0]}', "--lr=3"])
  with pytest.raises(jdl.ConfigError, match="varies only"):
    sweep_cli.run(["--vmap=2", f"--workdir={tmp_path / 'v'}",
                   '--space={"optimizer.name": ["sgd"]}'])
  with pytest.raises(jdl.ConfigError, match="cannot read it"):
    sweep_cli.run([f"--space={tmp_path / 'missing.json'}"])
  assert len(calls) == 5


def test_a_preempted_trial_is_queued_again_and_resumes_in_its_folder(tmp_path):
  """jdl.Preempted (SIGTERM after a checkpoint) stops the sweep; the next run trains the same
  values in the same folder first, where its checkpoint would resume, then goes on."""
  calls, preempt = [], [True]

  def train(config, workdir, hooks):
    if preempt.pop() if preempt else False:
      calls.append((config, workdir))
      raise jdl.Preempted(5, "SIGTERM", os.path.join(workdir, "checkpoints"))
    return _fake_train(calls)(config, workdir, hooks)

  space = sweep.space_from_json({"optimizer.learning_rate": {"log_uniform": [1e-4, 1e-1]}})
  study = sweep.open_study(str(tmp_path), space)
  with pytest.raises(jdl.Preempted):
    sweep.run_study(study, jdl.base_config(), space, str(tmp_path), 2, train=train, log=None)
  sweep.run_study(study, jdl.base_config(), space, str(tmp_path), 2, train=train, log=None)
  assert [c[1] for c in calls] == [str(tmp_path / "trial_0")] * 2 + [str(tmp_path / "trial_2")]
  assert calls[0][0].optimizer.learning_rate == calls[1][0].optimizer.learning_rate
  assert [r["status"] for r in sweep.study_rows(study)] == ["interrupted", "ok", "ok"]


# ---------------------------------------------------------------------------------------------
# Resuming and sharing a study: worker processes (tests/sweep_worker.py).


def _worker(workdir, num_trials, name, *extra):
  return subprocess.Popen([sys.executable, WORKER, str(workdir), str(num_trials), name, *extra],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _trained(workdir, name):
  path = os.path.join(workdir, f"{name}.log")
  return open(path, encoding="utf-8").read().split() if os.path.exists(path) else []


def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
  """A worker killed (SIGKILL) while training its third trial leaves two finished trials and one
  running forever; the next run of the sweep trains neither finished trial again, fails the
  killed one once its heartbeat is stale, reruns its parameters in its own folder (where its
  checkpoints would resume), and reaches the budget."""
  worker = _worker(tmp_path, 4, "killed", "--kill_at=3", "--heartbeat=1")
  output, _ = worker.communicate(timeout=300)
  assert worker.returncode == -9, output
  killed = _trained(tmp_path, "killed")
  assert [os.path.basename(d) for d in killed] == ["trial_0", "trial_1", "trial_2"]
  time.sleep(3)  # past the grace period of two heartbeats

  space = sweep.space_from_json({"optimizer.learning_rate": {"log_uniform": [1e-4, 1e-1]}})
  study = sweep.open_study(str(tmp_path), space, heartbeat_seconds=1)
  states = [t.state for t in study.trials]
  assert states.count(optuna.trial.TrialState.COMPLETE) == 2
  assert states.count(optuna.trial.TrialState.RUNNING) == 1
  killed_rate = study.trials[2].params["optimizer.learning_rate"]
  calls = []
  sweep.run_study(study, jdl.base_config(), space, str(tmp_path), 4, train=_fake_train(calls),
                  log=None)
  assert [c[1] for c in calls] == [killed[2], str(tmp_path / "trial_4")]
  assert calls[0][0].optimizer.learning_rate == killed_rate
  rows = sweep.study_rows(study)
  assert [r["status"] for r in rows] == ["ok", "ok", "interrupted", "ok", "ok"]
  assert sweep.finished_trials(study) == 4


def test_two_workers_on_one_sqlite_study_run_disjoint_trials(tmp_path):
  workers = [_worker(tmp_path, 6, name, "--peers=2") for name in ("a", "b")]
  for worker in workers:
    output, _ = worker.communicate(timeout=300)
    assert worker.returncode == 0, output
  a, b = _trained(tmp_path, "a"), _trained(tmp_path, "b")
  assert a and b and not set(a) & set(b), (a, b)
  assert len(a + b) == len(set(a + b))
  study = sweep.open_study(str(tmp_path), sweep.space_from_json(
      {"optimizer.learning_rate": {"log_uniform": [1e-4, 1e-1]}}))
  states = optuna.trial.TrialState
  finished = [t for t in study.trials if t.state in (states.COMPLETE, states.PRUNED)]
  # Each worker checks the budget before a trial: both may start the last one at once.
  assert len(finished) == len(study.trials) == len(a + b) and 6 <= len(finished) <= 7
  assert {t.user_attrs["workdir"] for t in finished} == set(a + b)


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
# Real studies on MNIST-1D.


def _tiny_mnist1d_config(data_dir, steps=40, eval_every=40):
  return jdl.apply_overrides(mnist1d.get_config(), [
      f"data_dir={data_dir}", "model.name=mlp", "model.mlp.hidden=(16,)", f"num_steps={steps}",
      f"eval_every_steps={eval_every}", "progress=false", "batch_size=96", "eval_batch_size=500",
      "checkpoint=false", "layout=none"])


def test_optuna_study_of_the_mnist1d_mlp_learning_rate_prunes_a_bad_trial(tmp_path,
                                                                          mnist1d_data_dir):
  """Five short trials of the MNIST-1D MLP: two good learning rates, then a hopeless one (1e-5)
  that the median pruner stops at the first evaluation, then two TPE proposals. The best trial
  beats the worst, and the pruned trial's run ends at its first evaluation."""
  config = _tiny_mnist1d_config(mnist1d_data_dir, steps=60, eval_every=20)
  space = sweep.space_from_json({"optimizer.learning_rate": {"log_uniform": [1e-5, 1e-1]}})
  study = sweep.open_study(str(tmp_path), space, sampler=sweep.make_sampler("tpe", space, seed=0),
                           pruner=sweep.make_pruner("median", startup_trials=2))
  for rate in (3e-2, 1e-2, 1e-5):
    study.enqueue_trial({"optimizer.learning_rate": rate})
  sweep.run_study(study, config, space, str(tmp_path), 5, log=None)
  rows = sweep.study_rows(study)
  assert [r["status"] for r in rows].count("pruned") >= 1, rows
  pruned = rows[2]
  assert pruned["status"] == "pruned" and pruned["params"]["optimizer.learning_rate"] == 1e-5
  assert pruned["step"] == 20 and [r["step"] for r in jdl.read_jsonl(pruned["workdir"])] == [20]
  assert all(r["step"] == 60 for r in rows if r["status"] == "ok")
  values = [t.value for t in study.trials]
  assert study.best_value > min(values)
  assert study.best_params["optimizer.learning_rate"] > 1e-4
  assert sweep.best_row(rows)["trial"] == study.best_trial.number


def test_vmapped_batch_of_four_trials_equals_four_separate_runs(tmp_path, mnist1d_data_dir):
  """The vmapped sweep asks the study for 4 learning rates, trains them as one program and tells
  the study their results: each member ends with the parameters and metrics of a separate run of
  its trial's config."""
  config = _tiny_mnist1d_config(mnist1d_data_dir)
  space = sweep.space_from_json({"optimizer.learning_rate": {"log_uniform": [1e-3, 1e-1]}})
  study = sweep.open_study(str(tmp_path), space, heartbeat_seconds=None,
                           sampler=sweep.make_sampler("random", space, seed=0))
  (run,) = vmap_sweep.run_vmapped_study(study, config, space, 4, members=4, log=None)
  assert run.num_members == 4 and len(study.trials) == 4
  for i, trial in enumerate(study.trials):
    assert trial.state == optuna.trial.TrialState.COMPLETE
    trial_config = jdl.apply_overrides(config, sweep.trial_overrides(trial.params))
    state, history = jdl.train_and_evaluate(trial_config, str(tmp_path / f"separate_{i}"))
    # Vmapped and separate runs are different programs: a few float32 ulps a step.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 run.member_state(i).params, state.params)
    record = trial.user_attrs["record"]
    assert record["train_loss"] == pytest.approx(history[-1]["train_loss"], rel=1e-5)
    assert record["test_loss"] == pytest.approx(history[-1]["test_loss"], rel=1e-5)
    # Accuracies count examples: one whose logits tie to rounding may flip, one of 1000.
    assert trial.value == pytest.approx(history[-1]["test_accuracy"], abs=1.01e-3)
    assert trial.intermediate_values == {40: trial.value}
  assert len({t.params["optimizer.learning_rate"] for t in study.trials}) == 4
