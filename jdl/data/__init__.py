"""Data: TFDS builders -> tf.data or in-memory arrays -> fixed-shape numpy batches.

`load_classification_data` is the one call the training loop makes; the pieces it is made of
(`get_builder`, `prepare`, `read_split`, `load_split_arrays`, `ArraySource`, `TFDataSource`) are
public for pipelines of your own.
"""

from __future__ import annotations

import dataclasses

from jdl.data.loading import (
    DatasetMeta,
    DatasetUnavailableError,
    dataset_meta,
    get_builder,
    load_split_arrays,
    prepare,
    read_split,
    scale_inputs,
)
from jdl.data.mnist1d import Mnist1d, generate_mnist1d
from jdl.data.sources import (
    ArraySource,
    Batch,
    BatchSource,
    TFDataSource,
    check_inputs,
    check_labels,
    epoch_seed,
    pad_batch,
)


def load_classification_data(
    name: str,
    *,
    batch_size: int,
    eval_batch_size: int,
    train_split: str = "train",
    eval_split: str = "test",
    data_dir: str | None = None,
    download: bool = True,
    manual_dir: str | None = None,
    in_memory: bool = True,
    seed: int = 0,
    shuffle_buffer: int = 10_000,
) -> tuple[BatchSource, BatchSource, DatasetMeta]:
  """The train and eval batch sources of a TFDS classification dataset, and its metadata.

  Args:
    name: TFDS dataset name, e.g. "mnist1d" (offline) or "fashion_mnist".
    batch_size: training batch size: the number of examples per gradient step. The whole
      training split gives batch gradient descent, 1 stochastic gradient descent.
    eval_batch_size: evaluation batch size (affects speed only, never the metrics).
    train_split, eval_split: TFDS split names (slicing such as "train[:90%]" works).
    data_dir: TFDS data directory; None means TFDS's default.
    download: whether a missing dataset may be downloaded.
    manual_dir: folder of raw files for builders that prepare from one.
    in_memory: load whole splits as numpy arrays (fast; for datasets that fit in memory) instead
      of streaming them through tf.data.
    seed: seeds the per-epoch shuffles of the training split.
    shuffle_buffer: shuffle buffer of the streaming path.

  Returns:
    `(train_source, eval_source, meta)`; the train source shuffles, the eval source does not.
  """
  builder = get_builder(name, data_dir)
  prepare(builder, download=download, manual_dir=manual_dir)
  meta = dataset_meta(builder)
  if in_memory:
    sources = []
    for split, size, shuffle in ((train_split, batch_size, True), (eval_split, eval_batch_size, False)):
      inputs, labels = load_split_arrays(builder, split)
      check_labels(labels, meta.num_classes, where=f"labels of split {split!r}")
      sources.append(ArraySource(inputs, labels, size, shuffle=shuffle, seed=seed))
    meta = _with_split_sizes(meta, {train_split: sources[0].num_examples,
                                    eval_split: sources[1].num_examples})
    return sources[0], sources[1], meta
  streams = []
  for split, size, shuffle in ((train_split, batch_size, True), (eval_split, eval_batch_size, False)):
    dataset = read_split(builder, split, shuffle_files=shuffle, seed=seed)
    count = int(dataset.cardinality())
    if count < 0:
      count = int(builder.info.splits[split].num_examples)
    streams.append(TFDataSource(dataset, count, size, shuffle=shuffle, seed=seed,
                                shuffle_buffer=shuffle_buffer))
  meta = _with_split_sizes(meta, {train_split: streams[0].num_examples,
                                  eval_split: streams[1].num_examples})
  return streams[0], streams[1], meta


def _with_split_sizes(meta: DatasetMeta, sizes: dict[str, int]) -> DatasetMeta:
  return dataclasses.replace(meta, split_sizes={**meta.split_sizes, **sizes})


__all__ = [
    "ArraySource", "Batch", "BatchSource", "DatasetMeta", "DatasetUnavailableError", "Mnist1d",
    "TFDataSource", "check_inputs", "check_labels", "dataset_meta", "epoch_seed",
    "generate_mnist1d", "get_builder", "load_classification_data", "load_split_arrays",
    "pad_batch", "prepare", "read_split", "scale_inputs",
]
