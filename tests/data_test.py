"""Tests of jdl.data: the offline MNIST-1D builder, offline failures, batch sources, labels."""

import importlib.metadata
import logging
import os
import pickle
import shutil
import time

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import jdl

# ---------------------------------------------------------------------------------------------
# Helpers.


def epoch_batches(source, index):
  """The batches of one epoch, each checked for the fixed batch shape."""
  batches = list(source.epoch(index))
  assert len(batches) == source.steps_per_epoch
  for batch in batches:
    assert set(batch) == {"input", "label", "mask"}
    assert batch["input"].shape[0] == source.batch_size
    assert batch["label"].shape == (source.batch_size,)
    assert batch["mask"].shape == (source.batch_size,)
    assert batch["mask"].dtype == np.bool_
  return batches


def real_examples(batches):
  """The unpadded (inputs, labels) of a list of batches, concatenated in order."""
  inputs = np.concatenate([b["input"][b["mask"]] for b in batches])
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  return inputs, labels


def check_epoch_covers_once(source, index, num_examples):
  """Asserts that epoch `index` of a source over labels arange(n) with inputs [l, 2l] covers every
  example exactly once, pads only the last batch, and keeps inputs paired with labels."""
  batches = epoch_batches(source, index)
  inputs, labels = real_examples(batches)
  np.testing.assert_array_equal(np.sort(labels), np.arange(num_examples))
  np.testing.assert_array_equal(inputs, np.stack([labels, 2 * labels], 1).astype(np.float32))
  for batch in batches[:-1]:
    assert batch["mask"].all()
  last = batches[-1]
  real = num_examples - (len(batches) - 1) * source.batch_size
  np.testing.assert_array_equal(last["mask"], np.arange(source.batch_size) < real)
  assert not last["input"][real:].any() and not last["label"][real:].any()
  return labels


def toy_arrays(num_examples):
  """Labels arange(n) and inputs [label, 2 * label], so pairing and order can be read back."""
  labels = np.arange(num_examples, dtype=np.int32)
  inputs = np.stack([labels, 2 * labels], 1).astype(np.float32)
  return inputs, labels


def fail_on_download(monkeypatch):
  """Makes any real TFDS download raise at once (instead of retrying for minutes offline)."""

  def refuse(*args, **kwargs):
    del args, kwargs
    raise AssertionError("a real download was attempted")

  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", refuse)
  monkeypatch.setattr(tfds.download.DownloadManager, "download", refuse)


# ---------------------------------------------------------------------------------------------
# The MNIST-1D builder.


@pytest.fixture(scope="module")
def mnist1d_builder(mnist1d_data_dir):
  return jdl.data.get_builder("mnist1d", mnist1d_data_dir)


@pytest.fixture(scope="module")
def mnist1d_arrays(mnist1d_builder):
  return {split: jdl.data.load_split_arrays(mnist1d_builder, split) for split in ("train", "test")}


def test_mnist1d_builder_splits_have_published_sizes_shapes_and_labels(mnist1d_builder, mnist1d_arrays):
  """The prepared MNIST-1D has 4000 train / 1000 test float32 (40,) signals with labels in [0, 10)."""
  assert mnist1d_builder.is_prepared()
  splits = mnist1d_builder.info.splits
  assert splits["train"].num_examples == 4000
  assert splits["test"].num_examples == 1000
  for split, count in (("train", 4000), ("test", 1000)):
    inputs, labels = mnist1d_arrays[split]
    assert inputs.shape == (count, 40) and inputs.dtype == np.float32
    assert labels.shape == (count,) and np.issubdtype(labels.dtype, np.integer)
    assert labels.min() >= 0 and labels.max() < 10
    assert set(labels.tolist()) == set(range(10))
    assert np.isfinite(inputs).all()


def test_mnist1d_dataset_meta(mnist1d_builder):
  """dataset_meta reports the MNIST-1D input shape, class count and split sizes."""
  meta = jdl.data.dataset_meta(mnist1d_builder)
  assert meta.name == "mnist1d"
  assert meta.input_shape == (40,)
  assert meta.num_classes == 10
  assert meta.split_sizes == {"train": 4000, "test": 1000}


