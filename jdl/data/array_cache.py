"""Prepared splits kept as numpy files, so that later in-memory loads need neither TFDS nor TF.

The first in-memory load of a split writes its arrays and metadata to one file in
`<data_dir>/jdl_arrays/`; later loads read it with numpy alone (importing TensorFlow and TFDS takes
most of a small experiment's start-up). It is used while all it was written for holds: the
dataset as requested ("cifar10:3.0.2"), split and data dir; the versions of tensorflow-datasets
and of jdl's builders (`JDL_BUILDER_VERSIONS`: other builders are cached only when the request
names a version); the prepared `dataset_info.json`'s place, size and modification time. An
unreadable file counts as missing; files are renamed into place. Mocked TFDS bypasses the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import uuid
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jdl.data import loading
from jdl.lazy_import import tensorflow_datasets as tfds

_log = logging.getLogger(__name__)

CACHE_DIR = "jdl_arrays"  # the folder of a TFDS data dir that holds the cached splits
# The layout of a cache file; a file of another layout is a miss (2: the metadata says whether the
# inputs are pixels).
FORMAT = 2

JDL_BUILDER_VERSIONS: Mapping[str, str] = {"mnist1d": "1.1.0"}
"""The version of each of jdl's own builders (`Mnist1d.VERSION`), which a name without a version
resolves to. Written out here so that resolving it needs no TFDS; a test checks the two agree."""

_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError,
                zipfile.BadZipFile)


@dataclasses.dataclass(frozen=True)
class RawSplit:
  """A whole split as `loading.load_raw_split_arrays` gives it, and the dataset's metadata."""

  inputs: np.ndarray
  labels: np.ndarray
  meta: loading.DatasetMeta


def load_splits(dataset: str, splits: Sequence[str], *, data_dir: str | None = None,
                download: bool = True, manual_dir: str | None = None, cache: bool = True
                ) -> tuple[loading.DatasetMeta, dict[str, tuple[np.ndarray, np.ndarray]]]:
  """`(meta, {split: (inputs, labels int32)})` of a classification dataset, as
  `jdl.data.dataset_meta` and `load_split_arrays` give them (bit for bit), from the cache where it
  holds them and through TFDS otherwise (then cached, unless `cache` is False). `download` and
  `manual_dir` are `jdl.data.prepare`'s, for a dataset not yet prepared."""
  if not splits:
    raise ValueError(f"load_splits needs at least one split of {dataset!r}; got none.")
  use_cache = cache and not loading._tfds_is_mocked()  # pylint: disable=protected-access
  found: dict[str, RawSplit] = {}
  for split in dict.fromkeys(splits) if use_cache else ():
    if (cached := read_cached_split(dataset, split, data_dir)) is not None:
      found[split] = cached
  if missing := [split for split in dict.fromkeys(splits) if split not in found]:
    builder = loading.get_builder(dataset, data_dir)
    loading.prepare(builder, download=download, manual_dir=manual_dir)
    meta = loading.dataset_meta(builder)
    for split in missing:
      found[split] = RawSplit(*loading.load_raw_split_arrays(builder, split), meta)
      if use_cache:
        write_cached_split(dataset, split, data_dir, builder, found[split])
  arrays = {split: loading.as_batch_arrays(found[split].inputs, found[split].labels)
            for split in splits}
  return found[splits[0]].meta, arrays


def data_dir_root(data_dir: str | None) -> str:
  """The absolute TFDS data dir: `data_dir`, else `$TFDS_DATA_DIR` or `~/tensorflow_datasets`."""
  root = os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets") if data_dir is None else data_dir
  return os.path.abspath(os.path.expanduser(os.fspath(root)))


def cache_key(dataset: str, split: str) -> dict[str, Any]:
  """What a cached split of `dataset` (as requested) must have been written for, beside its data
  dir (see the module docstring); the tensorflow-datasets version is None when not installed."""
  try:
    tfds_version = importlib.metadata.version("tensorflow-datasets")
  except importlib.metadata.PackageNotFoundError:
    tfds_version = None
  base_name = dataset.split(":")[0].split("/")[0].strip()  # without config and version
  return {"format": FORMAT, "dataset": dataset, "split": split, "tensorflow_datasets": tfds_version,
          "jdl_builder_version": JDL_BUILDER_VERSIONS.get(base_name)}


