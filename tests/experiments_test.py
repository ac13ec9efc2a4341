"""Every experiment runs a tiny config end to end; the MNIST-1D one trains to a high accuracy."""

import functools
import importlib
import json
import math
import pathlib
import subprocess
import sys

import jax
import ml_collections
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorboard.backend.event_processing import event_accumulator

import jdl

from experiments import fashion_mnist_mlp, mnist1d

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Flatten -> Dense(128) -> Dense(10) on 784 pixels, and the same with Dense(64) in between.
FASHION_PARAMS = {
    "fashion_mnist_mlp": 784 * 128 + 128 + 128 * 10 + 10,  # 101,770
    "fashion_mnist_mlp_deep": 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10,  # 109,386
}
FASHION_HIDDEN = {"fashion_mnist_mlp": [128], "fashion_mnist_mlp_deep": [128, 64]}
MOCK_EXAMPLES = 64
TINY_ARGS = ["--config.num_epochs=1", "--config.batch_size=16", "--config.eval_batch_size=32",
             "--config.progress=false"]


def refuse_download(*args, **kwargs):
  del args, kwargs
  raise AssertionError("a real download was attempted")


def is_finite_number(value):
  return isinstance(value, (int, float)) and math.isfinite(value)


def read_tensorboard_scalars(logdir):
  """`{tag: {step: value}}` of the scalar summaries in a TensorBoard log folder."""
  accumulator = event_accumulator.EventAccumulator(
      str(logdir), size_guidance={event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0})
  accumulator.Reload()
  scalars = {}
  for tag in accumulator.Tags()["tensors"]:
    values = {event.step: tf.make_ndarray(event.tensor_proto) for event in accumulator.Tensors(tag)}
    if all(value.ndim == 0 and value.dtype.kind == "f" for value in values.values()):
      scalars[tag] = {step: float(value) for step, value in values.items()}
  for tag in accumulator.Tags()["scalars"]:
    scalars[tag] = {event.step: event.value for event in accumulator.Scalars(tag)}
  return scalars


def run_on_mock_data(name, workdir, extra_args=()):
  """`(state, history)` of experiment `name` run with TINY_ARGS on TFDS mock data; any attempt
  to download fails the test."""
  module = importlib.import_module(f"experiments.{name}")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tfds.download.DownloadManager, "download_and_extract", refuse_download)
    patch.setattr(tfds.download.DownloadManager, "download", refuse_download)
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
      return jdl.experiment.run_experiment(
          module.get_config,
          ["--workdir=" + str(workdir), *TINY_ARGS, "--config.data_dir=" + str(workdir / "tfds"),
           *extra_args],
          name=name)


# ---------------------------------------------------------------------------------------------
# The Fashion-MNIST experiments, on mock data.


@pytest.fixture(scope="module")
def fashion_run(tmp_path_factory):
  """`(name, state, history, workdir)` of the seed tutorial's experiment on mock data."""
  name = "fashion_mnist_mlp"
  workdir = tmp_path_factory.mktemp(name)
  state, history = run_on_mock_data(name, workdir)
  return name, state, history, workdir


def test_fashion_experiment_history(fashion_run):
  """One epoch of 64 examples in batches of 16 gives one evaluation with sane, exact metrics."""
  _, state, history, _ = fashion_run
  assert len(history) == 1
  record = history[-1]
  assert record["step"] == MOCK_EXAMPLES // 16 == int(state.step)
  assert record["epoch"] == 1.0
  for key in ("train_loss", "test_loss", "train_accuracy", "test_accuracy"):
    assert is_finite_number(record[key]), key
  assert record["train_loss"] > 0 and record["test_loss"] > 0
  assert 0.0 <= record["test_accuracy"] <= 1.0
  assert 0.0 <= record["train_accuracy"] <= 1.0
  # Evaluated over the whole split, padding excluded: a whole number of correct examples.
  correct = record["test_accuracy"] * MOCK_EXAMPLES
  assert abs(correct - round(correct)) < 1e-4


def test_fashion_experiment_parameter_count(fashion_run):
  """The seed MLP has 101,770 parameters."""
  name, state, _, _ = fashion_run
  assert jdl.count_params(state.params) == FASHION_PARAMS[name]


