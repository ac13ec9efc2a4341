"""`jdl.set_cpu_threads`: it takes effect before JAX starts, refuses loudly after, and leaves a
CNN1D's training bitwise unchanged."""

import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import jdl
from jdl import runtime

from experiments import mnist1d

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# A tiny CNN1D trained a few steps: its parameters, then how many threads XLA's CPU pool has.
TRAIN_AND_REPORT = """
import glob, json, sys
import jax, numpy as np
import jdl
threads = int(sys.argv[1])
if threads:
  jdl.set_cpu_threads(threads)
rng = np.random.default_rng(0)
x, y = rng.normal(size=(64, 40)).astype(np.float32), rng.integers(0, 10, 64).astype(np.int32)
model = jdl.models.CNN1D(features=(4, 4), kernel_sizes=(5, 3), num_classes=10)
state = jdl.create_train_state(model, jdl.make_optimizer({"name": "adam", "learning_rate": 1e-2}),
                               x[:1], jax.random.PRNGKey(0))
step, _ = jdl.make_classification_steps()
state, _ = jdl.fit(state, step, None, jdl.data.ArraySource(x, y, 16, shuffle=True, seed=0), None,
                   num_steps=12, progress=False)
names = []
for path in glob.glob("/proc/self/task/*/comm"):
  names.append(open(path).read().strip())
print(json.dumps({"params": [np.asarray(l).tolist() for l in jax.tree.leaves(state.params)],
                  "pool_threads": sum("XLAEigen" in n for n in names)}))
"""


