"""Text data, in memory: vocabularies, and batch sources for language modelling
(`load_char_lm_data`: random `TokenWindowSource` windows of one stream of character ids, fixed
`sequential_windows` for evaluation) and text classification (`load_text_classification_data`:
`WordVocabulary` ids). Vocabularies are built from the training split and serialise to JSON
(`vocab.json` beside a workdir's checkpoints rebuilds the exact mapping).
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Self

import numpy as np

from jdl.data.loading import DatasetMeta, get_builder, prepare
from jdl.data.sources import ArraySource, Batch, ProcessShare, epoch_seed
from jdl.lazy_import import tensorflow_datasets as tfds


class _Vocabulary:
  """What both vocabularies share: a JSON document of their `_FIELD`, and equality by it."""

  _KIND = ""
  _FIELD = ""

  def to_json(self) -> str:
    """The vocabulary as a JSON document (for `vocab.json`); `from_json` reads it back."""
    return json.dumps({"kind": self._KIND, self._FIELD: getattr(self, self._FIELD)})

  @classmethod
  def from_json(cls, text: str) -> Self:
    try:
      data = json.loads(text)
    except (TypeError, json.JSONDecodeError) as error:
      raise ValueError(f"not a vocabulary JSON document: {error}") from None
    if not isinstance(data, dict) or data.get("kind") != cls._KIND or cls._FIELD not in data:
      found = data.get("kind") if isinstance(data, dict) else type(data).__name__
      raise ValueError(
          f"expected a {cls._KIND!r} vocabulary with keys {[cls._FIELD]}; got kind {found!r}.")
    return cls(data[cls._FIELD])

  def __eq__(self, other: object) -> bool:
    field = self._FIELD
    return isinstance(other, type(self)) and getattr(other, field) == getattr(self, field)

  def __hash__(self) -> int:
    return hash(getattr(self, self._FIELD))

  def _check_distinct(self, items: Sequence[str], what: str) -> None:
    if repeated := sorted(item for item, n in collections.Counter(items).items() if n > 1):
      raise ValueError(f"the vocabulary's {what} must be distinct; repeated: {repeated[:10]!r}.")


class CharVocabulary(_Vocabulary):
  """A bijection between distinct characters (`chars`, in id order) and the ids `0 .. size - 1`;
  `from_text` sorts them by code point, so the same text always gives the same vocabulary."""

  _KIND, _FIELD = "char", "chars"

  def __init__(self, chars: str) -> None:
    if not isinstance(chars, str) or not chars:
      raise ValueError(f"a character vocabulary needs a non-empty string of characters; got "
                       f"{chars!r}.")
    self._check_distinct(chars, "characters")
    self.chars = chars
    self._codes = _code_points(chars)
    # Sorted code points and their ids: encoding is one searchsorted over the whole text.
    self._order = np.argsort(self._codes, kind="stable").astype(np.int32)
    self._sorted_codes = self._codes[self._order]

  @classmethod
  def from_text(cls, text: str) -> CharVocabulary:
    """The vocabulary of the distinct characters of `text`, sorted."""
    if not isinstance(text, str) or not text:
      raise ValueError(f"cannot build a character vocabulary from {_preview(text)}: need a "
                       "non-empty string.")
    return cls("".join(sorted(set(text))))

  @property
  def size(self) -> int:
    """The number of characters (the width of the model's embedding and output)."""
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    """The int32 ids of the characters of `text`; an unknown character is a ValueError naming it."""
    if not isinstance(text, str):
      raise ValueError(f"encode takes a string; got {type(text).__name__}.")
    codes = _code_points(text)
    slots = np.searchsorted(self._sorted_codes, codes)
    known = self._sorted_codes[np.minimum(slots, self.size - 1)] == codes
    if not known.all():
      unknown = sorted({chr(c) for c in codes[~known].tolist()})
      first = int(np.argmin(known))
      raise ValueError(f"character {chr(codes[first])!r} (at position {first}) is not in the "
                       f"vocabulary of {self.size} characters; unknown characters: "
                       f"{unknown[:10]!r}{' ...' if len(unknown) > 10 else ''}.")
    return self._order[slots]

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """The text of a sequence of ids in `[0, size)` (the inverse of `encode`)."""
    return self._codes[_check_ids(ids, self.size)].astype("<u4").tobytes().decode("utf-32-le")

  def __repr__(self) -> str:
    return f"CharVocabulary(size={self.size}, chars={_preview(self.chars)})"


# Words (letters, digits, inner apostrophes: "don't") or single punctuation marks.
_WORD_PATTERN = re.compile(r"\w+(?:'\w+)*|[^\w\s]")
_LINE_BREAK_TAG = re.compile(r"<br\s*/?>", re.IGNORECASE)


def split_words(text: str) -> list[str]:
  """The lowercase words and punctuation marks of `text`, HTML line breaks (`<br />`) dropped."""
  return _WORD_PATTERN.findall(_LINE_BREAK_TAG.sub(" ", text).lower())


class WordVocabulary(_Vocabulary):
  """Word ids: 0 is padding, 1 an unknown word, then `words` (distinct) as `2 .. size - 1`; text
  is lowercased and split into words and punctuation marks by `split_words`."""

  PAD_ID = 0
  UNKNOWN_ID = 1
  _KIND, _FIELD = "word", "words"

  def __init__(self, words: Sequence[str]) -> None:
    self.words = tuple(words)
    if not all(isinstance(word, str) and word for word in self.words):
      raise ValueError("a word vocabulary's words must be non-empty strings.")
    self._check_distinct(self.words, "words")
    self._ids = {word: index + 2 for index, word in enumerate(self.words)}

  @classmethod
  def from_texts(cls, texts: Iterable[str], max_words: int) -> WordVocabulary:
    """The `max_words - 2` most frequent words of `texts` (ties in alphabetical order), so the
    vocabulary, padding and unknown included, has at most `max_words` ids."""
    if max_words < 3:
      raise ValueError(f"max_words must be >= 3 (padding, unknown and at least one word); got "
                       f"{max_words}.")
    counts = collections.Counter(word for text in _check_texts(texts) for word in split_words(text))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return cls([word for word, _ in ranked[:max_words - 2]])

  @property
  def size(self) -> int:
    """The number of ids, padding and unknown included (the embedding's row count)."""
    return len(self.words) + 2

  def encode(self, texts: Sequence[str], max_length: int) -> np.ndarray:
    """Word ids of each text, int32 `[len(texts), max_length]`: the first `max_length` words,
    padded at the end with 0; words outside the vocabulary get id 1."""
    if max_length < 1:
      raise ValueError(f"max_length must be >= 1; got {max_length}.")
    texts = _check_texts(texts)
    ids = np.zeros((len(texts), max_length), np.int32)
    for row, text in enumerate(texts):
      words = split_words(text)[:max_length]
      ids[row, :len(words)] = [self._ids.get(word, self.UNKNOWN_ID) for word in words]
    return ids

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """The words of one row of ids, joined by spaces, padding left out and unknown words shown
    as `<unk>` (for reading examples, not an exact inverse of `encode`)."""
    return " ".join("<unk>" if i == self.UNKNOWN_ID else self.words[i - 2]
                    for i in _check_ids(ids, self.size).tolist() if i != self.PAD_ID)

  def __repr__(self) -> str:
    return f"WordVocabulary(size={self.size}, first words={list(self.words[:5])!r})"


class TokenWindowSource(ProcessShare):
  """Random windows of a token stream for next-token prediction, a `BatchSource`: each example is
  `block_size + 1` consecutive tokens from a random start, `input = window[:-1]`, `label =
  window[1:]`, every row real. Epoch `e` (`steps_per_epoch` batches) draws its global starts from
  `epoch_seed(seed, e)`, so it replays exactly; each process yields its rows of every batch."""

  def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, *, seed: int = 0,
               steps_per_epoch: int | None = None, process_index: int = 0,
               process_count: int = 1) -> None:
    """`tokens` is the 1-D stream (`CharVocabulary.encode(text)`, say); `steps_per_epoch=None` is
    about one pass over it, `(len(tokens) - 1) // (block_size * batch_size)` (at least 1)."""
    # More than block_size + 1 tokens, so there are at least two distinct windows.
    self.tokens = _check_tokens(tokens, block_size, extra=2)
    self.block_size = int(block_size)
    super().__init__(batch_size, process_index, process_count)
    if steps_per_epoch is None:
      steps_per_epoch = max(1, (len(self.tokens) - 1) // (self.block_size * self.batch_size))
    elif steps_per_epoch < 1:
      raise ValueError(f"steps_per_epoch must be >= 1 (or None for about one pass over the "
                       f"tokens); got {steps_per_epoch}.")
    self.steps_per_epoch, self.seed = int(steps_per_epoch), seed
    self._offsets = np.arange(self.block_size + 1)

  @property
  def num_examples(self) -> int:
    """Windows per epoch over all processes (`steps_per_epoch * batch_size`)."""
    return self.steps_per_epoch * self.batch_size

  def starts(self, index: int) -> np.ndarray:
    """The global window starts of epoch `index`, int64 `[steps_per_epoch, batch_size]`, each in
    `[0, len(tokens) - block_size)`."""
    rng = np.random.default_rng(epoch_seed(self.seed, index))
    num_starts = len(self.tokens) - self.block_size
    return np.stack([rng.integers(0, num_starts, size=self.batch_size)
                     for _ in range(self.steps_per_epoch)])

  def epoch(self, index: int) -> Iterator[Batch]:
    """Epoch `index`: `input`, `label` int32 `[local_batch, block_size]`, an all-True `mask`."""
    return self.epoch_from(index, 0)

  def epoch_from(self, index: int, first: int) -> Iterator[Batch]:
    """Epoch `index` from its batch `first` on, without reading the earlier batches' windows."""
    low = self.process_index * self.local_batch_size
    mask = np.ones((self.local_batch_size,), np.bool_)
    for starts in self.starts(index)[first:]:
      windows = self.tokens[starts[low:low + self.local_batch_size, None] + self._offsets]
      windows = windows.astype(np.int32)  # from the stream's own dtype (uint16 in a file, say)
      yield {"input": np.ascontiguousarray(windows[:, :-1]),
             "label": np.ascontiguousarray(windows[:, 1:]), "mask": mask.copy()}


def read_token_file(path: str, dtype: str = "uint16") -> np.ndarray:
  """A binary file of token ids (nanoGPT's `train.bin`: flat uint16, or uint32 for vocabularies
  over 65,536), memory-mapped read-only, so `TokenWindowSource` reads windows without a copy."""
  if np.dtype(dtype) not in (np.dtype(np.uint16), np.dtype(np.uint32)):
    raise ValueError(f"token files hold uint16 or uint32 ids; got dtype {dtype!r}.")
  return np.memmap(path, dtype=np.dtype(dtype), mode="r")


def sequential_windows(tokens: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Non-overlapping windows of a token stream, in order: `(inputs, labels)`, int32
  `[N, block_size]` each, `N = (len(tokens) - 1) // block_size`; labels are the inputs shifted by
  one, so the windows predict tokens `1 .. N * block_size` once each (the evaluation set)."""
  tokens = _check_tokens(tokens, block_size, extra=1)
  span = (len(tokens) - 1) // block_size * block_size
  return (tokens[:span].reshape(-1, block_size).astype(np.int32),
          tokens[1:span + 1].reshape(-1, block_size).astype(np.int32))


def read_text(builder: tfds.core.DatasetBuilder, split: str) -> str:
  """The text of a split of a prepared TFDS dataset with a "text" feature, its examples joined
  with newlines in the order TFDS stores them; a ValueError if the split is empty."""
  if "text" not in builder.info.features:
    raise ValueError(f"dataset {builder.name!r} has no 'text' feature; its features are "
                     f"{sorted(builder.info.features)}.")
  return "\n".join(_read_texts(builder, split, "text")[0])


def load_char_lm_data(
    name: str = "tiny_shakespeare", *, block_size: int, batch_size: int, eval_batch_size: int,
    train_split: str = "train", eval_split: str = "validation", data_dir: str | None = None,
    download: bool = True, manual_dir: str | None = None, seed: int = 0, process_index: int = 0,
    process_count: int = 1) -> tuple[TokenWindowSource, ArraySource, DatasetMeta, CharVocabulary]:
  """`(train_source, eval_source, meta, vocab)` of a character language model on a TFDS dataset
  with a "text" feature: random windows of `block_size` characters of the training split, the
  eval split's non-overlapping windows in order, metadata (`num_classes=vocab.size`, split sizes
  in windows) and the training split's vocabulary (an eval character it lacks is an error). The
  other arguments are `jdl.data.load_classification_data`'s; offline, tiny_shakespeare prepares
  from a `manual_dir` holding the char-rnn `input.txt`."""
  builder = get_builder(name, data_dir)
  prepare(builder, download=download, manual_dir=manual_dir)
  train_text = read_text(builder, train_split)
  vocab = CharVocabulary.from_text(train_text)
  eval_text = read_text(builder, eval_split)
  if unseen := sorted(set(eval_text) - set(vocab.chars)):
    raise ValueError(
        f"split {eval_split!r} of {name!r} has characters that split {train_split!r} lacks, so "
        f"the vocabulary built from {train_split!r} cannot encode them: {unseen[:10]!r}.")
  train_tokens, eval_tokens = vocab.encode(train_text), vocab.encode(eval_text)
  shared = dict(seed=seed, process_index=process_index, process_count=process_count)
  train_source = TokenWindowSource(train_tokens, block_size, batch_size, **shared)
  eval_inputs, eval_labels = sequential_windows(eval_tokens, block_size)
  eval_source = ArraySource(eval_inputs, eval_labels, eval_batch_size, shuffle=False, **shared)
  sizes = {train_split: (len(train_tokens) - 1) // block_size, eval_split: len(eval_inputs)}
  meta = DatasetMeta(name, (int(block_size),), vocab.size, None, sizes, input_dtype="int32")
  return train_source, eval_source, meta, vocab


def load_text_classification_data(
    name: str = "imdb_reviews", *, max_length: int = 256, max_words: int = 20_000,
    batch_size: int, eval_batch_size: int, train_split: str = "train", eval_split: str = "test",
    data_dir: str | None = None, download: bool = True, manual_dir: str | None = None,
    seed: int = 0, shuffle: bool = True, process_index: int = 0,
    process_count: int = 1) -> tuple[ArraySource, ArraySource, DatasetMeta, WordVocabulary]:
  """`(train_source, eval_source, meta, vocab)` of a TFDS dataset whose supervised keys are a
  text and a class label: int32 `[max_length]` word ids (longer texts cut, shorter ones padded
  with 0 at the end) of the `max_words` ids, padding and unknown included, of the training split's
  most frequent words. The other arguments are `jdl.data.load_classification_data`'s."""
  if max_length < 1:
    raise ValueError(f"max_length must be >= 1; got {max_length}.")
  builder = get_builder(name, data_dir)
  prepare(builder, download=download, manual_dir=manual_dir)
  info = builder.info
  keys = tuple(info.supervised_keys or ())[:2] or ("text", "label")
  if len(keys) != 2 or not all(isinstance(key, str) for key in keys):
    raise ValueError(f"dataset {builder.name!r} does not have a (text, label) pair of features; "
                     f"its supervised keys are {info.supervised_keys!r}.")
  (text_key, label_key), features = keys, info.features
  if text_key not in features or not isinstance(features[text_key], tfds.features.Text):
    raise ValueError(f"dataset {builder.name!r}'s input {text_key!r} is not a text feature.")
  if label_key not in features or not isinstance(features[label_key], tfds.features.ClassLabel):
    raise ValueError(f"dataset {builder.name!r}'s label {label_key!r} is not a class label.")
  label_feature = features[label_key]
  train_texts, train_labels = _read_texts(builder, train_split, text_key, label_key)
  eval_texts, eval_labels = _read_texts(builder, eval_split, text_key, label_key)
  vocab = WordVocabulary.from_texts(train_texts, max_words)
  shared = dict(seed=seed, process_index=process_index, process_count=process_count)
  train_source = ArraySource(vocab.encode(train_texts, max_length), train_labels, batch_size,
                             shuffle=shuffle, **shared)
  eval_source = ArraySource(vocab.encode(eval_texts, max_length), eval_labels, eval_batch_size,
                            shuffle=False, **shared)
  names = tuple(label_feature.names) if label_feature.names else None
  sizes = {train_split: len(train_labels), eval_split: len(eval_labels)}
  meta = DatasetMeta(name, (int(max_length),), label_feature.num_classes, names, sizes,
                     input_dtype="int32")
  return train_source, eval_source, meta, vocab


def _read_texts(builder: tfds.core.DatasetBuilder, split: str, text_key: str,
                label_key: str | None = None) -> tuple[list[str], np.ndarray]:
  """A split's texts (from UTF-8) and int32 labels (none without `label_key`), in TFDS's order."""
  texts, labels = [], [np.zeros((0,), np.int32)]
  dataset = builder.as_dataset(split=split, shuffle_files=False).batch(1024)
  for batch in tfds.as_numpy(dataset):
    texts.extend(text.decode("utf-8") for text in batch[text_key])
    if label_key is not None:
      labels.append(batch[label_key].astype(np.int32))
  if not texts:
    raise ValueError(f"split {split!r} of {builder.name!r} has no examples.")
  return texts, np.concatenate(labels)


def _check_tokens(tokens: np.ndarray, block_size: int, *, extra: int) -> np.ndarray:
  """`tokens` as an array, checked: a 1-D stream of >= `block_size + extra` ids in `[0, 2**31)`."""
  if not isinstance(block_size, (int, np.integer)) or block_size < 1:
    raise ValueError(f"block_size must be an integer >= 1; got {block_size!r}.")
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens must be a 1-D array of integer ids; got shape {tokens.shape} and "
                     f"dtype {tokens.dtype}.")
  if len(tokens) < block_size + extra:
    raise ValueError(f"{len(tokens)} tokens are too few for windows of block_size={block_size}: "
                     f"need at least {block_size + extra}.")
  if np.iinfo(tokens.dtype).max > np.iinfo(np.int32).max or np.iinfo(tokens.dtype).min < 0:
    # Ids of a wide or signed type are read once to check them (a memory-mapped file: one pass).
    if tokens.min() < 0 or tokens.max() > np.iinfo(np.int32).max:
      raise ValueError(f"token ids must lie in [0, 2**31); got {tokens.min()} .. {tokens.max()}.")
  return tokens  # kept in its own dtype (a uint16 file stays mapped); windows become int32


