"""Batch sources: a split, cut into fixed-shape numpy batches one epoch at a time.

A source yields dict batches `{"input", "label", "mask"}` whose shapes never change: a last
partial batch is padded with zeros, its padding marked False in `mask`, which the step masks out
of the loss, the gradient and the metrics; so every epoch covers each example exactly once and the
jitted step compiles once. Epoch `e` of a shuffled source is a pure function of `(seed, e)`, so a
resumed run sees exactly the data an uninterrupted run would.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jdl.lazy_import import tensorflow as tf

Batch = dict[str, np.ndarray]
PipelineAugmentFn = Callable[[dict[str, "tf.Tensor"], "tf.Tensor"], dict[str, "tf.Tensor"]]
"""A tf.data augmentation `(batch, seed) -> batch` (see `jdl.data.augment_tf.make_tf_augment`)."""


class BatchSource(Protocol):
  """What the training loop reads: fixed-size, padded, masked batches, an epoch at a time."""

  @property
  def num_examples(self) -> int: ...

  @property
  def batch_size(self) -> int: ...

  @property
  def steps_per_epoch(self) -> int: ...

  def epoch(self, index: int) -> Iterator[Batch]:
    """The batches of epoch `index` (0-based), each example once."""


def pad_batch(inputs: Any, labels: Any, batch_size: int,
              extras: Mapping[str, Any] | None = None) -> Batch:
  """A batch dict padded with zero examples to `batch_size`, with `mask` marking the real ones;
  `extras` are further per-example arrays (e.g. mixup's `mix_label`), padded the same way."""
  count = num_rows(inputs)
  if count > batch_size:
    raise ValueError(f"batch of {count} examples is larger than batch_size={batch_size}.")
  mask = np.arange(batch_size) < count
  batch = {"input": inputs, "label": labels, **(extras or {})}
  if count < batch_size:
    batch = jax.tree.map(lambda value: np.concatenate(
        [value, np.zeros((batch_size - count, *value.shape[1:]), value.dtype)]), batch)
  return {**batch, "mask": mask}


def num_rows(tree: Any) -> int:
  """The leading (example) dimension shared by every array of `tree`; a ValueError if none."""
  sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else None for leaf in jax.tree.leaves(tree)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError("every array of a batch needs the same leading example dimension; got "
                     f"shapes {[np.shape(leaf) for leaf in jax.tree.leaves(tree)]}.")
  return sizes.pop()


def epoch_seed(seed: int, epoch: int, stream: int | None = None) -> int:
  """A 63-bit seed for one epoch, derived from the run's seed and the epoch index: the shuffle's
  (`stream=None`), or an independent one for another use (augmentation takes `stream >= 1`)."""
  entropy = [seed, epoch] if stream is None else [seed, epoch, stream]
  return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> np.uint64(1))


@functools.partial(jax.jit, static_argnames=("num_examples", "shuffle"))
def epoch_order(seed: jax.Array, epoch: jax.Array, *, num_examples: int,
                shuffle: bool) -> jax.Array:
  """The example order of one epoch: an `index_permutation` drawn from `(seed, epoch)`, or
  0..n-1; shared by `ArraySource` and `jdl.resident`, so both see the same batches."""
  if not shuffle:
    return jnp.arange(num_examples, dtype=jnp.int32)
  if num_examples < SORT_FREE_MIN_EXAMPLES:
    key = jax.random.fold_in(jax.random.PRNGKey(seed), epoch)
  else:  # the Feistel network hashes its key words itself: no threefry to compile
    key = jnp.stack([jnp.asarray(seed, jnp.uint32), jnp.asarray(epoch, jnp.uint32)])
  return index_permutation(key, num_examples)


SHUFFLE_ROUNDS = 6
SORT_FREE_MIN_EXAMPLES = 1024