def _train_in_fresh_process(threads: int) -> dict:
  # One CPU device: XLA gives its pool at least a thread per device, whatever PJRT_NPROC says.
  env = {k: v for k, v in os.environ.items() if k not in (runtime.THREADS_VARIABLE, "XLA_FLAGS")}
  done = subprocess.run([sys.executable, "-c", TRAIN_AND_REPORT, str(threads)], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=300, check=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_one_thread_takes_effect_and_changes_no_value():
  one, default = _train_in_fresh_process(1), _train_in_fresh_process(0)
  for a, b in zip(one["params"], default["params"]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  if pathlib.Path("/proc/self/task").is_dir() and default["pool_threads"]:
    # XLA names its CPU pool's threads "...XLAEigen"; where it does, one thread is what ran.
    assert one["pool_threads"] == 1


@pytest.mark.parametrize("count", [0, -1, True, 1.5, "1"])
def test_a_count_that_is_not_a_positive_integer_is_refused(count):
  with pytest.raises(ValueError, match="positive integer"):
    jdl.set_cpu_threads(count)


def test_after_jax_started_a_new_count_is_refused_and_nothing_changes(monkeypatch):
  jax.devices()  # JAX's backends have started
  monkeypatch.delenv(runtime.THREADS_VARIABLE, raising=False)
  with pytest.raises(RuntimeError, match="before JAX's first computation.*PJRT_NPROC=3"):
    jdl.set_cpu_threads(3)
  assert runtime.THREADS_VARIABLE not in os.environ
  # The count the process was started with is accepted: nothing to change.
  monkeypatch.setenv(runtime.THREADS_VARIABLE, "3")
  jdl.set_cpu_threads(3)


def test_the_config_key_warns_instead_of_failing_a_run_once_jax_runs(monkeypatch, caplog):
  jax.devices()
  monkeypatch.delenv(runtime.THREADS_VARIABLE, raising=False)
  with caplog.at_level(logging.WARNING, logger="jdl.runtime"):
    assert not runtime.apply_cpu_threads(3)
  assert "cpu_threads=3 not applied" in caplog.text
  assert runtime.apply_cpu_threads(0)  # 0: XLA's default, nothing to do


def test_a_negative_config_count_is_a_config_error(tmp_path):
  with pytest.raises(jdl.ConfigError, match="cpu_threads.*non-negative"):
    jdl.run_experiment(mnist1d.get_config,
                       [f"--workdir={tmp_path / 'run'}", "--config.cpu_threads=-1"], name="mnist1d")
  assert not (tmp_path / "run").exists()


class _Stopped(Exception):
  pass


def test_training_from_a_config_applies_its_thread_count_before_anything_else(monkeypatch, tmp_path):
  seen = []

  def record(count):
    seen.append(count)
    raise _Stopped

  monkeypatch.setattr(runtime, "apply_cpu_threads", record)
  with pytest.raises(_Stopped):
    jdl.train_and_evaluate(mnist1d.get_config(), str(tmp_path / "run"))
  assert seen == [1] and not (tmp_path / "run").exists()


# What `runs_on_cpu` and `apply_cpu_threads` decide before JAX starts, in a fresh process.
DECIDE = """
import json, os
from jdl import runtime
decided = {"cpu": runtime.runs_on_cpu(), "applied": runtime.apply_cpu_threads(1),
           "variable": os.environ.get(runtime.THREADS_VARIABLE), "started": runtime.backend_started()}
print(json.dumps(decided))
"""


@pytest.mark.parametrize("platforms, on_cpu", [("cpu", True), ("cuda", False), ("tpu,cpu", False)])
def test_cpu_threads_apply_only_where_jax_runs_on_the_cpu(platforms, on_cpu):
  env = {k: v for k, v in os.environ.items() if k not in (runtime.THREADS_VARIABLE, "XLA_FLAGS")}
  done = subprocess.run([sys.executable, "-c", DECIDE], cwd=REPO_ROOT,
                        env={**env, "JAX_PLATFORMS": platforms}, capture_output=True, text=True, timeout=300, check=True)
  decided = json.loads(done.stdout.strip().splitlines()[-1])
  # On an accelerator the CPU thread count is left alone: XLA's GPU compiler reads the same
  # variable (one thread made the MNIST-1D CNN's compilation 5x slower on an H200).
  assert decided == {"cpu": on_cpu, "applied": on_cpu, "variable": "1" if on_cpu else None,
                     "started": False}


def test_an_installed_accelerator_plugin_counts_as_an_accelerator(tmp_path):
  """With no JAX_PLATFORMS, a module in the `jax_plugins` namespace (how JAX finds CUDA and ROCm
  plugins) means JAX would start on that accelerator: the CPU thread count is left alone."""
  (tmp_path / "jax_plugins").mkdir()
  (tmp_path / "jax_plugins" / "jdl_test_accelerator.py").write_text("# a stand-in plugin\n")
  env = {k: v for k, v in os.environ.items()
         if k not in (runtime.THREADS_VARIABLE, "XLA_FLAGS", "JAX_PLATFORMS")}
  pythonpath = os.pathsep.join([str(tmp_path), str(REPO_ROOT), env.get("PYTHONPATH", "")])
  done = subprocess.run([sys.executable, "-c", DECIDE], cwd=REPO_ROOT,
                        env={**env, "PYTHONPATH": pythonpath}, capture_output=True, text=True,
                        timeout=300, check=True)
  decided = json.loads(done.stdout.strip().splitlines()[-1])
  assert decided == {"cpu": False, "applied": False, "variable": None, "started": False}


# `jdl.set_cpu_dot_library`: which library computes the CPU's matrix products in jdl's programs.


@pytest.fixture
def restore_dot_library():
  previous = runtime.cpu_dot_library()
  yield
  runtime.set_cpu_dot_library(previous)


def test_an_unknown_dot_library_is_refused_and_nothing_changes(restore_dot_library):
  runtime.set_cpu_dot_library("default")
  with pytest.raises(ValueError, match=r"unknown CPU dot library 'eigen'.*\('default', 'xla'\)"):
    jdl.set_cpu_dot_library("eigen")
  assert runtime.cpu_dot_library() == "default"


def test_an_unknown_config_dot_library_is_a_config_error(tmp_path):
  with pytest.raises(jdl.ConfigError, match="cpu_dot_library.*'eigen'"):
    jdl.run_experiment(mnist1d.get_config, [f"--workdir={tmp_path / 'run'}",
                                            "--config.cpu_dot_library=eigen"], name="mnist1d")
  assert not (tmp_path / "run").exists()


def _fit_mlp(device_resident: bool) -> list[np.ndarray]:
  rng = np.random.default_rng(0)
  x, y = rng.random((96, 8, 8, 1), dtype=np.float32), rng.integers(0, 10, 96).astype(np.int32)
  state = jdl.create_train_state(jdl.models.MLP(hidden=(32,), num_classes=10),
                                 jdl.make_optimizer({"name": "adam", "learning_rate": 1e-3}),
                                 x[:1], jax.random.PRNGKey(0))
  step, _ = jdl.make_classification_steps()
  state, _ = jdl.fit(state, step, None, jdl.data.ArraySource(x, y, 16, shuffle=True, seed=0), None,
                     num_steps=30, progress=False, device_resident=device_resident,
                     steps_per_call=None if device_resident else 1)
  return [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)]


def test_xla_dots_reach_both_engines_and_change_only_the_rounding(restore_dot_library):
  with runtime.using_cpu_dot_library("xla"):
    if runtime.program_compiler_options() is None:
      pytest.skip("this XLA hands no products to YNNPACK, so 'xla' changes nothing here")
    resident_xla, per_step_xla = _fit_mlp(True), _fit_mlp(False)
  assert runtime.cpu_dot_library() == "default"  # the block's choice ends with it
  resident, per_step = _fit_mlp(True), _fit_mlp(False)
  # The option reached both engines' programs (the products round differently)...
  assert not all(np.array_equal(a, b) for a, b in zip(resident, resident_xla))
  assert not all(np.array_equal(a, b) for a, b in zip(per_step, per_step_xla))
  # ...and changed nothing else: the engines agree with each other, and with the default.
  for a, b, c in zip(resident_xla, per_step_xla, resident):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, atol=1e-5)


def test_an_experiment_chooses_its_dot_library_for_its_run_only(monkeypatch, tmp_path,
                                                                restore_dot_library):
  from experiments import fashion_mnist_mlp  # pylint: disable=import-outside-toplevel

  from jdl import loop  # pylint: disable=import-outside-toplevel

  seen = []

  def record(config, workdir, hooks):
    seen.append(runtime.cpu_dot_library())
    raise _Stopped

  monkeypatch.setattr(loop, "_train_and_evaluate", record)
  runtime.set_cpu_dot_library("default")
  with pytest.raises(_Stopped):
    jdl.train_and_evaluate(fashion_mnist_mlp.get_config(), str(tmp_path / "run"))
  assert seen == ["xla"] and runtime.cpu_dot_library() == "default"
