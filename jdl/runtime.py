"""Process-wide settings of the XLA runtime: the CPU thread count (made before JAX's first
computation) and the library behind the CPU's matrix products in jdl's programs.

XLA's CPU backend runs a program's operations on a pool of threads, one per core the process may
use: each operation that becomes ready starts on whichever thread is free. For a small model
that parallelism costs more than it gives, because its operations take microseconds and a hand-off
between threads costs about as much. On a 2-core machine the MNIST-1D CNN's training step took
0.28-0.39 ms on one thread against 0.43-0.47 ms on two; the seed MLP, whose 784x128 products the
pool splits usefully, is faster on two (0.31-0.36 against 0.39 ms). See BUILD_NOTES.md, "Speed".
The jdl models measured here give bitwise the same parameters on one thread and two (tested);
an operation that XLA splits across threads by its reduction axis (Eigen's convolutions, say)
may round differently, so other models can differ in the last bits (the MNIST-1D benchmark's
plain loop, which uses `nn.Conv`, does).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
from collections.abc import Iterator
from typing import Any

# XLA sizes its PJRT clients' thread pools from this variable, read once when a client starts.
THREADS_VARIABLE = "PJRT_NPROC"

_log = logging.getLogger(__name__)


def backend_started() -> bool:
  """Whether JAX has started its backends (after which their thread pools are fixed)."""
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel

  # Private, but read-only; without it, assume not started and let the setting take its chance.
  started = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(started and started())


def set_cpu_threads(count: int) -> None:
  """Runs XLA's CPU programs on `count` threads instead of one per core.

  Call it before JAX's first computation (creating an array counts): XLA sizes its thread pool
  once, when the backend starts, from the `PJRT_NPROC` environment variable, which this sets.
  `PJRT_NPROC=1 python ...` does the same from the shell. The experiments' `cpu_threads` config
  key calls it when it can (see `apply_cpu_threads`). XLA gives the pool at least one thread per
  CPU device, so with `--xla_force_host_platform_device_count=8` it keeps eight. Where JAX runs
  on a GPU, XLA's GPU compiler reads the same variable (one thread made the MNIST-1D CNN compile
  five times slower on an H200): call it for CPU runs only, or use `apply_cpu_threads`, which
  skips accelerators.

  Raises:
    ValueError: `count` is not a positive integer.
    RuntimeError: JAX's backends have already started, with a thread count not set to `count`.
  """
  _check_count(count, minimum=1)
  if os.environ.get(THREADS_VARIABLE) == str(count):
    return  # already so, set here or in the environment
  if backend_started():
    raise RuntimeError(
        f"cannot run XLA's CPU backend on {count} thread(s): JAX has already started its "
        f"backends ({THREADS_VARIABLE}={os.environ.get(THREADS_VARIABLE, 'unset')}). Call "
        f"jdl.set_cpu_threads({count}) before JAX's first computation, or start the process "
        f"with {THREADS_VARIABLE}={count}.")
  os.environ[THREADS_VARIABLE] = str(count)


def runs_on_cpu() -> bool:
  """Whether JAX's default backend is (or, not started yet, will be) the CPU.

  Before the backends start this is read from what JAX will use: `JAX_PLATFORMS` (the
  `jax_platforms` option) where set, else whether an accelerator plugin (CUDA, ROCm: the
  `jax_plugins` package or entry points) or TPU runtime (`libtpu`) is installed. An installed plugin
  without its device counts as an accelerator: the guess errs towards leaving XLA's defaults.
  """
  import jax  # pylint: disable=import-outside-toplevel

  if backend_started():
    return jax.default_backend() == "cpu"
  platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  return not _accelerator_plugins() and importlib.util.find_spec("libtpu") is None


def _accelerator_plugins() -> list[str]:
  """The PJRT plugins JAX would load, found as JAX finds them (without loading any): modules of
  the `jax_plugins` namespace package and the `jax_plugins` entry points."""
  names = [entry.value for entry in importlib.metadata.entry_points(group="jax_plugins")]
  namespace = importlib.util.find_spec("jax_plugins")
  if namespace is not None and namespace.submodule_search_locations:
    names += [module.name for module in pkgutil.iter_modules(namespace.submodule_search_locations)]
  return names


def apply_cpu_threads(count: int) -> bool:
  """`set_cpu_threads(count)` where it can still take effect and the run is on the CPU; `count`
  0 leaves XLA's default.

  For the `cpu_threads` config key (`train_and_evaluate` and `run_experiment` call it first
  thing): a script's process has not started JAX yet, so the setting applies; called in a
  process where JAX is already running (a notebook, a test), it cannot, and a logged warning says
  so instead of failing a run over a speed setting. On an accelerator it is left alone (logged):
  the thread count is tuned for the CPU's own kernels, and XLA's other thread pools (such as the
  GPU compiler's) read the same variable. Returns whether the setting is in effect."""
  _check_count(count, minimum=0)
  if count == 0:
    return True
  if not runs_on_cpu():
    _log.info("cpu_threads=%d not applied: JAX runs on an accelerator here.", count)
    return False
  try:
    set_cpu_threads(count)
  except RuntimeError as error:
    _log.warning("cpu_threads=%d not applied: %s", count, error)
    return False
  return True


def _check_count(count: int, *, minimum: int) -> None:
  if isinstance(count, bool) or not isinstance(count, int) or count < minimum:
    meaning = "a positive integer" if minimum else "a non-negative integer (0: one per core)"
    raise ValueError(f"the CPU thread count must be {meaning}; got {count!r}.")


CPU_DOT_LIBRARIES = ("default", "xla")
"""`set_cpu_dot_library` choices: "default" leaves XLA's choice (YNNPACK, where this XLA hands
products to it); "xla" keeps the products in XLA's own code (YNNPACK still does reductions)."""

# The XLA option behind "xla": only reductions are handed to YNNPACK, so products stay XLA's.
_XLA_DOTS_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
_dot_library = "default"
_xla_dots_supported: bool | None = None  # checked once, on first use of the option


def set_cpu_dot_library(name: str) -> None:
  """Which library computes the matrix products of the programs jdl compiles on the CPU, from
  now on in this process (`using_cpu_dot_library` for a block of code).

  XLA's CPU backend hands a product to YNNPACK where it can. Which is faster depends on the
  shapes: under the profiler the seed MLP's `[32, 784] @ [784, 128]` took 52 us a step in
  YNNPACK and 39 us in XLA's own code, and its scanned step ran 0.95x as long with "xla"
  (0.89-0.91x with every gradient checked for NaN), while the MNIST-1D CNN's long, thin products
  (`[25, 75] @ [75, 1000]`) ran 1.11x slower. So it is a per-experiment choice, measured (the
  experiments' `cpu_dot_library` config key; BUILD_NOTES.md, "Speed"), not a default.

  It applies to the train and evaluation programs jdl builds after the call: `fit`'s engines,
  the runners' steps (`JitRunner`, `ShardedRunner`; `jax.pmap` takes no compiler options) and
  `vmap_sweep`; not to what a user jits directly. Results differ from the default in the last
  bits (about 1e-7 after hundreds of steps), as any change of summation order does. On an
  accelerator, or with an XLA that has no YNNPACK (where its own products are used anyway), it
  changes nothing.

  Raises:
    ValueError: `name` is not one of `CPU_DOT_LIBRARIES`.
  """
  global _dot_library
  check_cpu_dot_library(name)
  _dot_library = name


def check_cpu_dot_library(name: str) -> None:
  """Raises ValueError unless `name` is one of `CPU_DOT_LIBRARIES`."""
  if name not in CPU_DOT_LIBRARIES:
    raise ValueError(f"unknown CPU dot library {name!r}; expected one of {CPU_DOT_LIBRARIES}.")


@contextlib.contextmanager
def using_cpu_dot_library(name: str) -> Iterator[None]:
  """`set_cpu_dot_library(name)` for the programs built inside the block; the previous choice
  is back after it (`train_and_evaluate` runs an experiment so)."""
  global _dot_library
  previous = _dot_library
  set_cpu_dot_library(name)
  try:
    yield
  finally:
    _dot_library = previous


def cpu_dot_library() -> str:
  """The current `set_cpu_dot_library` choice."""
  return _dot_library


def program_compiler_options() -> dict[str, Any] | None:
  """The XLA compiler options for a train or evaluation program jdl compiles now (`jax.jit`'s
  `compiler_options`), from `set_cpu_dot_library`; None for XLA's defaults."""
  global _xla_dots_supported
  if _dot_library == "default":
    return None
  import jax  # pylint: disable=import-outside-toplevel

  if jax.default_backend() != "cpu":
    return None
  if _xla_dots_supported is None:
    try:  # an XLA without YNNPACK has no such option: its own products are all it has
      jax.jit(lambda x: x + 1, compiler_options=_XLA_DOTS_OPTIONS).lower(0.0).compile()
      _xla_dots_supported = True
    except jax.errors.JaxRuntimeError as error:
      _log.info("cpu_dot_library=%r needs no option with this XLA (%s).", _dot_library, error)
      _xla_dots_supported = False
  return dict(_XLA_DOTS_OPTIONS) if _xla_dots_supported else None