def test_fashion_deep_variant_is_the_seed_experiment_with_two_hidden_layers():
  """fashion_mnist_mlp_deep changes the seed config's hidden layers to (128, 64) and nothing else
  (so the run above covers its code), and builds the 109,386-parameter model."""
  from experiments import fashion_mnist_mlp_deep  # pylint: disable=import-outside-toplevel

  seed, deep = fashion_mnist_mlp.get_config().to_dict(), fashion_mnist_mlp_deep.get_config()
  assert tuple(deep.model.mlp.hidden) == tuple(FASHION_HIDDEN["fashion_mnist_mlp_deep"])
  seed["model"]["mlp"]["hidden"] = deep.model.mlp.hidden
  assert deep.to_dict() == seed
  model = jdl.models.build_model(deep.model, num_classes=10)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 28, 28, 1), jax.numpy.float32))
  assert jdl.count_params(shapes["params"]) == FASHION_PARAMS["fashion_mnist_mlp_deep"]


def test_fashion_experiment_writes_metrics_and_config(fashion_run):
  """metrics.jsonl holds the history's records and config.json the overridden config."""
  name, _, history, workdir = fashion_run
  assert (workdir / "metrics.jsonl").is_file() and (workdir / "config.json").is_file()
  records = jdl.read_jsonl(str(workdir))
  assert [r["step"] for r in records] == [r["step"] for r in history]
  for record, expected in zip(records, history):
    assert record["test_accuracy"] == pytest.approx(expected["test_accuracy"])
    assert record["train_loss"] == pytest.approx(expected["train_loss"])
  config = json.loads((workdir / "config.json").read_text())
  assert config["dataset"] == "fashion_mnist"
  assert config["num_epochs"] == 1 and config["batch_size"] == 16
  assert config["eval_batch_size"] == 32 and config["progress"] is False
  assert list(config["model"]["mlp"]["hidden"]) == FASHION_HIDDEN[name]


def test_fashion_experiment_tensorboard_events_read_back(fashion_run):
  """The TensorBoard event files hold a test_accuracy scalar equal to the history's."""
  _, _, history, workdir = fashion_run
  logdir = workdir / "tensorboard"
  assert list(logdir.glob("events.out.tfevents.*"))
  scalars = read_tensorboard_scalars(logdir)
  assert "test_accuracy" in scalars and "train_loss" in scalars
  final = history[-1]
  assert scalars["test_accuracy"] == {final["step"]: pytest.approx(final["test_accuracy"])}
  assert scalars["train_loss"][final["step"]] == pytest.approx(final["train_loss"], rel=1e-6)


def test_seed_tutorial_config():
  """The seed tutorial's config: MLP (128,) relu, Adam 1e-3, cross-entropy, batch 32, 10 epochs."""
  config = fashion_mnist_mlp.get_config()
  assert config.dataset == "fashion_mnist"
  assert config.model.name == "mlp"
  assert tuple(config.model.mlp.hidden) == (128,)
  assert config.model.mlp.activation == "relu"
  assert config.model.mlp.dropout_rate == 0.0
  assert config.model.mlp.output == "logits"
  assert config.optimizer.name == "adam"
  assert config.optimizer.learning_rate == 1e-3
  assert config.optimizer.schedule == "constant"
  assert config.optimizer.weight_decay == 0.0 and config.optimizer.clip_norm is None
  assert config.loss == "softmax_cross_entropy"
  assert config.l1 == 0.0 and config.l2 == 0.0
  assert config.batch_size == 32
  assert config.num_epochs == 10
  assert config.num_steps == 0  # epochs decide the length
  assert config.train_split == "train" and config.eval_split == "test"


# ---------------------------------------------------------------------------------------------
# MNIST-1D: real (generated) data, real training.


def run_mnist1d(workdir, data_dir, *extra):
  # One device, as on a user's CPU: the test process has eight virtual CPU devices sharing two
  # cores, where 6000 sharded steps would be slow and their collectives starved for threads.
  return jdl.experiment.run_experiment(
      mnist1d.get_config,
      ["--workdir=" + str(workdir), "--config.data_dir=" + data_dir, "--config.progress=false",
       "--config.layout=none", *extra],
      name="mnist1d")


@pytest.fixture(scope="module")
def mnist1d_cnn_run(tmp_path_factory, mnist1d_data_dir):
  """The MNIST-1D experiment with its default config (the paper's CNN, 6000 steps)."""
  return run_mnist1d(tmp_path_factory.mktemp("mnist1d_cnn"), mnist1d_data_dir)


def test_mnist1d_cnn_reaches_paper_accuracy(mnist1d_cnn_run):
  """The default MNIST-1D experiment reaches at least 0.90 test accuracy in 6000 steps."""
  state, history = mnist1d_cnn_run
  assert [r["step"] for r in history] == [1000, 2000, 3000, 4000, 5000, 6000]
  assert int(state.step) == 6000
  final = history[-1]
  assert final["test_accuracy"] >= 0.90, final
  assert math.isfinite(final["test_loss"])
  # Conv 1->25 k5, 25->25 k3 twice, Dense 125->10.
  assert jdl.count_params(state.params) == (25 * 5 + 25) + 2 * (25 * 25 * 3 + 25) + (125 * 10 + 10)