def load_published(shared_data):
  """The published MNIST-1D file as a dict of arrays."""
  with open(shared_data / "mnist1d_data.pkl", "rb") as f:
    published = pickle.load(f)
  assert published["x"].shape == (4000, 40) and published["x_test"].shape == (1000, 40)
  assert published["y"].shape == (4000,) and published["y_test"].shape == (1000,)
  return published


def sorted_rows(inputs, labels):
  """Inputs and labels reordered by the input rows, so that two orders of one set compare equal."""
  order = np.lexsort(inputs.T[::-1])
  return inputs[order], labels[order]


def test_mnist1d_builder_holds_published_examples(shared_data, mnist1d_arrays):
  """Each builder split holds exactly the published file's (signal, label) pairs."""
  published = load_published(shared_data)
  worst = 0.0
  for split, x_key, y_key in (("train", "x", "y"), ("test", "x_test", "y_test")):
    inputs, labels = sorted_rows(*mnist1d_arrays[split])
    expected_inputs, expected_labels = sorted_rows(np.asarray(published[x_key]),
                                                   np.asarray(published[y_key]))
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_allclose(inputs, expected_inputs, rtol=0, atol=1e-6)
    worst = max(worst, float(np.abs(inputs - expected_inputs).max()))
  print(f"\nMNIST-1D builder vs published file: max abs difference {worst:.3e}")


def test_mnist1d_builder_keeps_published_order(shared_data, mnist1d_arrays):
  """The builder's splits, read in TFDS order, equal the published file row for row."""
  published = load_published(shared_data)
  worst = 0.0
  for split, x_key, y_key in (("train", "x", "y"), ("test", "x_test", "y_test")):
    inputs, labels = mnist1d_arrays[split]
    np.testing.assert_array_equal(labels, np.asarray(published[y_key]))
    np.testing.assert_allclose(inputs, np.asarray(published[x_key]), rtol=0, atol=1e-6)
    worst = max(worst, float(np.abs(inputs - np.asarray(published[x_key])).max()))
  print(f"\nMNIST-1D builder vs published file, in order: max abs difference {worst:.3e}")


def test_generate_mnist1d_keeps_global_numpy_random_state():
  """generate_mnist1d leaves NumPy's global random stream where it was."""
  np.random.seed(1234)
  expected = np.random.rand(10)
  np.random.seed(1234)
  before = np.random.rand(5)
  data = jdl.data.generate_mnist1d()
  after = np.random.rand(5)
  np.testing.assert_array_equal(np.concatenate([before, after]), expected)
  assert data["x"].shape == (4000, 40) and data["x_test"].shape == (1000, 40)


# ---------------------------------------------------------------------------------------------
# Datasets that need a download, offline.


def test_prepare_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
  """Preparing an undownloaded dataset offline raises DatasetUnavailableError within seconds."""
  fail_on_download(monkeypatch)
  builder = jdl.data.get_builder("fashion_mnist", str(tmp_path))
  start = time.perf_counter()
  with pytest.raises(jdl.data.DatasetUnavailableError) as error:
    jdl.data.prepare(builder)
  assert time.perf_counter() - start < 15
  assert "tfds build fashion_mnist" in str(error.value)


def test_prepare_without_download_fails_at_once(tmp_path, monkeypatch):
  """With download=False a missing dataset raises at once, saying downloading is off."""
  fail_on_download(monkeypatch)
  builder = jdl.data.get_builder("fashion_mnist", str(tmp_path))
  start = time.perf_counter()
  with pytest.raises(jdl.data.DatasetUnavailableError, match="(?i)download") as error:
    jdl.data.prepare(builder, download=False)
  assert time.perf_counter() - start < 1
  assert "download=False" in str(error.value)
  assert "tfds build fashion_mnist" in str(error.value)


