"""TensorFlow and TFDS, imported on first use.

jdl uses TensorFlow only for tf.data pipelines and TFDS datasets, which take seconds to import and
which accelerator hosts often lack; through these stand-ins everything else (the steps, models,
`fit` over in-memory arrays, writers, cached splits) runs without it.
"""

from __future__ import annotations

import importlib
import logging
import threading
import types
from collections.abc import Callable
from typing import Any

_log = logging.getLogger(__name__)


class LazyModule(types.ModuleType):
  """A stand-in for module `name` that imports it on first attribute access, then runs
  `on_load(module)` once; a missing package is a `ModuleNotFoundError` naming what to install."""

  def __init__(self, name: str, *, install: str, purpose: str,
               on_load: Callable[[types.ModuleType], None] | None = None):
    super().__init__(name)
    self._lazy_install, self._lazy_purpose, self._lazy_on_load = install, purpose, on_load
    self._lazy_module: types.ModuleType | None = None
    self._lazy_lock = threading.RLock()

  def _load(self) -> types.ModuleType:
    with self._lazy_lock:
      if self._lazy_module is None:
        try:
          module = importlib.import_module(self.__name__)
        except ModuleNotFoundError as error:
          raise ModuleNotFoundError(
              f"jdl needs the package {self._lazy_install!r} for {self._lazy_purpose}, and "
              f"{self.__name__!r} cannot be imported here ({error}). Install it "
              f"(pip install {self._lazy_install}), or keep to what runs without it: in-memory "
              "arrays (jdl.data.ArraySource), the train steps, the models and jdl.fit.",
              name=self.__name__) from error
        if self._lazy_on_load is not None:
          self._lazy_on_load(module)
        self._lazy_module = module
      return self._lazy_module

  def __getattr__(self, attribute: str) -> Any:
    if attribute.startswith("_lazy_"):  # not set yet: __init__ is running
      raise AttributeError(attribute)
    return getattr(self._load(), attribute)

  def __dir__(self) -> list[str]:
    return dir(self._load())

  def __repr__(self) -> str:
    state = "imported" if self._lazy_module is not None else "not imported yet"
    return f"<lazy module {self.__name__!r} ({state})>"


def _hide_accelerators(tf: types.ModuleType) -> None:
  """TensorFlow serves only the input pipeline: it must never take accelerator memory from JAX."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError as error:  # the user's own code started TensorFlow's GPU runtime first
    _log.warning("TensorFlow's GPUs were initialised before jdl could hide them from it (%s); "
                 "TensorFlow may take accelerator memory that JAX needs.", error)


tensorflow = LazyModule("tensorflow", install="tensorflow-cpu", purpose="tf.data input pipelines",
                        on_load=_hide_accelerators)


# TFDS reads and writes through TensorFlow: load it (and hide its GPUs) through jdl first.
tensorflow_datasets = LazyModule(
    "tensorflow_datasets", install="tensorflow-datasets", purpose="TFDS datasets",
    on_load=lambda _: tensorflow._load())  # pylint: disable=protected-access
