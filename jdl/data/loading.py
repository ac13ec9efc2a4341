"""TFDS datasets: find, prepare (offline where possible), and read splits.

A dataset not yet on disk is generated on the spot if its builder makes its data (MNIST-1D), and
prepared from `manual_dir` if that holds its raw files or all its downloads under their registered
names (tiny_shakespeare's `input.txt`; TFDS checks the checksums). Anything else is downloaded,
after a short probe of its hosts: when they cannot be reached, `DatasetUnavailableError` says
within seconds how to get the data, instead of minutes of network retries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import os
import socket
import sys
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jdl.lazy_import import tensorflow as tf
from jdl.lazy_import import tensorflow_datasets as tfds


def _offline_builder_types() -> tuple[type, ...]:
  """The builders that generate their data (importing them registers them with TFDS)."""
  from jdl.data import mnist1d  # pylint: disable=import-outside-toplevel

  return (mnist1d.Mnist1d,)


def _tfds_is_mocked() -> bool:
  """True inside `tfds.testing.mock_data` (no download, no network probe). Read statically: TFDS
  wraps the method with `wrapt`, and attribute access makes a new wrapper every time. Mocking
  needs TFDS imported, so while it is not, nothing is mocked and TFDS stays unimported."""
  if "tensorflow_datasets" not in sys.modules:
    return False
  current = inspect.getattr_static(tfds.core.DatasetBuilder, "download_and_prepare")
  return getattr(current, "__module__", "").startswith("tensorflow_datasets.testing")


class DatasetUnavailableError(RuntimeError):
  """A dataset is not on disk and cannot be prepared here (no network, no manual files)."""


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
  """What the training loop needs to know about a supervised classification dataset: its TFDS
  name, per-example input shape, classes (names where TFDS knows them), examples per split, the
  model inputs' dtype, "float32" (pixels, signals) or "int32" (token ids), and whether they are
  `pixels`: uint8, carried as they are (a quarter of float32's bytes) and scaled to float32 in
  [0, 1] by the step on the device (`jdl.tasks.classification(pixels=True)`)."""

  name: str
  input_shape: tuple[int, ...]
  num_classes: int
  class_names: tuple[str, ...] | None
  split_sizes: dict[str, int]
  input_dtype: str = "float32"
  pixels: bool = False

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> DatasetMeta:
    """The metadata from `dataclasses.asdict(meta)` after a JSON round trip (lists to tuples);
    a ValueError if a field is missing or unknown."""
    names = {field.name for field in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
    if not required <= set(fields) <= names:
      raise ValueError(f"dataset metadata needs the fields {sorted(required)} (and may have "
                       f"{sorted(names - required)}); got {sorted(fields)}.")
    values = dict(fields)
    values["input_shape"] = tuple(int(dim) for dim in values["input_shape"])
    if values["class_names"] is not None:
      values["class_names"] = tuple(values["class_names"])
    values["split_sizes"] = {str(name): int(size) for name, size in values["split_sizes"].items()}
    return cls(**values)


def get_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """The TFDS builder for `name` (e.g. "fashion_mnist", "mnist1d", "cifar10:3.0.2")."""
  _offline_builder_types()  # registers jdl's own builders with TFDS
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    base_name = name.split(":")[0].split("/")[0]
    close = difflib.get_close_matches(base_name, tfds.list_builders(), n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise DatasetUnavailableError(f"TFDS knows no dataset called {name!r}.{hint} "
                                  "`tfds.list_builders()` lists them all.") from None


def prepare(builder: tfds.core.DatasetBuilder, *, download: bool = True,
            manual_dir: str | None = None, probe_timeout_s: float = 5.0) -> None:
  """Makes sure `builder`'s data is on disk, offline where it can (module docstring), waiting
  `probe_timeout_s` for the download hosts; else raises `DatasetUnavailableError`."""
  if builder.is_prepared():
    return
  if _tfds_is_mocked() or isinstance(builder, _offline_builder_types()):
    builder.download_and_prepare()
    return
  # The downloads whose registered checksum names a file: TFDS reads `manual_dir/<file name>`
  # (`input.txt`) instead of downloading it, after checking the checksum.
  url_infos = type(builder).url_infos or {}
  files = {info.filename: url for url, info in url_infos.items() if info.filename}
  download_config = None
  if manual_dir is not None:
    if not os.path.isdir(manual_dir):
      raise DatasetUnavailableError(
          f"manual_dir {manual_dir!r} for {builder.name!r} is not a folder.")
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    files = {name: url for name, url in files.items()
             if not os.path.isfile(os.path.join(manual_dir, name))}
    if not files:  # everything is at hand: prepare without touching the network
      builder.download_and_prepare(download_config=download_config)
      return
  how_to = (
      f"Dataset {builder.name!r} is not prepared in {builder.data_dir!r}. On a machine with "
      f"internet run `tfds build {builder.name} --data_dir=DIR` (or any jdl experiment on it) and "
      "copy DIR here, then pass its path as the data dir (`--config.data_dir=DIR`).")
  if files:
    listed = [f"{url} as {name!r}" for name, url in sorted(files.items())]
    if len(listed) > 3:
      listed = listed[:3] + [f"{len(listed) - 3} more file(s)"]
    where = (f"into manual_dir {manual_dir!r}" if manual_dir is not None else
             "into a folder and pass that folder as manual_dir")
    how_to += f" Or put {', '.join(listed)} {where} (TFDS then prepares from it offline)."
  if not download:
    raise DatasetUnavailableError(how_to + " Downloading is switched off (download=False).")
  urls = [urllib.parse.urlparse(url) for url in url_infos]
  hosts = sorted({(url.hostname, url.port or (443 if url.scheme == "https" else 80))
                  for url in urls if url.hostname})
  if unreachable := _unreachable_hosts(hosts, timeout_s=probe_timeout_s):
    raise DatasetUnavailableError(
        how_to + f" Downloading is not possible: cannot reach {', '.join(unreachable)} "
        f"within {probe_timeout_s:g}s.")
  builder.download_and_prepare(download_config=download_config)


def _unreachable_hosts(hosts: Sequence[tuple[str, int]], *, timeout_s: float) -> list[str]:
  """Hosts that do not accept a TCP connection within `timeout_s` (DNS included)."""
  reached: set[tuple[str, int]] = set()

  def probe(host: tuple[str, int]) -> None:
    with contextlib.suppress(OSError):
      socket.create_connection(host, timeout=timeout_s).close()
      reached.add(host)

  threads = [threading.Thread(target=probe, args=(host,), daemon=True) for host in hosts]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout_s)
  return [f"{name}:{port}" for name, port in hosts if (name, port) not in reached]


def dataset_meta(builder: tfds.core.DatasetBuilder) -> DatasetMeta:
  """The `DatasetMeta` of a classifier dataset with fixed-shape numeric inputs; else ValueError."""
  info = builder.info
  if not info.supervised_keys:
    raise ValueError(f"dataset {builder.name!r} has no supervised (input, label) keys.")
  input_key, label_key = info.supervised_keys[:2]
  input_feature, label_feature = info.features[input_key], info.features[label_key]
  dtype = np.dtype(input_feature.np_dtype)
  if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
    raise ValueError(f"dataset {builder.name!r} has non-numeric inputs ({input_key!r} of dtype "
                     f"{dtype}); jdl's classification pipeline needs numeric arrays.")
  shape = tuple(input_feature.shape)
  if any(dim is None for dim in shape):
    raise ValueError(f"dataset {builder.name!r} has inputs of varying shape {shape}; resize them "
                     "to a fixed shape first.")
  if not isinstance(label_feature, tfds.features.ClassLabel):
    raise ValueError(f"dataset {builder.name!r}'s label {label_key!r} is not a class label.")
  names = tuple(label_feature.names) if label_feature.names else None
  splits = {name: split.num_examples for name, split in info.splits.items()}
  return DatasetMeta(builder.name, shape, label_feature.num_classes, names, splits,
                     pixels=dtype == np.uint8)


def scale_inputs(inputs: np.ndarray | tf.Tensor) -> np.ndarray | tf.Tensor:
  """uint8 pixels as float32 in [0, 1], other numeric inputs as float32, for host-side work such
  as tf.data augmentation (jdl's batches are scaled on the device): tensors with TensorFlow, arrays
  with numpy, giving the bits `jdl.tasks.unit_pixels` gives."""
  is_tensor = "tensorflow" in sys.modules and isinstance(inputs, tf.Tensor)
  values = tf.cast(inputs, tf.float32) if is_tensor else inputs.astype(np.float32)
  return values / np.float32(255.0) if inputs.dtype == np.uint8 else values


def batch_inputs(inputs: np.ndarray | tf.Tensor) -> np.ndarray | tf.Tensor:
  """Inputs as jdl's batches carry them to the device: uint8 pixels as they are (the step scales
  them, `DatasetMeta.pixels`), other numeric inputs as float32."""
  return inputs if inputs.dtype == np.uint8 else scale_inputs(inputs)


def read_split(builder: tfds.core.DatasetBuilder, split: str, *, shuffle_files: bool = False,
               seed: int = 0) -> tf.data.Dataset:
  """A split as an unbatched tf.data pipeline of `(input, label)` pairs, inputs as `batch_inputs`
  gives them, labels int32; `shuffle_files` is ignored for datasets stored in a fixed order
  (`disable_shuffling`): TFDS refuses it."""
  shuffle_files = shuffle_files and not builder.info.disable_shuffling
  read_config = tfds.ReadConfig(shuffle_seed=seed) if shuffle_files else None
  dataset = builder.as_dataset(split=split, as_supervised=True, shuffle_files=shuffle_files,
                               read_config=read_config)
  return dataset.map(lambda x, y: (batch_inputs(x), tf.cast(y, tf.int32)),
                     num_parallel_calls=tf.data.AUTOTUNE)


def load_raw_split_arrays(builder: tfds.core.DatasetBuilder,
                          split: str) -> tuple[np.ndarray, np.ndarray]:
  """A whole (non-empty) split in memory as `(inputs, labels)` numpy arrays in TFDS order and in
  the dtypes TFDS stores (uint8 pixels, int64 labels): what `jdl.data.array_cache` keeps."""
  dataset = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
  batches = list(dataset.batch(4096).as_numpy_iterator())  # (inputs, labels) pairs
  if not batches:
    raise ValueError(f"split {split!r} of {builder.name!r} is empty.")
  inputs, labels = zip(*batches)
  return np.concatenate(inputs), np.concatenate(labels)


def as_batch_arrays(inputs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Raw split arrays as batches carry them, the bits `read_split` gives through tf.data."""
  return batch_inputs(inputs), labels.astype(np.int32)


def load_split_arrays(builder: tfds.core.DatasetBuilder,
                      split: str) -> tuple[np.ndarray, np.ndarray]:
  """A whole split in memory as `(inputs, labels int32)` numpy arrays, in TFDS order: uint8
  pixels (scale them on the device: `jdl.tasks.unit_pixels`) or float32 inputs."""
  return as_batch_arrays(*load_raw_split_arrays(builder, split))