def index_permutation(key: jax.Array, n: int, *, rounds: int = SHUFFLE_ROUNDS) -> jax.Array:
  """A pseudo-random permutation of `0 .. n-1` (int32) drawn from `key` (a PRNG key, or any
  uint32 words such as `[seed, epoch]`).

  From `SORT_FREE_MIN_EXAMPLES` on it sorts nothing: a balanced Feistel network on the smallest
  even number of bits that holds n - 1, with `rounds` rounds of a keyed 32-bit hash (Luby and
  Rackoff: four suffice), is a bijection of `[0, 4**half)`; values at n or above are encrypted
  again until they fall below n ("cycle walking": the domain is under 4n). Positions and pairwise
  orders come out uniform within sampling error (tests/data_test.py). On fewer bits they do not,
  so small n use `jax.random.permutation`, whose sorts are cheap there."""
  if n < 1:
    raise ValueError(f"a permutation needs n >= 1; got {n}.")
  if n < SORT_FREE_MIN_EXAMPLES:
    return jax.random.permutation(key, n).astype(jnp.int32)
  half = (max(n - 1, 1).bit_length() + 1) // 2
  mask = jnp.uint32((1 << half) - 1)
  round_keys = _round_keys(key, rounds)

  def encrypt(x: jax.Array) -> jax.Array:
    left, right = x >> half, x & mask
    for r in range(rounds):
      left, right = right, left ^ (_mix32(right ^ round_keys[r]) & mask)
    return (left << half) | right

  def walk(carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    values, started = carry  # the first pass encrypts every value, later ones those >= n
    return jnp.where(~started | (values >= n), encrypt(values), values), jnp.bool_(True)

  values, _ = jax.lax.while_loop(lambda carry: ~carry[1] | jnp.any(carry[0] >= n), walk,
                                 (jnp.arange(n, dtype=jnp.uint32), jnp.bool_(False)))
  return values.astype(jnp.int32)


def _round_keys(key: jax.Array, rounds: int) -> jax.Array:
  """`rounds` 32-bit round keys hashed from the words of `key`: cheaper to compile than threefry,
  and Feistel rounds need independent-looking keys only."""
  words = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  words = jnp.asarray(words, jnp.uint32).reshape(-1)
  state = jnp.uint32(0x243F6A88)  # pi's first fraction bits: any odd constant would do
  for index in range(words.shape[0]):
    state = _mix32(state ^ words[index])
  counter = jnp.arange(1, rounds + 1, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9)
  return _mix32(_mix32(state + counter) ^ state)


def _mix32(x: jax.Array) -> jax.Array:
  """A 32-bit integer hash in which every input bit flips about half the output bits (the
  "lowbias32" xor-shift-multiply constants found by C. Wellons' hash prospector)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def check_labels(labels: Any, num_classes: int | None, *, where: str = "labels") -> None:
  """Raises a clear error unless every integer array of `labels` holds class indices in
  `[0, num_classes)` (unchecked when None) and every floating one (real targets) is finite."""
  for leaf in jax.tree.leaves(labels):
    leaf = np.asarray(leaf)
    if np.issubdtype(leaf.dtype, np.floating):
      if not np.all(np.isfinite(leaf)):
        raise ValueError(f"{where} hold NaN or infinite values; targets must be finite.")
    elif not np.issubdtype(leaf.dtype, np.integer):
      raise ValueError(f"{where} must be integer class indices or real-valued targets; got "
                       f"dtype {leaf.dtype}.")
    elif num_classes is not None and leaf.size and (leaf.min() < 0 or leaf.max() >= num_classes):
      bad = leaf[(leaf < 0) | (leaf >= num_classes)]
      raise ValueError(
          f"{where} out of range: found {sorted(set(bad.tolist()))[:5]} but the model has "
          f"{num_classes} classes, so labels must lie in [0, {num_classes - 1}].")


def check_inputs(inputs: Any, *, where: str = "inputs") -> None:
  """Raises a clear error unless every array of `inputs` is a non-empty numeric array."""
  for leaf in jax.tree.leaves(inputs):
    leaf = np.asarray(leaf)
    if not (np.issubdtype(leaf.dtype, np.number) or leaf.dtype == np.bool_):
      raise ValueError(f"{where} must be numeric; got dtype {leaf.dtype}.")
    if leaf.ndim < 1 or leaf.shape[0] == 0:
      raise ValueError(f"{where} are empty (shape {leaf.shape}); need at least one example.")


class ProcessShare:
  """A source whose global batches of `batch_size` examples are split evenly over the
  `process_count` processes of a run: process `process_index` yields `local_batch_size` of each."""

  def __init__(self, batch_size: int, process_index: int, process_count: int) -> None:
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    if batch_size % process_count:
      raise ValueError(
          f"the global batch of {batch_size} examples cannot be split evenly over "
          f"{process_count} processes; use a batch size that is a multiple of {process_count}.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
    self.batch_size = int(batch_size)  # global: all processes together
    self.local_batch_size = self.batch_size // process_count
    self.process_index, self.process_count = process_index, process_count


class ArraySource(ProcessShare):
  """Batches of in-memory arrays (or pytrees of them, with one leading example axis); shuffled
  epochs are seeded permutations (`epoch_order`). Every process holds the same arrays and seed,
  and process `p` of `P` yields rows `[p * B / P, (p + 1) * B / P)` of each global batch (padding
  included), so the shares put together are exactly the single-process batch."""

  def __init__(self, inputs: Any, labels: Any, batch_size: int, *, shuffle: bool,
               seed: int = 0, process_index: int = 0, process_count: int = 1) -> None:
    inputs, labels = jax.tree.map(np.asarray, inputs), jax.tree.map(np.asarray, labels)
    check_inputs(inputs)
    num_inputs, num_labels = num_rows(inputs), num_rows(labels)
    if num_labels != num_inputs:
      raise ValueError(f"inputs have {num_inputs} examples but labels have {num_labels}; they "
                       "must match.")
    super().__init__(batch_size, process_index, process_count)
    self.inputs, self.labels = inputs, labels
    self.shuffle, self.seed = shuffle, seed

  @property
  def num_examples(self) -> int:
    return num_rows(self.inputs)

  @property
  def steps_per_epoch(self) -> int:
    return -(-self.num_examples // self.batch_size)

  def epoch(self, index: int) -> Iterator[Batch]:
    order = np.asarray(epoch_order(np.uint32(self.seed), np.uint32(index),
                                   num_examples=self.num_examples, shuffle=self.shuffle))
    low = self.process_index * self.local_batch_size
    for start in range(0, self.num_examples, self.batch_size):
      chosen = order[start:start + self.batch_size][low:low + self.local_batch_size]
      inputs, labels = jax.tree.map(lambda value: value[chosen], (self.inputs, self.labels))
      yield pad_batch(inputs, labels, self.local_batch_size)


class TFDataSource(ProcessShare):
  """Batches streamed from an unbatched tf.data pipeline of `(input, label)` pairs. Each epoch
  shuffles with a buffer of `shuffle_buffer` examples, seeded from `(seed, epoch)`, then batches,
  augments (batch `i` of epoch `e` with the stateless seed `(epoch_seed(seed, e, 1 +
  process_index), i)`, so epochs replay exactly) and prefetches. With several processes, `dataset`
  is this one's share of the split (`tfds.even_splits`) and `num_examples` the largest share's
  size: a share that runs out first pads with masked batches."""

  def __init__(self, dataset: tf.data.Dataset, num_examples: int, batch_size: int, *,
               shuffle: bool, seed: int = 0, shuffle_buffer: int = 10_000, process_index: int = 0,
               process_count: int = 1, augment: PipelineAugmentFn | None = None) -> None:
    super().__init__(batch_size, process_index, process_count)
    if num_examples < 1:
      raise ValueError(f"the split is empty (num_examples={num_examples}).")
    self.dataset, self._num_examples, self.augment = dataset, int(num_examples), augment
    self.shuffle, self.seed, self.shuffle_buffer = shuffle, seed, shuffle_buffer

  @property
  def num_examples(self) -> int:  # over all processes: the largest share times their count
    return self._num_examples * self.process_count

  @property
  def steps_per_epoch(self) -> int:
    return -(-self._num_examples // self.local_batch_size)

  def epoch(self, index: int) -> Iterator[Batch]:
    dataset = self.dataset
    if self.shuffle:
      dataset = dataset.shuffle(self.shuffle_buffer, seed=epoch_seed(self.seed, index),
                                reshuffle_each_iteration=False)
    dataset = dataset.batch(self.local_batch_size).map(
        lambda x, y: {"input": x, "label": y, "mask": tf.ones_like(y, tf.bool)})
    if self.augment is not None:
      seed = epoch_seed(self.seed, index, 1 + self.process_index)
      dataset = dataset.enumerate().map(
          lambda i, batch: self.augment(batch, tf.stack([tf.constant(seed, tf.int64), i])),
          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    batches = dataset.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
    for _ in range(self.steps_per_epoch):  # a share that runs out first pads with empty batches
      batch = next(batches, None)
      yield self._empty_batch if batch is None else self._padded(batch)

  def _padded(self, batch: Batch) -> Batch:
    extras = {k: v for k, v in batch.items() if k not in ("input", "label", "mask")}
    return pad_batch(batch["input"], batch["label"], self.local_batch_size, extras)

  @functools.cached_property
  def _empty_batch(self) -> Batch:
    """A fully masked batch with the keys of the augmented batches (mixup's), so every batch of
    the epoch has the same structure and the step compiles once."""
    input_spec, label_spec = self.dataset.element_spec
    probe = {"input": tf.zeros((1, *input_spec.shape), input_spec.dtype),
             "label": tf.zeros((1, *label_spec.shape), label_spec.dtype),
             "mask": tf.ones((1,), tf.bool)}
    if self.augment is not None:
      probe = self.augment(probe, tf.constant([0, 0], tf.int64))
    return self._padded({key: value.numpy()[:0] for key, value in probe.items()})
