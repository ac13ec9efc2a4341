"""Test-wide settings: strict numerics, and the shared data folder when it is present."""

import os
import pathlib

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

import jax  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

# Strict by default: silent rank promotion hides shape bugs.
jax.config.update("jax_numpy_rank_promotion", "raise")

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
def mnist1d_data_dir(tmp_path_factory) -> str:
  """A TFDS data dir holding the prepared MNIST-1D (built once per test worker)."""
  from jdl import data  # pylint: disable=import-outside-toplevel

  path = str(tmp_path_factory.mktemp("tfds_mnist1d"))
  data.prepare(data.get_builder("mnist1d", path))
  return path