def test_mnist1d_mlp_variant_learns(tmp_path, mnist1d_data_dir):
  """The MLP variant (40-100-100-10) trains for 300 steps to well above chance."""
  state, history = run_mnist1d(tmp_path, mnist1d_data_dir, "--config.model.name=mlp",
                               "--config.num_steps=300")
  assert history[-1]["step"] == 300 == int(state.step)
  assert history[-1]["test_accuracy"] > 0.3, history[-1]
  assert jdl.count_params(state.params) == (40 * 100 + 100) + (100 * 100 + 100) + (100 * 10 + 10)


# ---------------------------------------------------------------------------------------------
# Bad command lines.


def test_unknown_config_key_suggests_the_right_one(tmp_path):
  """A misspelt key raises ConfigError naming the closest valid key, before any training."""
  workdir = tmp_path / "run"
  with pytest.raises(jdl.ConfigError, match="num_epochs") as error:
    jdl.experiment.run_experiment(mnist1d.get_config,
                              ["--workdir=" + str(workdir), "--config.num_epoch=3"], name="mnist1d")
  assert "num_epoch'" in str(error.value)
  assert not workdir.exists()


@pytest.mark.parametrize("arg", [
    "--config.batch_size=abc",
    "--config.batch_size=1.5",
    "--config.optimizer.learning_rate=fast",
    "--config.progress=maybe",
    "--config.model=mlp",
])
def test_wrong_value_type_raises_config_error(tmp_path, arg):
  """A value of the wrong type (or a value for a group) raises ConfigError naming the key."""
  key = arg.split("=", 1)[0][len("--config."):]
  with pytest.raises(jdl.ConfigError, match=key.replace(".", r"\.")):
    jdl.experiment.run_experiment(mnist1d.get_config, ["--workdir=" + str(tmp_path / "run"), arg],
                              name="mnist1d")
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("arg", ["--num_epochs=3", "num_epochs=3", "--workdir", "--config"])
def test_unexpected_argument_raises_config_error(tmp_path, arg):
  """An argument that is neither --workdir=DIR nor --config.KEY=VALUE raises ConfigError."""
  with pytest.raises(jdl.ConfigError, match="unexpected argument"):
    jdl.experiment.run_experiment(mnist1d.get_config, ["--workdir=" + str(tmp_path / "run"), arg],
                              name="mnist1d")


def test_command_line_config_error_exits_2_without_training(tmp_path):
  """`python -m experiments.mnist1d` with a misspelt key prints one error line and exits 2."""
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.mnist1d", "--workdir=" + str(workdir),
       "--config.num_epoch=3"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(error_lines) == 1, result.stderr[-2000:]
  assert "num_epoch'" in error_lines[0] and "num_epochs" in error_lines[0]
  assert "Traceback" not in result.stderr
  assert "final" not in result.stdout
  assert not workdir.exists()


def test_help_prints_usage_and_config(tmp_path, capsys):
  """--help returns None, prints the usage and the config, and trains nothing."""
  workdir = tmp_path / "run"
  result = jdl.experiment.run_experiment(mnist1d.get_config, ["--workdir=" + str(workdir), "--help"],
                                     name="mnist1d")
  assert result is None
  out = capsys.readouterr().out
  assert "usage: python -m experiments.mnist1d" in out
  assert "--config.KEY=VALUE" in out
  assert "num_steps: 6000" in out
  assert "cnn1d" in out and "learning_rate: 0.01" in out
  assert not workdir.exists()


def test_benchmarks_import_and_name_their_contenders():
  """The benchmark entrypoints import without their optional contenders and list them."""
  from benchmarks import bench_mnist1d_cnn, bench_seed_mlp  # pylint: disable=import-outside-toplevel

  assert {"jdl", "plain", "keras-jax", "keras-tf", "pipeline", "peak"} <= set(bench_seed_mlp.CONTENDERS)
  assert set(bench_mnist1d_cnn.CONTENDERS) == {"jdl", "plain", "plain_1thread"}
  # Paired ratios: each repeat's own, where both contenders ran in it (repeat 1's plain failed).
  jdl_runs = [{"repeat": r, "seconds": s} for r, s in ((0, 4.0), (1, 3.0), (2, 5.0))]
  plain_runs = [{"repeat": r, "seconds": s} for r, s in ((0, 8.0), (2, 8.0))]
  assert bench_mnist1d_cnn.paired_ratio(jdl_runs, plain_runs) == pytest.approx((0.5 + 0.625) / 2)
  assert bench_mnist1d_cnn.paired_ratio(jdl_runs, []) is None
  assert bench_seed_mlp.TRAIN_FLOPS_PER_EXAMPLE == 6 * (784 * 128 + 128 * 10)


