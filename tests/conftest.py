"""Test-wide settings: eight CPU devices, strict numerics, a persistent compilation cache, one
prepared MNIST-1D for the whole run, and the shared data folder when it is present.

Set JDL_TEST_XLA_CACHE=run to compile everything afresh (as CI on a fresh machine does), or to a
folder of your choice; by default compiled programs are kept across runs in
~/.cache/jdl/xla-tests.
"""

import fcntl
import hashlib
import os
import pathlib
import platform
import shutil
import tempfile
import time
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


def _cpu_fingerprint() -> str:
  """The host CPU's model and instruction set extensions, hashed: JAX's cache keys name the
  platform ("cpu") but not the extensions a program was compiled for, so programs compiled with
  AVX-512 must not be offered to a machine without it (a home folder shared between machines)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as info:
      lines = sorted({line for line in info if line.startswith(("flags", "model name"))})
  except OSError:
    lines = [platform.processor()]
  return hashlib.sha256("".join([platform.machine(), *lines]).encode()).hexdigest()[:16]


def _compilation_cache_dir() -> str:
  """Where compiled programs are kept: $JDL_TEST_XLA_CACHE, or "run" for a folder private to this
  run (a cold run, as on a fresh machine), by default ~/.cache/jdl/xla-tests/<this CPU>."""
  chosen = os.environ.get("JDL_TEST_XLA_CACHE", "")
  if chosen == "run":
    return str(RUN_DIR / "xla_cache")
  return chosen or str(pathlib.Path.home() / ".cache" / "jdl" / "xla-tests" / _cpu_fingerprint())


# Most of the suite's time is XLA compiling small programs, many of them more than once (each
# `fit` jits its steps anew; a resumed run compiles what the interrupted one did; every run of the
# suite compiles what the last one did). JAX's persistent compilation cache compiles each once: a
# program read from it is the program compiled, for the same computation, jaxlib, XLA flags and
# options, so no result changes (a test that counts compilations sees a cache hit as one). Set in
# the environment, so child processes use it too, and so `jdl.experiment.set_compilation_cache`
# (an experiment's default, ~/.cache/jdl/xla) leaves it alone. Tests never read the user's cache.
os.environ["JAX_COMPILATION_CACHE_DIR"] = _compilation_cache_dir()
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
  """The controller (or a run without workers) removes the run's folder, and compiled programs
  written more than two weeks ago, so the kept cache does not grow without bound."""
  if os.environ.get("PYTEST_XDIST_WORKER") is not None:
    return
  run_id = getattr(config.option, "testrunuid", None) or _RUN_ID
  shutil.rmtree(pathlib.Path(tempfile.gettempdir()) / f"jdl-tests-{run_id}", ignore_errors=True)
  cache = pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
  if cache.is_dir():
    old = time.time() - 14 * 24 * 3600
    for entry in cache.iterdir():
      try:
        if entry.stat().st_mtime < old:
          entry.unlink()
      except OSError:
        pass  # another run removed it, or it is not a file


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


@pytest.fixture
def shap_without_numba(monkeypatch):
  """shap's masking helpers as their Python originals (numba's `py_func`, the same code) for one
  test: their numba compilation takes 8-11 s on one core, while the few hundred model evaluations
  of a test's explanations run in milliseconds in Python, to the same values."""
  import importlib  # pylint: disable=import-outside-toplevel

  for module_name, names in (("shap.maskers._tabular", ("_delta_masking", "_single_delta_mask")),
                             ("shap.utils._masked_model", ("_build_fixed_single_output",
                                                           "_build_fixed_multi_output"))):
    module = importlib.import_module(module_name)
    for name in names:
      monkeypatch.setattr(module, name, getattr(module, name).py_func)