def _check_texts(texts: Iterable[str]) -> list[str]:
  """`texts` as a list, after checking it is a collection of strings (not one string)."""
  if isinstance(texts, (str, bytes)):
    raise ValueError("expected a sequence of texts, got a single string; wrap it in a list.")
  texts = list(texts)
  for index, text in enumerate(texts):
    if not isinstance(text, str):
      raise ValueError(f"text {index} is a {type(text).__name__}, not a str (decode bytes as "
                       "UTF-8 first).")
  return texts


def _code_points(text: str) -> np.ndarray:
  return np.frombuffer(text.encode("utf-32-le"), np.uint32)


def _check_ids(ids: Iterable[int] | np.ndarray, size: int) -> np.ndarray:
  """`ids` as a 1-D int64 array, after checking they are integers in `[0, size)` (for `decode`)."""
  ids = np.asarray(ids)
  if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
    raise ValueError(f"decode takes a 1-D sequence of integer ids; got shape {ids.shape} and "
                     f"dtype {ids.dtype}.")
  if ids.size and (ids.min() < 0 or ids.max() >= size):
    bad = sorted(set(ids[(ids < 0) | (ids >= size)].tolist()))[:5]
    raise ValueError(f"ids {bad} are out of range: the vocabulary has {size} ids, [0, {size - 1}].")
  return ids.astype(np.int64)


def _preview(text: object, limit: int = 40) -> str:
  shown = repr(text)
  return shown if len(shown) <= limit else shown[:limit] + "...'"