def test_profile_step_times_the_program_fit_runs_and_names_its_operations(subprocess_env):
  """A short profile of the seed MLP (its own process: the profiler needs an XLA flag set before
  JAX starts): a step time, and among the operations it lists the first layer's products."""
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.profile_step", "--model=seed_mlp", "--steps=20",
       "--repeats=1", "--top=40"],
      cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300,
      check=True)
  lines = done.stdout.strip().splitlines()
  assert lines[0].startswith("seed_mlp: 20 steps in one loop") and "us a step" in lines[0]
  operations = "\n".join(lines[2:])
  assert "Dense_0/dot_general" in operations and "Dense_0/transpose" in operations


def test_mnist1d_compare_prints_a_table_where_convolution_wins(tmp_path, mnist1d_data_dir, capsys):
  """The comparison trains each model in turn and the CNN beats the linear model (200 steps: about
  0.8 against 0.3)."""
  from experiments import mnist1d_compare  # pylint: disable=import-outside-toplevel

  rows = jdl.experiment.run_experiment(
      mnist1d_compare.get_config,
      ["--workdir=" + str(tmp_path), "--config.data_dir=" + mnist1d_data_dir,
       "--config.layout=none", "--config.num_steps=200", "--config.eval_every_steps=200",
       "--config.models=('logistic', 'cnn1d')", "--config.seeds=(0, 1)"],
      name="mnist1d_compare", train=mnist1d_compare.compare)
  assert [r["model"] for r in rows] == ["logistic", "cnn1d"]
  assert rows[1]["worst"] > rows[0]["best"] + 0.2, rows
  for row in rows:
    assert len(row["accuracies"]) == 2
    assert row["worst"] <= row["test_accuracy"] <= row["best"]
  assert (tmp_path / "logistic" / "seed1" / "metrics.jsonl").is_file()
  assert "test accuracy" in capsys.readouterr().out


def test_fashion_run_keeps_pixels_uint8_and_its_report_scales_them_as_the_host_would(fashion_run):
  """The run records that its inputs are uint8 pixels (its task scaled them in the step); the
  report reads the eval split again and gets the model's float32 inputs, the bits of scaling on
  the host, on which the restored model scores the run's last test accuracy."""
  from experiments import report  # pylint: disable=import-outside-toplevel
  from jdl.analysis import evaluation  # pylint: disable=import-outside-toplevel

  _, _, history, workdir = fashion_run
  run = jdl.runs.load_run(str(workdir), log=lambda message: None)
  assert run.meta.pixels and run.state.input_dtype == "float32"
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    inputs, labels = report.load_eval_split(run)
    raw, _ = jdl.data.load_split_arrays(
        jdl.data.get_builder("fashion_mnist", run.config.data_dir), run.config.eval_split)
  assert raw.dtype == "uint8" and inputs.dtype == "float32"
  assert inputs.tobytes() == jdl.data.scale_inputs(raw).tobytes()
  result = evaluation.evaluate_classifier(run.state, raw, labels, pixels=True)
  # Two programs (fit's evaluation, the batched predictions): a tie may flip one example.
  assert result.accuracy == pytest.approx(history[-1]["test_accuracy"], abs=1.01 / MOCK_EXAMPLES)


# ---------------------------------------------------------------------------------------------
# The vision experiments, on mock data: tiny widths, a few steps, augmentation switched on.


