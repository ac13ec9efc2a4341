"""Test-wide settings: eight CPU devices, strict numerics, one compilation cache and one prepared
MNIST-1D for the whole run, and the shared data folder when it is present."""

import fcntl
import os
import pathlib
import shutil
import tempfile
import uuid

# Eight CPU devices, so sharded jit and pmap are tested on one machine. Set before JAX starts its
# backends; tests that need one device say so with layout "none".
# Flags the user gave (`--xla_cpu_max_isa=AVX2`, say) are kept; only a device count is replaced.
_DEVICE_FLAG_NAME = "--xla_force_host_platform_device_count"


def xla_flags(devices: int | None) -> str:
  """The XLA_FLAGS of this session with its CPU device count set to `devices` (None: no count,
  XLA's one device); every other flag is kept."""
  kept = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
          if not flag.startswith(_DEVICE_FLAG_NAME)]
  return " ".join(kept + ([f"{_DEVICE_FLAG_NAME}={devices}"] if devices else []))


os.environ["XLA_FLAGS"] = xla_flags(8)

# A folder for this run, shared by its pytest-xdist workers (they know the run's id).
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID") or uuid.uuid4().hex
RUN_DIR = pathlib.Path(tempfile.gettempdir()) / f"jdl-tests-{_RUN_ID}"

# Many tests compile the same programs (each `fit` jits its steps anew; a resumed run compiles
# what the interrupted one did): JAX's persistent compilation cache, private to this run, compiles
# each once. A program read from it is the one compiled, so no result changes. Set in the
# environment, so child processes share it too, and so `jdl.experiment.set_compilation_cache`
# (an experiment's default, ~/.cache/jdl/xla) leaves it alone: no test reads or fills the user's.
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(RUN_DIR / "xla_cache")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

# Strict by default: silent rank promotion hides shape bugs.
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
  """The controller of an xdist run gives its workers this run's id, so they share `RUN_DIR`."""
  if os.environ.get("PYTEST_XDIST_WORKER") is None and hasattr(config.option, "testrunuid"):
    config.option.testrunuid = config.option.testrunuid or _RUN_ID


def pytest_unconfigure(config):
  if os.environ.get("PYTEST_XDIST_WORKER") is None:  # the controller, or a run without workers
    run_id = getattr(config.option, "testrunuid", None) or _RUN_ID
    shutil.rmtree(pathlib.Path(tempfile.gettempdir()) / f"jdl-tests-{run_id}", ignore_errors=True)


SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> pathlib.Path:
  """`../shared/data` beside the checkout; tests that need it skip when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data folder {SHARED_DATA} is absent (it is not part of the project)")
  return SHARED_DATA


@pytest.fixture
def subprocess_env():
  """`subprocess_env(devices=None, **extra)`: this environment for a child process, with its CPU
  device count replaced (None: one device) and the user's other XLA flags kept."""

  def make(devices: int | None = None, **extra: str) -> dict[str, str]:
    return {**os.environ, "XLA_FLAGS": xla_flags(devices), **extra}

  return make


@pytest.fixture
def tfds_dir(tmp_path_factory) -> str:
  """A TFDS data dir private to the test session's worker."""
  return str(tmp_path_factory.getbasetemp() / "tfds")


@pytest.fixture(scope="session")
def mnist1d_data_dir() -> str:
  """A TFDS data dir holding the prepared MNIST-1D, built once for the whole run: the first
  worker to need it prepares it under a file lock, the others wait and reuse it. Tests read it
  (and may add to its array cache, whose files are written atomically)."""
  from jdl import data  # pylint: disable=import-outside-toplevel

  path = RUN_DIR / "tfds_mnist1d"
  path.mkdir(parents=True, exist_ok=True)
  with open(RUN_DIR / "tfds_mnist1d.lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    data.prepare(data.get_builder("mnist1d", str(path)))  # reuses a prepared dataset
  return str(path)
