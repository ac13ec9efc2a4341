"""Metric writers: JSON lines and TensorBoard event files in a run's workdir.

`metrics.jsonl` gets one JSON object per record; `tensorboard/` the records `tf.summary` writes
(float32 scalars, the config as text), written without TensorFlow (`EventFileWriter`).
"""

from __future__ import annotations

import contextlib
import glob
import importlib.metadata
import itertools
import json
import math
import os
import platform
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CONFIG_NAME = "config.json"
VERSIONS_NAME = "versions.json"


def library_versions() -> dict[str, str]:
  """The versions of jdl, its main libraries and Python, and the devices, for `versions.json`."""
  import jax  # pylint: disable=import-outside-toplevel
  import jdl  # pylint: disable=import-outside-toplevel

  versions = {"jdl": jdl.__version__, "python": platform.python_version()}
  for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-cpu",
                  "tensorflow", "tensorflow-datasets"):
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
      versions[package] = importlib.metadata.version(package)
  devices = jax.devices()
  versions["devices"] = f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})"
  return versions


class EventFileWriter:
  """Appends TensorBoard summaries, every write flushed, to a new event file (`path`) in `logdir`,
  without TensorFlow: `events.out.tfevents.<seconds>.<host>.<pid>.<n>`, `n` the first number not
  taken, so writers opened in the same second never share one."""

  def __init__(self, logdir: str) -> None:
    # Imported here rather than with jdl: only a writer with TensorBoard on needs them.
    # pylint: disable=import-outside-toplevel
    from tensorboard.compat.proto import event_pb2
    from tensorboard.plugins.scalar.summary_v2 import scalar_pb
    from tensorboard.plugins.text.summary_v2 import text_pb
    from tensorboard.summary.writer.record_writer import RecordWriter

    self._event_pb2, self._scalar_pb, self._text_pb = event_pb2, scalar_pb, text_pb
    os.makedirs(logdir, exist_ok=True)
    stem = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
    for number in itertools.count():
      with contextlib.suppress(FileExistsError):
        # pylint: disable-next=consider-using-with
        file = open(os.path.join(logdir, f"{stem}.{number}"), "xb")  # "x": never another's file
        break
    self.path: str = file.name
    self._records = RecordWriter(file)
    self._records.write(event_pb2.Event(wall_time=time.time(),
                                        file_version="brain.Event:2").SerializeToString())

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """One float32 scalar summary per `{tag: value}` at `step`, as `tf.summary.scalar` writes."""
    self._write(step, [self._scalar_pb(tag, float(value)) for tag, value in scalars.items()])

  def write_text(self, step: int, tag: str, text: str) -> None:
    """A text summary (shown under TensorBoard's Text tab), as `tf.summary.text` writes."""
    self._write(step, [self._text_pb(tag, text)])

  def close(self) -> None:  # closing again does nothing
    if not self._records.closed:
      self._records.close()

  def _write(self, step: int, summaries: list[Any]) -> None:
    for summary in summaries:
      self._records.write(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                                summary=summary).SerializeToString())
    self._records.flush()


class MetricWriter:
  """Writes scalar records to `workdir/metrics.jsonl` (NaN as null) and TensorBoard event files
  (finite numbers only). Use as a context manager, or call `close()` when done."""

  def __init__(self, workdir: str, *, tensorboard: bool = True) -> None:
    os.makedirs(workdir, exist_ok=True)
    self.workdir = workdir
    self._jsonl = open(os.path.join(workdir, JSONL_NAME), "a", encoding="utf-8")
    self._summary = EventFileWriter(os.path.join(workdir, TENSORBOARD_DIR)) if tensorboard else None

  def write(self, step: int, scalars: Mapping[str, float | int]) -> None:
    record = {"step": int(step)}
    for key, value in scalars.items():
      value = float(value) if not isinstance(value, (int, bool)) else value
      record[key] = None if isinstance(value, float) and math.isnan(value) else value
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._summary is not None:
      self._summary.write_scalars(step, {
          key: value for key, value in scalars.items()
          if isinstance(value, (int, float)) and math.isfinite(value)})

  def write_config(self, config: Mapping[str, Any], *, summary: bool = True) -> None:
    """Saves `config` as `config.json` (with `summary`, as TensorBoard text at step 0 too: a
    resumed run has it there already) and `library_versions()` as `versions.json`."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    text = json.dumps(as_dict, indent=2, sort_keys=True, default=str)
    with open(os.path.join(self.workdir, CONFIG_NAME), "w", encoding="utf-8") as f:
      f.write(text)
    with open(os.path.join(self.workdir, VERSIONS_NAME), "w", encoding="utf-8") as f:
      json.dump(library_versions(), f, indent=2, sort_keys=True)
    if self._summary is not None and summary:
      self._summary.write_text(0, "config", text)

  def close(self) -> None:
    self._jsonl.close()
    if self._summary is not None:
      self._summary.close()

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


def truncate_records(workdir: str, start_step: int) -> None:
  """Drops the records of `metrics.jsonl` and the TensorBoard events (all from step 0) that earlier
  attempts of a run wrote after `start_step`, where it starts now; files are replaced atomically."""
  path = os.path.join(workdir, JSONL_NAME)
  if os.path.exists(path):
    records = read_jsonl(workdir)
    kept = [record for record in records if int(record["step"]) <= start_step]
    if len(kept) != len(records):
      with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in kept)
      os.replace(path + ".tmp", path)
  for path in sorted(glob.glob(os.path.join(workdir, TENSORBOARD_DIR, "events.out.tfevents.*"))):
    if start_step <= 0:
      os.remove(path)
    else:
      _truncate_event_file(path, start_step)


def _truncate_event_file(path: str, last_step: int) -> None:
  """Rewrites a TensorBoard event file without its events after `last_step`."""
  # pylint: disable=import-outside-toplevel
  from tensorboard.compat.proto import event_pb2
  from tensorboard.summary.writer.record_writer import RecordWriter

  records = list(_read_records(path))
  kept = [record for record in records if event_pb2.Event.FromString(record).step <= last_step]
  if len(kept) == len(records):
    return
  with open(path + ".tmp", "wb") as f:
    writer = RecordWriter(f)
    for record in kept:
      writer.write(record)
    writer.flush()
  os.replace(path + ".tmp", path)


def _read_records(path: str) -> Any:
  """The records of a TFRecord file (length, its CRC, data, its CRC); a torn last one ends it."""
  with open(path, "rb") as f:
    while True:
      header = f.read(12)
      if len(header) < 12:
        return
      (length,) = struct.unpack("<Q", header[:8])
      data = f.read(length)
      if len(data) < length or len(f.read(4)) < 4:
        return
      yield data


def read_jsonl(workdir: str) -> list[dict[str, Any]]:
  """The records a `MetricWriter` wrote to `workdir`."""
  with open(os.path.join(workdir, JSONL_NAME), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
