"""jdl imports TensorFlow and TFDS on first use only (`jdl.lazy_import`)."""

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

# Makes TensorFlow and TFDS unimportable, as if they were not installed.
_BLOCK_TENSORFLOW = textwrap.dedent("""
    import importlib.abc
    import sys

    BLOCKED = ("tensorflow", "tensorflow_datasets")

    class Block(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
          raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

    sys.meta_path.insert(0, Block())
""")

# Trains through `jdl.fit` on in-memory arrays and checks that neither was imported; then asks for
# a pipeline and checks the error names the package to install.
_WITHOUT_TENSORFLOW = _BLOCK_TENSORFLOW + textwrap.dedent("""
    import jax
    import numpy as np
    import jdl

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    y = rng.integers(0, 3, 64).astype(np.int32)
    train_step, eval_step = jdl.make_steps()
    train = jdl.data.ArraySource(x, y, 16, shuffle=True, seed=0)
    test = jdl.data.ArraySource(x, y, 32, shuffle=False)
    for resident in (True, False):  # fit donates the state: a new one for each run
      state = jdl.create_train_state(jdl.models.MLP(hidden=(16,), num_classes=3),
                                     jdl.make_optimizer({"name": "adam", "learning_rate": 1e-2}),
                                     x[:1], jax.random.PRNGKey(0))
      _, history = jdl.fit(state, train_step, eval_step, train, test, num_epochs=2,
                           progress=False, device_resident=resident,
                           runner=jdl.parallel.JitRunner())
      assert np.isfinite(history[-1]["test_loss"]), history
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    try:
      jdl.data.get_builder("mnist1d")
    except ModuleNotFoundError as error:
      print("ERROR:", error)
    else:
      raise AssertionError("get_builder worked without TFDS")
""")


# Loads MNIST-1D in memory from a data dir whose splits are cached (`jdl.data.array_cache`) and
# writes metrics with TensorBoard files, with TensorFlow and TFDS unimportable; prints what it read.
_CACHED_LOAD_WITHOUT_TENSORFLOW = _BLOCK_TENSORFLOW + textwrap.dedent("""
    import os

    import numpy as np
    import jdl

    train, test, meta = jdl.data.load_classification_data(
        "mnist1d", batch_size=100, eval_batch_size=100, data_dir=sys.argv[1])
    with jdl.MetricWriter(sys.argv[2]) as writer:
      writer.write_config({"dataset": "mnist1d"})
      writer.write(1, {"loss": 1.0})
    assert os.listdir(os.path.join(sys.argv[2], "tensorboard"))
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    for source in (train, test):
      batches = list(source.epoch(0))
      inputs = np.concatenate([b["input"][b["mask"]] for b in batches])
      labels = np.concatenate([b["label"][b["mask"]] for b in batches])
      total = np.sort(inputs, axis=None).astype(np.float64).sum()  # in an order of its own
      print("SPLIT", len(labels), inputs.dtype, total, labels.sum())
    print("META", meta.name, meta.input_shape, meta.num_classes, meta.split_sizes)
""")


def _run_python(script, *args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                        text=True, env={**env, "JAX_PLATFORMS": "cpu"}, check=False,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def test_jdl_trains_without_tensorflow_and_says_what_is_missing():
  done = _run_python(_WITHOUT_TENSORFLOW)
  message = done.stdout.split("ERROR:", 1)[1]
  assert "'tensorflow-datasets'" in message and "TFDS datasets" in message, message
  assert "pip install tensorflow-datasets" in message, message


def test_lazy_module_forwards_and_hides_gpus_from_tensorflow():
  tf = pytest.importorskip("tensorflow")
  from jdl import lazy_import  # pylint: disable=import-outside-toplevel

  assert lazy_import.tensorflow.constant is tf.constant
  assert "constant" in dir(lazy_import.tensorflow)
  assert "imported" in repr(lazy_import.tensorflow)
  assert tf.config.get_visible_devices("GPU") == []
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  assert lazy_import.tensorflow_datasets.builder is tfds.builder


def test_missing_module_error_names_package_and_purpose():
  from jdl import lazy_import  # pylint: disable=import-outside-toplevel

  missing = lazy_import.LazyModule("jdl_no_such_module", install="no-such-package",
                                   purpose="nothing at all")
  assert "not imported yet" in repr(missing)
  with pytest.raises(ModuleNotFoundError, match=r"'no-such-package' for nothing at all"):
    _ = missing.anything


def test_cached_mnist1d_loads_and_logs_without_tensorflow(mnist1d_data_dir, tmp_path):
  """Once MNIST-1D's splits are cached, `import jdl`, loading them in memory and writing metrics
  with TensorBoard files import neither TensorFlow nor TFDS, and give what TFDS gave."""
  from jdl import data  # pylint: disable=import-outside-toplevel

  data_dir = tmp_path / "tfds"
  shutil.copytree(mnist1d_data_dir, data_dir,
                  ignore=shutil.ignore_patterns(data.array_cache.CACHE_DIR))
  builder = data.get_builder("mnist1d", str(data_dir))
  data.load_classification_data("mnist1d", batch_size=100, eval_batch_size=100,
                                data_dir=str(data_dir))  # reads through TFDS, fills the cache
  done = _run_python(_CACHED_LOAD_WITHOUT_TENSORFLOW, str(data_dir), str(tmp_path / "run"))
  expected = []
  for split in ("train", "test"):
    inputs, labels = data.load_split_arrays(builder, split)
    total = np.sort(inputs, axis=None).astype(np.float64).sum()
    expected.append(f"SPLIT {len(labels)} float32 {total} {labels.sum()}")
  assert [line for line in done.stdout.splitlines() if line.startswith("SPLIT")] == expected
  assert ("META mnist1d (40,) 10 {'train': 4000, 'test': 1000}" in done.stdout), done.stdout
