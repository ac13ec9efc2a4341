"""Metric writers: JSON lines and TensorBoard event files in a run's workdir.

`metrics.jsonl` gets one JSON object per record (`{"step": ..., "train_loss": ..., ...}`), easy to
load with pandas or plain Python; `tensorboard/` gets scalar summaries that TensorBoard reads
(`tensorboard --logdir WORKDIR/tensorboard`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from jdl.lazy_import import tensorflow as tf

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CONFIG_NAME = "config.json"
VERSIONS_NAME = "versions.json"


def library_versions() -> dict[str, str]:
  """The versions a run depends on, for `versions.json`: jdl, jax, flax, optax, orbax,
  TensorFlow, TFDS, Python, and the devices JAX sees."""
  import importlib.metadata  # pylint: disable=import-outside-toplevel
  import platform  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel

  import jdl  # pylint: disable=import-outside-toplevel

  versions = {"jdl": jdl.__version__, "python": platform.python_version()}
  for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-cpu",
                  "tensorflow", "tensorflow-datasets"):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  devices = jax.devices()
  versions["devices"] = f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})"
  return versions


class MetricWriter:
  """Writes scalar records to `workdir/metrics.jsonl` and TensorBoard event files.

  Use as a context manager, or call `close()` when done. Values that are not finite numbers are
  written as they are to JSON lines (NaN as null) and skipped for TensorBoard.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True) -> None:
    os.makedirs(workdir, exist_ok=True)
    self.workdir = workdir
    self._jsonl = open(os.path.join(workdir, JSONL_NAME), "a", encoding="utf-8")
    self._summary = (
        tf.summary.create_file_writer(os.path.join(workdir, TENSORBOARD_DIR)) if tensorboard else None
    )

  def write(self, step: int, scalars: Mapping[str, float | int]) -> None:
    """Writes one record of scalars at `step`."""
    record = {"step": int(step)}
    for key, value in scalars.items():
      value = float(value) if not isinstance(value, (int, bool)) else value
      record[key] = None if isinstance(value, float) and math.isnan(value) else value
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._summary is not None:
      with self._summary.as_default():
        for key, value in scalars.items():
          if isinstance(value, (int, float)) and math.isfinite(value):
            tf.summary.scalar(key, value, step=int(step))
      self._summary.flush()

  def write_config(self, config: Mapping[str, Any]) -> None:
    """Saves the run's configuration as `config.json` (and as text in TensorBoard), and the
    versions of jdl and its main libraries, Python and the devices as `versions.json`."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    with open(os.path.join(self.workdir, CONFIG_NAME), "w", encoding="utf-8") as f:
      json.dump(as_dict, f, indent=2, sort_keys=True, default=str)
    with open(os.path.join(self.workdir, VERSIONS_NAME), "w", encoding="utf-8") as f:
      json.dump(library_versions(), f, indent=2, sort_keys=True)
    if self._summary is not None:
      with self._summary.as_default():
        tf.summary.text("config", json.dumps(as_dict, indent=2, sort_keys=True, default=str), step=0)
      self._summary.flush()

  def close(self) -> None:
    self._jsonl.close()
    if self._summary is not None:
      self._summary.close()

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


def truncate_jsonl(workdir: str, last_step: int) -> int:
  """Drops the records after `last_step` from `workdir/metrics.jsonl` (a resumed run writes them
  again); returns how many were dropped. The file is replaced atomically."""
  path = os.path.join(workdir, JSONL_NAME)
  if not os.path.exists(path):
    return 0
  records = read_jsonl(workdir)
  kept = [record for record in records if int(record["step"]) <= last_step]
  if len(kept) != len(records):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.writelines(json.dumps(record) + "\n" for record in kept)
    os.replace(path + ".tmp", path)
  return len(records) - len(kept)


def read_jsonl(workdir: str) -> list[dict[str, Any]]:
  """The records a `MetricWriter` wrote to `workdir`."""
  with open(os.path.join(workdir, JSONL_NAME), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