def cache_path(key: Mapping[str, Any], data_dir: str | None) -> str:
  """The cache file for `key` in `data_dir`: `<data_dir>/jdl_arrays/mnist1d-train-<hash>.npz`."""
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
  name = f"{_slug(key['dataset'])}-{_slug(key['split'])}-{digest}.npz"
  return os.path.join(data_dir_root(data_dir), CACHE_DIR, name)


def read_cached_split(dataset: str, split: str, data_dir: str | None) -> RawSplit | None:
  """The cached split, or None; an unreadable file is logged and left for the writer to replace."""
  if _is_remote(data_dir):
    return None
  key = cache_key(dataset, split)
  path = cache_path(key, data_dir)
  try:
    with np.load(path, allow_pickle=False) as stored:
      header = json.loads(str(stored["header"]))
      root, stamp = data_dir_root(data_dir), header["prepared"]  # a deleted dataset: not found
      if header["key"] != key or _prepared_stamp(root, os.path.join(root, stamp["dir"])) != stamp:
        return None
      inputs, labels = stored["inputs"], stored["labels"]
    meta = loading.DatasetMeta.from_dict(header["meta"])
    if not (len(inputs) == len(labels) == header["num_examples"]
            and np.issubdtype(labels.dtype, np.integer)):
      raise ValueError("its arrays do not match its header")
  except FileNotFoundError:
    return None
  except _READ_ERRORS as error:
    _log.warning("ignoring the unreadable array cache %s (%s: %s); it will be written again.",
                 path, type(error).__name__, error)
    return None
  return RawSplit(inputs, labels, meta)


def write_cached_split(dataset: str, split: str, data_dir: str | None,
                       builder: tfds.core.DatasetBuilder, raw: RawSplit) -> str | None:
  """Writes `raw`, read through `builder`, as the cache file of `split` of `dataset`; returns its
  path, or None when this split is not cached or the file cannot be written (logged)."""
  root = data_dir_root(data_dir)
  prepared = os.path.abspath(os.fspath(builder.data_dir))
  if (_is_remote(data_dir) or not _resolution_is_fixed(dataset, builder)
      or os.path.commonpath([root, prepared]) != root):  # TFDS found it in another data dir
    return None
  key = cache_key(dataset, split)
  path = cache_path(key, data_dir)
  header = {"key": key, "meta": dataclasses.asdict(raw.meta), "num_examples": len(raw.labels),
            "prepared": _prepared_stamp(root, prepared)}
  # A name of this writer's own (two processes may write the same split at once), created with
  # the permissions of any new file, unlike tempfile's private ones.
  temporary = f"{path}.{uuid.uuid4().hex}.tmp"
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(temporary, "xb") as f:
      np.savez(f, inputs=raw.inputs, labels=raw.labels, header=np.array(json.dumps(header)))
    os.replace(temporary, path)
  except OSError as error:
    _log.warning("could not write the array cache %s (%s); later loads read through TFDS again.",
                 path, error)
    if os.path.exists(temporary):
      os.remove(temporary)
    return None
  return path


def _prepared_stamp(root: str, prepared: str) -> dict[str, Any]:
  """Where the prepared dataset is (relative to the data dir, so a moved data dir keeps its cache)
  and its `dataset_info.json`'s size and modification time."""
  info = os.stat(os.path.join(prepared, "dataset_info.json"))
  return {"dir": os.path.relpath(prepared, root), "info_size": info.st_size,
          "info_mtime_ns": info.st_mtime_ns}


def _resolution_is_fixed(dataset: str, builder: tfds.core.DatasetBuilder) -> bool:
  """Whether the key fixes the version `dataset` resolves to: it names one, or the builder is
  TFDS's own or jdl's."""
  requested = dataset.partition(":")[2]
  if requested and "*" not in requested:
    return True
  module = type(builder).__module__
  if builder.name in JDL_BUILDER_VERSIONS:
    return module.startswith("jdl.") and str(builder.version) == JDL_BUILDER_VERSIONS[builder.name]
  return module.startswith("tensorflow_datasets.") and not module.startswith(
      "tensorflow_datasets.core.")


def _is_remote(data_dir: str | None) -> bool:
  return data_dir is not None and "://" in os.fspath(data_dir)


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_")[:60] or "_"
