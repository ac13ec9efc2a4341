"""jdl imports TensorFlow and TFDS on first use only (`jdl.lazy_import`)."""

import os
import subprocess
import sys
import textwrap

import pytest

# Blocks TensorFlow and TFDS as if they were not installed, then trains through `jdl.fit` on
# in-memory arrays and checks that neither was imported; then asks for a pipeline and checks the
# error names the package to install.
_WITHOUT_TENSORFLOW = textwrap.dedent("""
    import importlib.abc
    import sys

    BLOCKED = ("tensorflow", "tensorflow_datasets")

    class Block(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
          raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

    sys.meta_path.insert(0, Block())

    import jax
    import numpy as np
    import jdl

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    y = rng.integers(0, 3, 64).astype(np.int32)
    train_step, eval_step = jdl.make_classification_steps()
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


def test_jdl_trains_without_tensorflow_and_says_what_is_missing():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  done = subprocess.run([sys.executable, "-c", _WITHOUT_TENSORFLOW], capture_output=True,
                        text=True, env={**env, "JAX_PLATFORMS": "cpu"}, check=False,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert done.returncode == 0, done.stderr[-3000:]
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
