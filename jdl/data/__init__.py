"""Data: TFDS builders -> tf.data or in-memory arrays -> fixed-shape numpy batches.

`load_classification_data` is the one call the training loop makes; the pieces it is made of
(`get_builder`, `prepare`, `read_split`, `load_split_arrays`, `ArraySource`, `TFDataSource`) are
public for pipelines of your own. Text datasets: `jdl.data.text`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jdl.data.loading import (DatasetMeta, DatasetUnavailableError, dataset_meta, get_builder,
                              load_raw_split_arrays, load_split_arrays, prepare, read_split,
                              scale_inputs)
from jdl.data import array_cache, augment_tf
from jdl.data.sources import (ArraySource, Batch, BatchSource, PipelineAugmentFn, TFDataSource,
                              check_inputs, check_labels, epoch_seed, pad_batch)
from jdl.data.text import (CharVocabulary, TokenWindowSource, WordVocabulary, load_char_lm_data,
                           load_text_classification_data, read_text, read_token_file,
                           sequential_windows)
from jdl.lazy_import import tensorflow_datasets as tfds


def load_classification_data(
    name: str, *, batch_size: int, eval_batch_size: int, train_split: str = "train",
    eval_split: str = "test", data_dir: str | None = None, download: bool = True,
    manual_dir: str | None = None, in_memory: bool = True, seed: int = 0, shuffle: bool = True,
    shuffle_buffer: int = 10_000, process_index: int = 0, process_count: int = 1,
    augment: PipelineAugmentFn | None = None, cache_arrays: bool = True,
) -> tuple[BatchSource, BatchSource, DatasetMeta]:
  """`(train_source, eval_source, meta)` of a TFDS classification dataset ("mnist1d" offline,
  "fashion_mnist"); the train source shuffles (seeded per epoch), the eval source does not.

  Batch sizes are global (each of `process_count` processes yields its share of every batch); the
  eval batch size affects speed only. Splits may be sliced ("train[:90%]"); `manual_dir` holds
  raw files for builders that prepare from them (`prepare`). `in_memory` loads whole splits as
  numpy arrays, with `cache_arrays` kept in the data dir and read from there next time without
  TFDS or TensorFlow (`array_cache`); otherwise they stream through tf.data, where `augment`
  (`augment_tf.make_tf_augment`) may augment training batches. Image inputs stay uint8
  (`meta.pixels`) until the step scales them on the device (`jdl.tasks.classification(pixels=
  meta.pixels)`); a pipeline `augment` scales them first."""
  if augment is not None and in_memory:
    raise ValueError(
        "pipeline augmentation runs in tf.data, so it needs in_memory=False; for in-memory data "
        "augment on the device instead (jdl.augment.make_augment, passed to the train step).")
  plan = ((train_split, batch_size, shuffle, augment), (eval_split, eval_batch_size, False, None))
  shared = dict(seed=seed, process_index=process_index, process_count=process_count)
  sources: list[BatchSource] = []
  sizes = {}
  if in_memory:
    meta, arrays = array_cache.load_splits(name, (train_split, eval_split), data_dir=data_dir,
                                           download=download, manual_dir=manual_dir,
                                           cache=cache_arrays)
  else:
    builder = get_builder(name, data_dir)
    prepare(builder, download=download, manual_dir=manual_dir)
    meta = dataset_meta(builder)
  for split, size, shuffle_split, split_augment in plan:
    if in_memory:
      inputs, labels = arrays[split]
      check_labels(labels, meta.num_classes, where=f"labels of split {split!r}")
      sources.append(ArraySource(inputs, labels, size, shuffle=shuffle_split, **shared))
      sizes[split] = len(labels)
    else:
      shares = tfds.even_splits(split, n=process_count, drop_remainder=False)
      counts = [_split_size(builder, share) for share in shares]
      dataset = read_split(builder, shares[process_index], shuffle_files=shuffle_split, seed=seed)
      sources.append(TFDataSource(dataset, max(counts), size, shuffle=shuffle_split, **shared,
                                  shuffle_buffer=shuffle_buffer, augment=split_augment))
      sizes[split] = sum(counts)
  meta = dataclasses.replace(meta, split_sizes={**meta.split_sizes, **sizes})
  return sources[0], sources[1], meta


def __getattr__(name: str) -> Any:
  """`Mnist1d` and `generate_mnist1d`, imported on first use: their module imports TFDS."""
  if name in ("Mnist1d", "generate_mnist1d"):
    from jdl.data import mnist1d  # pylint: disable=import-outside-toplevel

    return getattr(mnist1d, name)
  raise AttributeError(f"module 'jdl.data' has no attribute {name!r}")


def _split_size(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """The number of examples of a (sliced) split, from the dataset's metadata or by counting."""
  try:
    return int(builder.info.splits[split].num_examples)
  except (KeyError, ValueError, TypeError):
    count = int(read_split(builder, split).cardinality())  # negative: unknown, so counted
    return count if count >= 0 else int(read_split(builder, split).reduce(0, lambda n, _: n + 1))


__all__ = [
    "ArraySource", "Batch", "BatchSource", "DatasetMeta", "DatasetUnavailableError", "Mnist1d",
    "PipelineAugmentFn", "array_cache", "augment_tf", "TFDataSource", "check_inputs",
    "check_labels", "dataset_meta", "epoch_seed", "generate_mnist1d", "get_builder",
    "load_classification_data", "load_raw_split_arrays", "load_split_arrays", "pad_batch",
    "prepare", "read_split", "read_token_file", "scale_inputs",
]