@pytest.mark.parametrize("name, args", [
    ("fashion_mnist_cnn", ["--config.model.cnn.features=(4,)", "--config.model.cnn.dense=8"]),
    # The tf.data augmentation path; the model does not matter to it (the CNN ran above).
    ("fashion_mnist_cnn", ["--config.model.name=mlp", "--config.model.mlp.hidden=(8,)",
                           "--config.in_memory=false", "--config.augment.where=pipeline",
                           "--config.augment.mixup_alpha=0.4", "--config.augment.cutout_size=4"]),
    # CIFAR-10's data, augmentation and recipe; its ResNet-20 is checked below and trains in
    # resnet_test.py (a ResNet's random init alone compiles for many seconds on a CPU).
    ("cifar10_resnet", ["--config.model.name=mlp", "--config.model.mlp.hidden=(8,)",
                        "--config.optimizer.warmup_steps=1"]),
], ids=["fashion_cnn", "fashion_cnn_pipeline_mixup", "cifar_recipe"])
def test_vision_experiment_runs_on_mock_data(name, args, tmp_path):
  """One epoch of 64 mock examples, with the experiment's augmentation (on the device, or in
  tf.data with mixup and cutout), gives finite metrics for every example and no download."""
  state, history = run_on_mock_data(name, tmp_path, ["--config.layout=none", *args])
  module = importlib.import_module(f"experiments.{name}")
  record = history[-1]
  assert record["step"] == MOCK_EXAMPLES // 16
  assert all(is_finite_number(record[k]) for k in ("train_loss", "test_loss", "test_accuracy"))
  assert 0.0 <= record["test_accuracy"] <= 1.0
  if name == "fashion_mnist_cnn" and "--config.model.name=mlp" not in args:
    assert "batch_stats" in state.model_state
  assert json.loads((tmp_path / "config.json").read_text())["dataset"] == module.get_config().dataset


def test_cifar10_resnet_builds_the_papers_resnet20_and_its_named_variants():
  """The experiment's default model is the paper's ResNet-20 (272,474 parameters on 32x32x3),
  and --config.model.name=resnet56 or resnet18 build theirs."""
  from experiments import cifar10_resnet  # pylint: disable=import-outside-toplevel

  counts = {"resnet20": 272_474, "resnet56": 855_770, "resnet18": 11_173_962}
  for name, count in counts.items():
    config = jdl.apply_overrides(cifar10_resnet.get_config(), [f"model.name={name}"])
    model = jdl.models.build_model(config.model, num_classes=10)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), jax.numpy.float32))
    assert jdl.count_params(shapes["params"]) == count, name
    assert "batch_stats" in shapes


_FAULTS_SCRIPT = """
import json, resource
import jax, jax.numpy as jnp, numpy as np
from jdl import experiment
x = jnp.ones((2048, 6144), jnp.float32)  # 48 MiB; so is x * 2 + 1, the product's operand
program = jax.jit(lambda x: ((x * 2 + 1) @ jnp.ones(6144, jnp.float32)).sum())
temp = program.lower(x).compile().memory_analysis().temp_size_in_bytes
def faults_per_run(runs):
  counts = []
  for _ in range(runs):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    program(x).block_until_ready()
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
  # The fewest: a run on a thread new to the program, or one that starts before XLA has freed
  # the last run's buffer, needs fresh memory either way.
  return min(counts)
program(x).block_until_ready()
before = faults_per_run(5)
applied = experiment.reuse_host_memory()
print(json.dumps({"temp": temp, "before": before, "applied": applied, "after": faults_per_run(9)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the setting is glibc's")
def test_reuse_host_memory_stops_a_cpu_program_faulting_its_buffers_in_on_every_run(
    subprocess_env):
  """A program whose temporary buffer (48 MiB) is over glibc's 32 MiB mmap limit faults every
  page of it in on every run by default; once `reuse_host_memory` has run, runs reuse the freed
  pages (the fewest faults of several runs: the first run on each of XLA's threads fills its
  heap). Its own process: the default allocator, then the setting, in that order."""
  done = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], cwd=REPO_ROOT,
                        env=subprocess_env(), capture_output=True, text=True, timeout=300,
                        check=True)
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result["temp"] >= 48 * 2**20 and result["applied"]
  # At least a fault per 2 MiB page before (4 KiB pages give 512 times as many), a tenth after.
  assert result["before"] >= result["temp"] / 2**21
  assert result["after"] <= result["before"] / 10


def test_configure_process_reuses_host_memory_on_the_cpu_when_the_config_says_so(monkeypatch):
  calls = []
  monkeypatch.setattr(jdl.experiment, "reuse_host_memory", lambda: calls.append(True) or True)
  config = mnist1d.get_config()
  config.compilation_cache_dir = ""
  config.cpu_threads = 0
  jdl.experiment.configure_process(config)
  assert calls == [True]
  config.reuse_host_memory = False
  jdl.experiment.configure_process(config)
  assert calls == [True]
  with pytest.raises(jdl.config.ConfigError, match="reuse_host_memory must be true or false"):
    jdl.experiment.configure_process(ml_collections.ConfigDict({"reuse_host_memory": "yes"}))


def test_reuse_host_memory_changes_nothing_without_glibc(monkeypatch):
  monkeypatch.setattr(jdl.experiment.platform, "libc_ver", lambda: ("", ""))
  monkeypatch.setattr(jdl.experiment.ctypes, "CDLL", lambda *args: pytest.fail("libc loaded"))
  assert jdl.experiment.reuse_host_memory() is False