def test_unknown_dataset_name_raises(tmp_path):
  """An unknown dataset name raises DatasetUnavailableError naming it."""
  with pytest.raises(jdl.data.DatasetUnavailableError, match="no_such_dataset_xyz"):
    jdl.data.get_builder("no_such_dataset_xyz", str(tmp_path))
  with pytest.raises(jdl.data.DatasetUnavailableError, match="no_such_dataset_xyz"):
    jdl.data.load_classification_data("no_such_dataset_xyz", batch_size=4, eval_batch_size=4,
                                      data_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# ArraySource.


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("num_examples,batch_size", [(23, 5), (20, 5), (7, 1), (7, 7), (3, 8)])
def test_array_source_epoch_covers_each_example_once(num_examples, batch_size, shuffle):
  """Every epoch covers each example once; only the last batch is padded, with mask False."""
  source = jdl.data.ArraySource(*toy_arrays(num_examples), batch_size, shuffle=shuffle, seed=3)
  assert source.num_examples == num_examples
  assert source.steps_per_epoch == -(-num_examples // batch_size)
  for index in range(3):
    check_epoch_covers_once(source, index, num_examples)


def test_array_source_unshuffled_is_in_order():
  """An unshuffled source yields the examples in their original order every epoch."""
  source = jdl.data.ArraySource(*toy_arrays(23), 5, shuffle=False)
  for index in range(2):
    _, labels = real_examples(epoch_batches(source, index))
    np.testing.assert_array_equal(labels, np.arange(23))


def test_array_source_shuffle_is_a_function_of_seed_and_epoch():
  """Shuffled epochs differ from each other but repeat exactly for the same (seed, epoch)."""
  inputs, labels = toy_arrays(50)
  source = jdl.data.ArraySource(inputs, labels, 8, shuffle=True, seed=7)
  twin = jdl.data.ArraySource(inputs, labels, 8, shuffle=True, seed=7)
  other_seed = jdl.data.ArraySource(inputs, labels, 8, shuffle=True, seed=8)
  orders = [real_examples(epoch_batches(source, e))[1] for e in range(3)]
  assert not np.array_equal(orders[0], orders[1])
  assert not np.array_equal(orders[1], orders[2])
  assert not np.array_equal(orders[0], np.arange(50))
  for e in (2, 0):  # out of order: an epoch does not depend on the epochs read before it
    np.testing.assert_array_equal(real_examples(epoch_batches(twin, e))[1], orders[e])
    np.testing.assert_array_equal(real_examples(epoch_batches(source, e))[1], orders[e])
  assert not np.array_equal(real_examples(epoch_batches(other_seed, 0))[1], orders[0])


@pytest.mark.parametrize("n", [1, 2, 5, 1023, 1024, 1025, 4000, 4097, 5000])
def test_index_permutation_is_a_permutation_on_either_side_of_the_sort_free_threshold(n):
  """Small n (a sort) and large n (a Feistel network with cycle walking) both give each index
  exactly once, as int32, the same for the same key and different for another key."""
  key = jax.random.PRNGKey(11)
  order = np.asarray(jdl.data.sources.index_permutation(key, n))
  assert order.dtype == np.int32
  np.testing.assert_array_equal(np.sort(order), np.arange(n))
  np.testing.assert_array_equal(order, jdl.data.sources.index_permutation(key, n))
  if n > 2:
    assert not np.array_equal(order, jdl.data.sources.index_permutation(jax.random.PRNGKey(12), n))


def test_sort_free_permutation_is_uniform_within_sampling_error():
  """Over 2,000 keys, where each of 1,100 indices lands is uniform (chi-square), and the first
  index comes before the second half of the time: no position or pair is favoured."""
  n, trials = 1100, 2000
  assert n >= jdl.data.sources.SORT_FREE_MIN_EXAMPLES
  keys = jax.random.split(jax.random.PRNGKey(0), trials)
  orders = np.asarray(jax.jit(jax.vmap(
      lambda key: jdl.data.sources.index_permutation(key, n)))(keys))
  counts = np.zeros((n, n))
  np.add.at(counts, (np.tile(np.arange(n), trials), orders.ravel()), 1)
  expected = trials / n
  chi_square = ((counts - expected) ** 2 / expected).sum()
  degrees = n * n - 1
  assert abs(chi_square - degrees) < 5 * np.sqrt(2 * degrees)  # about 5 standard deviations
  first_before_second = (orders[:, 0] < orders[:, 1]).mean()
  assert abs(first_before_second - 0.5) < 4 * np.sqrt(0.25 / trials)


def test_array_source_sgd_and_full_batch():
  """batch_size=1 gives n unpadded single-example steps; batch_size=n gives one full batch."""
  inputs, labels = toy_arrays(9)
  sgd = jdl.data.ArraySource(inputs, labels, 1, shuffle=True, seed=0)
  batches = epoch_batches(sgd, 0)
  assert len(batches) == 9 and all(b["mask"].all() for b in batches)
  np.testing.assert_array_equal(np.sort(real_examples(batches)[1]), np.arange(9))
  full = jdl.data.ArraySource(inputs, labels, 9, shuffle=True, seed=0)
  (batch,) = epoch_batches(full, 0)
  assert batch["mask"].all()
  np.testing.assert_array_equal(np.sort(batch["label"]), np.arange(9))
  np.testing.assert_array_equal(batch["input"], np.stack([batch["label"], 2 * batch["label"]], 1))


@pytest.mark.parametrize("inputs,labels,batch_size,message", [
    (np.array(["a", "b", "c"]), np.arange(3), 2, "numeric"),
    (np.zeros((0, 4), np.float32), np.zeros((0,), np.int32), 2, "empty"),
    (np.zeros((4, 2), np.float32), np.arange(4), 0, "batch_size"),
    (np.zeros((4, 2), np.float32), np.arange(4), -1, "batch_size"),
    (np.zeros((4, 2), np.float32), np.arange(3), 2, "labels"),
])
def test_array_source_rejects_bad_input(inputs, labels, batch_size, message):
  """Non-numeric or empty inputs, a batch size < 1 and a label count mismatch raise ValueError."""
  with pytest.raises(ValueError, match=message):
    jdl.data.ArraySource(inputs, labels, batch_size, shuffle=True)


def test_array_source_label_count_mismatch_names_both_counts():
  """The label-count error says how many examples the inputs have."""
  with pytest.raises(ValueError, match="4 examples") as error:
    jdl.data.ArraySource(np.zeros((4, 2), np.float32), np.arange(3), 2, shuffle=False)
  assert "3" in str(error.value)


# ---------------------------------------------------------------------------------------------
# TFDataSource.


def tf_source(num_examples, batch_size, *, shuffle, seed=0, shuffle_buffer=10_000):
  dataset = tf.data.Dataset.from_tensor_slices(toy_arrays(num_examples))
  return jdl.data.TFDataSource(dataset, num_examples, batch_size, shuffle=shuffle, seed=seed,
                               shuffle_buffer=shuffle_buffer)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("num_examples,batch_size", [(23, 5), (20, 5), (3, 8)])
def test_tf_data_source_epoch_covers_each_example_once(num_examples, batch_size, shuffle):
  """Every streamed epoch covers each example once; only the last batch is padded, mask False."""
  source = tf_source(num_examples, batch_size, shuffle=shuffle)
  assert source.steps_per_epoch == -(-num_examples // batch_size)
  for index in range(2):
    labels = check_epoch_covers_once(source, index, num_examples)
    if not shuffle:
      np.testing.assert_array_equal(labels, np.arange(num_examples))


def test_tf_data_source_shuffle_is_a_function_of_seed_and_epoch():
  """Streamed shuffles repeat for the same (seed, epoch) and differ between epochs and seeds."""
  source = tf_source(50, 8, shuffle=True, seed=5)
  twin = tf_source(50, 8, shuffle=True, seed=5)
  orders = [real_examples(epoch_batches(source, e))[1] for e in range(2)]
  assert not np.array_equal(orders[0], orders[1])
  assert not np.array_equal(orders[0], np.arange(50))
  for e in (1, 0):
    np.testing.assert_array_equal(real_examples(epoch_batches(twin, e))[1], orders[e])
    np.testing.assert_array_equal(real_examples(epoch_batches(source, e))[1], orders[e])
  other_seed = tf_source(50, 8, shuffle=True, seed=6)
  assert not np.array_equal(real_examples(epoch_batches(other_seed, 0))[1], orders[0])


def test_tf_data_source_rejects_bad_sizes():
  """A batch size < 1 or an empty split raises ValueError naming the problem."""
  dataset = tf.data.Dataset.from_tensor_slices(toy_arrays(4))
  with pytest.raises(ValueError, match="batch_size"):
    jdl.data.TFDataSource(dataset, 4, 0, shuffle=False)
  with pytest.raises(ValueError, match="empty"):
    jdl.data.TFDataSource(dataset, 0, 2, shuffle=False)


# ---------------------------------------------------------------------------------------------
# Labels.


@pytest.mark.parametrize("bad", [10, -1, 11])
def test_check_labels_out_of_range_names_value_and_range(bad):
  """An out-of-range label raises ValueError naming the bad value and the valid range."""
  with pytest.raises(ValueError) as error:
    jdl.data.check_labels(np.array([0, 3, bad, 9]), 10, where="my labels")
  message = str(error.value)
  assert str(bad) in message
  assert "[0, 9]" in message
  assert "my labels" in message


def test_check_labels_accepts_class_indices_and_finite_targets():
  """Integer labels are class indices and must be in range; float labels are regression targets
  and must be finite; anything else is refused."""
  jdl.data.check_labels(np.arange(10), 10)
  jdl.data.check_labels(np.zeros((0,), np.int64), 10)
  jdl.data.check_labels({"y": np.array([0.5, -2.0]), "z": np.arange(3)}, 10)
  with pytest.raises(ValueError, match=r"out of range: found \[10\]"):
    jdl.data.check_labels(np.arange(11), 10)
  with pytest.raises(ValueError, match="NaN or infinite"):
    jdl.data.check_labels(np.array([0.0, np.nan]), 10)
  with pytest.raises(ValueError, match="integer class indices or real-valued targets"):
    jdl.data.check_labels(np.array(["a", "b"]), 10)


# ---------------------------------------------------------------------------------------------
# load_classification_data.


@pytest.fixture(scope="module")
def mnist1d_both_paths(mnist1d_data_dir):
  return {
      in_memory: jdl.data.load_classification_data(
          "mnist1d", batch_size=100, eval_batch_size=300, data_dir=mnist1d_data_dir,
          in_memory=in_memory, seed=0)
      for in_memory in (True, False)
  }


def test_in_memory_and_streaming_agree_on_mnist1d(mnist1d_both_paths, mnist1d_arrays):
  """In-memory and streamed MNIST-1D give the same eval examples in order and the same steps."""
  (train_a, eval_a, meta_a), (train_b, eval_b, meta_b) = (
      mnist1d_both_paths[True], mnist1d_both_paths[False])
  assert train_a.steps_per_epoch == train_b.steps_per_epoch == 40
  assert eval_a.steps_per_epoch == eval_b.steps_per_epoch == 4
  assert train_a.num_examples == train_b.num_examples == 4000
  assert eval_a.num_examples == eval_b.num_examples == 1000
  assert meta_a == meta_b
  assert meta_a.input_shape == (40,) and meta_a.num_classes == 10
  first_a, first_b = next(eval_a.epoch(0)), next(eval_b.epoch(0))
  for key in ("input", "label", "mask"):
    np.testing.assert_array_equal(first_a[key], first_b[key])
  inputs_a, labels_a = real_examples(epoch_batches(eval_a, 0))
  inputs_b, labels_b = real_examples(epoch_batches(eval_b, 0))
  np.testing.assert_array_equal(inputs_a, inputs_b)
  np.testing.assert_array_equal(labels_a, labels_b)
  np.testing.assert_array_equal(labels_a, mnist1d_arrays["test"][1])


def test_streamed_mnist1d_train_epoch_covers_the_split(mnist1d_both_paths, mnist1d_arrays):
  """A streamed, shuffled train epoch holds exactly the train split's examples, each once."""
  train_b = mnist1d_both_paths[False][0]
  inputs, labels = real_examples(epoch_batches(train_b, 0))
  assert inputs.dtype == np.float32 and inputs.shape == (4000, 40)
  expected_inputs, expected_labels = mnist1d_arrays["train"]
  order = np.lexsort(inputs.T[::-1])
  expected_order = np.lexsort(expected_inputs.T[::-1])
  np.testing.assert_array_equal(inputs[order], expected_inputs[expected_order])
  np.testing.assert_array_equal(labels[order], expected_labels[expected_order])
  assert not np.array_equal(labels, expected_labels)  # shuffled


@pytest.mark.parametrize("in_memory", [True, False])
def test_mock_fashion_mnist_loads_offline_as_uint8_pixels(tmp_path, monkeypatch, in_memory):
  """Under tfds mock_data, fashion_mnist loads with no network as 28x28x1 images whose batches
  stay uint8 on the host, and its metadata says they are pixels for the model's float32 inputs
  (the step scales them on the device)."""
  fail_on_download(monkeypatch)
  with tfds.testing.mock_data(num_examples=24):
    train, evaluation, meta = jdl.data.load_classification_data(
        "fashion_mnist", batch_size=8, eval_batch_size=16, data_dir=str(tmp_path),
        in_memory=in_memory)
    assert meta.input_shape == (28, 28, 1) and meta.num_classes == 10
    assert meta.pixels and meta.input_dtype == "float32"
    assert train.num_examples == 24 and train.steps_per_epoch == 3
    for source in (train, evaluation):
      batches = epoch_batches(source, 0)
      assert all(batch["input"].dtype == np.uint8 for batch in batches)
      inputs, labels = real_examples(batches)
      assert inputs.shape == (source.num_examples, 28, 28, 1)
      assert inputs.max() > 1  # pixels as stored, not scaled
      assert labels.min() >= 0 and labels.max() < 10


def test_tf_data_source_augments_each_epoch_reproducibly_and_pads_mixup_keys():
  """A pipeline augmentation is keyed by (seed, epoch, batch): an epoch replays exactly, epochs
  differ, and mixup's extra keys are padded with the batch, so every batch has one structure."""
  augment = jdl.data.augment_tf.make_tf_augment({"brightness": 0.2, "mixup_alpha": 0.5})
  inputs = np.full((10, 3), 0.5, np.float32)
  dataset = tf.data.Dataset.from_tensor_slices((inputs, np.arange(10, dtype=np.int32)))
  source = jdl.data.TFDataSource(dataset, 10, 4, shuffle=False, augment=augment)
  epochs = [list(source.epoch(e)) for e in (0, 1, 0)]
  for batches in epochs:
    assert [set(b) for b in batches] == [{"input", "label", "mask", "mix_label", "mix_weight"}] * 3
    assert all(b["input"].shape == (4, 3) for b in batches)
  last = epochs[0][-1]
  np.testing.assert_array_equal(last["mask"], [True, True, False, False])
  np.testing.assert_array_equal(last["mix_weight"][2:], [0.0, 0.0])
  for a, b in zip(epochs[0], epochs[2]):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(epochs[0][0]["input"], epochs[1][0]["input"])
  assert not np.array_equal(epochs[0][0]["input"], inputs[:4])


def test_pipeline_augmentation_needs_the_streaming_path(tmp_path):
  """Asking for tf.data augmentation of in-memory data is an error that says what to do."""
  augment = jdl.data.augment_tf.make_tf_augment({"flip": True})
  with pytest.raises(ValueError, match="in_memory=False"):
    jdl.data.load_classification_data("mnist1d", batch_size=4, eval_batch_size=4,
                                      data_dir=str(tmp_path), augment=augment)


# ---------------------------------------------------------------------------------------------
# The array cache of in-memory splits.


@pytest.fixture
def private_mnist1d_dir(mnist1d_data_dir, tmp_path):
  """A copy of the prepared MNIST-1D data dir with no array cache in it, private to the test."""
  path = tmp_path / "tfds"
  shutil.copytree(mnist1d_data_dir, path,
                  ignore=shutil.ignore_patterns(jdl.data.array_cache.CACHE_DIR))
  return str(path)


def refuse_tfds_reads(monkeypatch):
  """Makes any read through TFDS fail, so that only the cache can serve a load."""

  def refuse(*args, **kwargs):
    del args, kwargs
    raise AssertionError("read through TFDS although the cache holds the split")

  monkeypatch.setattr(jdl.data.loading, "get_builder", refuse)


def cache_files(data_dir):
  folder = os.path.join(data_dir, jdl.data.array_cache.CACHE_DIR)
  return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def assert_bitwise_equal(a, b):
  assert a.dtype == b.dtype and a.shape == b.shape
  assert a.tobytes() == b.tobytes()


def test_array_cache_gives_bitwise_what_tfds_gave(private_mnist1d_dir, mnist1d_builder,
                                                  monkeypatch):
  """The first load reads through TFDS and writes one file per split; the second reads only the
  cache and gives the same bits and the same metadata as reading through TFDS."""
  cache = jdl.data.array_cache
  meta, arrays = cache.load_splits("mnist1d", ("train", "test"), data_dir=private_mnist1d_dir)
  assert [name.split("-")[:2] for name in cache_files(private_mnist1d_dir)] == [
      ["mnist1d", "test"], ["mnist1d", "train"]]
  refuse_tfds_reads(monkeypatch)
  cached_meta, cached = cache.load_splits("mnist1d", ("train", "test"),
                                          data_dir=private_mnist1d_dir)
  assert cached_meta == meta == jdl.data.dataset_meta(mnist1d_builder)
  assert isinstance(cached_meta.input_shape, tuple) and isinstance(cached_meta.class_names, tuple)
  for split in ("train", "test"):
    expected = jdl.data.load_split_arrays(mnist1d_builder, split)
    for got, fresh, want in zip(cached[split], arrays[split], expected):
      assert_bitwise_equal(got, want)
      assert_bitwise_equal(fresh, want)
  train, evaluation, loaded_meta = jdl.data.load_classification_data(
      "mnist1d", batch_size=100, eval_batch_size=300, data_dir=private_mnist1d_dir)
  assert loaded_meta == meta and train.num_examples == 4000 and evaluation.num_examples == 1000


def test_array_cache_misses_for_another_split_version_data_dir_or_preparation(
    private_mnist1d_dir, tmp_path, monkeypatch):
  """A cached split serves only the request it was written for: another split string, version,
  data dir, tensorflow-datasets or builder version, or a re-prepared dataset is a miss."""
  cache = jdl.data.array_cache
  cache.load_splits("mnist1d", ("train",), data_dir=private_mnist1d_dir)
  assert cache.read_cached_split("mnist1d", "train", private_mnist1d_dir) is not None
  assert cache.read_cached_split("mnist1d", "train[:10]", private_mnist1d_dir) is None
  assert cache.read_cached_split("mnist1d", "test", private_mnist1d_dir) is None
  assert cache.read_cached_split("mnist1d:1.1.0", "train", private_mnist1d_dir) is None
  assert cache.read_cached_split("mnist1d", "train", str(tmp_path / "elsewhere")) is None
  with monkeypatch.context() as patch:
    patch.setitem(cache.JDL_BUILDER_VERSIONS, "mnist1d", "9.9.9")
    assert cache.read_cached_split("mnist1d", "train", private_mnist1d_dir) is None
  with monkeypatch.context() as patch:
    patch.setattr(importlib.metadata, "version", lambda name: "0.0.0")
    assert cache.read_cached_split("mnist1d", "train", private_mnist1d_dir) is None
  # A sliced split is a split of its own, with the slice's examples.
  _, arrays = cache.load_splits("mnist1d", ("train[:10]",), data_dir=private_mnist1d_dir)
  assert len(arrays["train[:10]"][1]) == 10
  assert len(cache.read_cached_split("mnist1d", "train[:10]", private_mnist1d_dir).labels) == 10
  # Re-preparing the dataset rewrites its dataset_info.json: the cached arrays may be stale.
  info = os.path.join(private_mnist1d_dir, "mnist1d", "1.1.0", "dataset_info.json")
  stat = os.stat(info)
  os.utime(info, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
  assert cache.read_cached_split("mnist1d", "train", private_mnist1d_dir) is None


def test_array_cache_explicit_version_is_cached_under_its_own_key(private_mnist1d_dir,
                                                                   monkeypatch):
  """"mnist1d:1.1.0" is written and read under its own key, with the same arrays."""
  cache = jdl.data.array_cache
  _, plain = cache.load_splits("mnist1d", ("test",), data_dir=private_mnist1d_dir)
  cache.load_splits("mnist1d:1.1.0", ("test",), data_dir=private_mnist1d_dir)
  assert len(cache_files(private_mnist1d_dir)) == 2
  refuse_tfds_reads(monkeypatch)
  _, versioned = cache.load_splits("mnist1d:1.1.0", ("test",), data_dir=private_mnist1d_dir)
  for got, want in zip(versioned["test"], plain["test"]):
    assert_bitwise_equal(got, want)


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "garbage", "empty"])
def test_damaged_array_cache_is_ignored_and_rewritten(private_mnist1d_dir, mnist1d_builder,
                                                      damage, caplog):
  """A truncated, corrupted or foreign cache file is not fatal: the split is read through TFDS,
  correctly, with a warning, and the file is written again."""
  cache = jdl.data.array_cache
  cache.load_splits("mnist1d", ("test",), data_dir=private_mnist1d_dir)
  (name,) = cache_files(private_mnist1d_dir)
  path = os.path.join(private_mnist1d_dir, cache.CACHE_DIR, name)
  with open(path, "rb") as f:
    content = f.read()
  damaged = {
      "truncate": content[:len(content) // 2],
      # Inside the stored arrays: only the zip member's checksum can tell.
      "flip_bytes": content[:len(content) // 3] + bytes(b ^ 0xFF for b in content[
          len(content) // 3:len(content) // 3 + 64]) + content[len(content) // 3 + 64:],
      "garbage": b"not a numpy file at all",
      "empty": b"",
  }[damage]
  with open(path, "wb") as f:
    f.write(damaged)
  with caplog.at_level(logging.WARNING, logger=cache.__name__):
    _, arrays = cache.load_splits("mnist1d", ("test",), data_dir=private_mnist1d_dir)
  assert any("unreadable array cache" in record.getMessage() for record in caplog.records)
  for got, want in zip(arrays["test"], jdl.data.load_split_arrays(mnist1d_builder, "test")):
    assert_bitwise_equal(got, want)
  assert cache.read_cached_split("mnist1d", "test", private_mnist1d_dir) is not None
  assert cache_files(private_mnist1d_dir) == [name]  # no temporary file left behind


def test_array_cache_write_failure_is_not_fatal(private_mnist1d_dir, monkeypatch, caplog):
  """A data dir the cache cannot write to (read-only, full) still loads, with a warning."""
  cache = jdl.data.array_cache

  def refuse(*args, **kwargs):
    del args, kwargs
    raise PermissionError("read-only file system")

  monkeypatch.setattr(cache.os, "replace", refuse)
  with caplog.at_level(logging.WARNING, logger=cache.__name__):
    _, arrays = cache.load_splits("mnist1d", ("test",), data_dir=private_mnist1d_dir)
  assert len(arrays["test"][1]) == 1000
  assert any("could not write" in record.getMessage() for record in caplog.records)
  assert cache_files(private_mnist1d_dir) == []


def test_mock_data_bypasses_the_array_cache(private_mnist1d_dir, monkeypatch):
  """Inside tfds.testing.mock_data the cache is neither read (real arrays would replace the mock
  examples) nor written (mock examples would reach later real runs)."""
  cache = jdl.data.array_cache
  cache.load_splits("mnist1d", ("train", "test"), data_dir=private_mnist1d_dir)
  before = cache_files(private_mnist1d_dir)

  def refuse(*args, **kwargs):
    del args, kwargs
    raise AssertionError("the array cache was used under mock_data")

  monkeypatch.setattr(cache, "read_cached_split", refuse)
  monkeypatch.setattr(cache, "write_cached_split", refuse)
  fail_on_download(monkeypatch)
  with tfds.testing.mock_data(num_examples=24):
    train, _, _ = jdl.data.load_classification_data(
        "mnist1d", batch_size=8, eval_batch_size=8, data_dir=private_mnist1d_dir)
  assert train.num_examples == 24
  assert cache_files(private_mnist1d_dir) == before


def test_jdl_builder_versions_match_the_builders():
  """The versions the cache resolves jdl's own builders to are their VERSION."""
  assert jdl.data.array_cache.JDL_BUILDER_VERSIONS == {"mnist1d": str(jdl.data.Mnist1d.VERSION)}


def test_device_scaling_gives_the_bits_of_numpy_and_tf_data_scaling():
  """uint8 pixels scaled on the device (`jdl.tasks.unit_pixels`, alone and inside a compiled
  program) equal numpy's IEEE division x / 255 bit for bit for every value, and so do the host's
  `scale_inputs` on numpy arrays and inside tf.data (pipeline augmentation); float inputs give
  numpy's bits through `scale_inputs` on either path."""
  pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
  expected = pixels / np.float32(255.0)
  assert expected.dtype == np.float32
  signals = np.random.default_rng(0).normal(size=(16, 16))
  for inputs in (pixels, signals):
    in_tf = next(tf.data.Dataset.from_tensors(inputs).map(jdl.data.scale_inputs)
                 .as_numpy_iterator())
    assert_bitwise_equal(jdl.data.scale_inputs(inputs), in_tf)
  assert_bitwise_equal(jdl.data.scale_inputs(pixels), expected)
  assert_bitwise_equal(np.asarray(jdl.tasks.unit_pixels(pixels)), expected)
  assert_bitwise_equal(np.asarray(jax.jit(jdl.tasks.unit_pixels)(pixels)), expected)
  in_a_step = jax.jit(lambda x: jdl.tasks.unit_pixels(x) * 2.0)  # fused with what follows
  assert_bitwise_equal(np.asarray(in_a_step(pixels)), expected * np.float32(2.0))
