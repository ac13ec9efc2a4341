"""Tests of jdl.data.text: vocabularies, token windows, tiny_shakespeare offline, mock IMDB."""

import itertools
import shutil
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import downloader as tfds_downloader

import jdl
from jdl.data import loading, text

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"

# ---------------------------------------------------------------------------------------------
# Helpers.


def refuse_network(monkeypatch):
  """Makes any real TFDS fetch fail the test at once (a manual file must be used instead)."""

  def refuse(*args, **kwargs):
    del args, kwargs
    raise AssertionError("a real download was attempted")

  # pylint: disable-next=protected-access
  monkeypatch.setattr(tfds_downloader._Downloader, "download", refuse)


def pretend_offline(monkeypatch):
  """Makes the download-host probe report every host unreachable, as on a machine offline."""
  monkeypatch.setattr(loading, "_unreachable_hosts",
                      lambda hosts, timeout_s: [f"{name}:{port}" for name, port in hosts])


def window_tokens(vocab_size=11, length=500, seed=0):
  """A random stream of `length` token ids below `vocab_size`."""
  return np.random.default_rng(seed).integers(0, vocab_size, size=length).astype(np.int32)


def contains_window(tokens, window):
  """Whether `window` occurs in `tokens` at some start (vectorised search)."""
  starts = np.arange(len(tokens) - len(window) + 1)
  views = tokens[starts[:, None] + np.arange(len(window))]
  return bool((views == window).all(axis=1).any())


# ---------------------------------------------------------------------------------------------
# CharVocabulary.


def test_char_vocabulary_is_sorted_distinct_characters_and_round_trips():
  """from_text gives the sorted distinct characters; decode(encode(t)) == t; JSON round trips."""
  vocab = jdl.data.CharVocabulary.from_text(TEXT)
  assert vocab.chars == "".join(sorted(set(TEXT)))
  assert vocab.size == len(set(TEXT))
  ids = vocab.encode(TEXT)
  assert ids.dtype == np.int32 and ids.shape == (len(TEXT),)
  assert ids.min() >= 0 and ids.max() < vocab.size
  assert [vocab.chars[i] for i in ids] == list(TEXT)
  assert vocab.decode(ids) == TEXT
  assert vocab.decode([]) == ""
  rebuilt = jdl.data.CharVocabulary.from_json(vocab.to_json())
  assert rebuilt == vocab
  np.testing.assert_array_equal(rebuilt.encode(TEXT), ids)


def test_char_vocabulary_handles_non_ascii_and_rejects_unknown_characters():
  """Characters beyond ASCII encode and decode; an unknown one is a ValueError naming it."""
  vocab = jdl.data.CharVocabulary.from_text("héllo wörld ✓")
  assert vocab.decode(vocab.encode("wörld ✓")) == "wörld ✓"
  with pytest.raises(ValueError, match="'z' .at position 3.*'q', 'z'"):
    vocab.encode("hö zq")
  with pytest.raises(ValueError, match="out of range"):
    vocab.decode([0, vocab.size])
  with pytest.raises(ValueError, match="non-empty"):
    jdl.data.CharVocabulary.from_text("")
  with pytest.raises(ValueError, match="distinct"):
    jdl.data.CharVocabulary("abca")
  with pytest.raises(ValueError, match="'char' vocabulary"):
    jdl.data.CharVocabulary.from_json(jdl.data.WordVocabulary(["a"]).to_json())


# ---------------------------------------------------------------------------------------------
# TokenWindowSource and sequential_windows.


def test_token_windows_are_shifted_windows_of_the_text():
  """Every row is a window of the stream; the label is the input shifted by one token."""
  tokens = window_tokens()
  source = jdl.data.TokenWindowSource(tokens, block_size=8, batch_size=4, seed=3)
  assert source.steps_per_epoch == (len(tokens) - 1) // (8 * 4)
  assert source.num_examples == source.steps_per_epoch * 4
  batches = list(source.epoch(0))
  assert len(batches) == source.steps_per_epoch
  starts = source.starts(0)
  for step, batch in enumerate(batches):
    assert set(batch) == {"input", "label", "mask"}
    assert batch["input"].shape == batch["label"].shape == (4, 8)
    assert batch["input"].dtype == batch["label"].dtype == np.int32
    assert batch["mask"].dtype == np.bool_ and batch["mask"].all() and batch["mask"].shape == (4,)
    np.testing.assert_array_equal(batch["input"][:, 1:], batch["label"][:, :-1])
    for row, start in enumerate(starts[step]):
      np.testing.assert_array_equal(batch["input"][row], tokens[start:start + 8])
      np.testing.assert_array_equal(batch["label"][row], tokens[start + 1:start + 9])
    window = np.concatenate([batch["input"][0], batch["label"][0, -1:]])
    assert contains_window(tokens, window)
  assert starts.min() >= 0 and starts.max() <= len(tokens) - 9


def test_token_window_epochs_replay_exactly_and_differ_from_each_other():
  """The same epoch gives the same batches (also after skipping some, as a resumed loop does);
  another epoch or another seed gives different ones."""
  tokens = window_tokens(length=2000)
  source = jdl.data.TokenWindowSource(tokens, block_size=16, batch_size=8, seed=1)
  first, again = list(source.epoch(2)), list(source.epoch(2))
  for a, b in zip(first, again, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # `jdl.loop` resumes mid-epoch with itertools.islice(source.epoch(e), skip, None).
  resumed = list(itertools.islice(source.epoch(2), 5, None))
  assert len(resumed) == len(first) - 5
  for a, b in zip(resumed, first[5:], strict=True):
    np.testing.assert_array_equal(a["input"], b["input"])
  other_epoch = list(source.epoch(3))
  assert not np.array_equal(other_epoch[0]["input"], first[0]["input"])
  other_seed = jdl.data.TokenWindowSource(tokens, block_size=16, batch_size=8, seed=2)
  assert not np.array_equal(next(other_seed.epoch(2))["input"], first[0]["input"])


def test_token_window_process_shares_concatenate_to_the_single_process_batch():
  """Four processes each take a contiguous quarter of the same global batch."""
  tokens = window_tokens(length=3000)
  single = list(jdl.data.TokenWindowSource(tokens, 12, 8, seed=5, steps_per_epoch=6).epoch(1))
  shares = [list(jdl.data.TokenWindowSource(tokens, 12, 8, seed=5, steps_per_epoch=6,
                                            process_index=p, process_count=4).epoch(1))
            for p in range(4)]
  assert len(single) == 6 and all(len(share) == 6 for share in shares)
  for step, batch in enumerate(single):
    for key in ("input", "label", "mask"):
      joined = np.concatenate([share[step][key] for share in shares])
      np.testing.assert_array_equal(joined, batch[key])
    assert shares[0][step]["input"].shape == (2, 12)


def test_token_window_source_rejects_bad_arguments():
  """Bad tokens, block sizes, batch splits and step counts are errors naming the input."""
  tokens = window_tokens(length=50)
  with pytest.raises(ValueError, match="1-D array of integer"):
    jdl.data.TokenWindowSource(tokens.astype(np.float32), 4, 2)
  with pytest.raises(ValueError, match="1-D array of integer"):
    jdl.data.TokenWindowSource(tokens.reshape(5, 10), 4, 2)
  with pytest.raises(ValueError, match="block_size"):
    jdl.data.TokenWindowSource(tokens, 0, 2)
  with pytest.raises(ValueError, match="too few.*at least 50"):
    jdl.data.TokenWindowSource(tokens[:49], 48, 2)
  jdl.data.TokenWindowSource(tokens, 48, 2)  # 50 tokens: two distinct windows of 49
  with pytest.raises(ValueError, match="multiple of 3"):
    jdl.data.TokenWindowSource(tokens, 4, 4, process_count=3)
  with pytest.raises(ValueError, match="process_index"):
    jdl.data.TokenWindowSource(tokens, 4, 4, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="steps_per_epoch"):
    jdl.data.TokenWindowSource(tokens, 4, 4, steps_per_epoch=0)
  assert jdl.data.TokenWindowSource(tokens, 40, 64).steps_per_epoch == 1  # at least one step


def test_sequential_windows_cover_the_text_in_order():
  """Non-overlapping windows: inputs are tokens[:N*B] in order, labels the same shifted by one."""
  tokens = np.arange(103, dtype=np.int64)
  inputs, labels = jdl.data.sequential_windows(tokens, 10)
  assert inputs.shape == labels.shape == (10, 10)
  assert inputs.dtype == labels.dtype == np.int32
  np.testing.assert_array_equal(inputs.ravel(), np.arange(100))
  np.testing.assert_array_equal(labels.ravel(), np.arange(1, 101))
  inputs, labels = jdl.data.sequential_windows(tokens, 51)  # 102 labels fit exactly twice
  assert inputs.shape == (2, 51) and labels[-1, -1] == 102
  with pytest.raises(ValueError, match="too few"):
    jdl.data.sequential_windows(tokens[:10], 10)


# ---------------------------------------------------------------------------------------------
# tiny_shakespeare, prepared offline from a manual dir.


@pytest.fixture
def shakespeare_dirs(shared_data, tmp_path):
  """`(manual_dir, data_dir)`: a manual dir holding the real `input.txt`, and an empty data dir."""
  source = shared_data / "tiny_shakespeare.txt"
  if not source.is_file():
    pytest.skip(f"{source} is absent")
  manual_dir = tmp_path / "manual"
  manual_dir.mkdir()
  shutil.copyfile(source, manual_dir / "input.txt")
  return str(manual_dir), str(tmp_path / "tfds")


def test_tiny_shakespeare_prepares_from_manual_dir_without_network(shakespeare_dirs, monkeypatch):
  """The real file in a manual dir prepares all three splits offline: 65 characters, 1,003,854 /
  55,770 / 55,770 of them, and validation and test use only training characters."""
  refuse_network(monkeypatch)
  pretend_offline(monkeypatch)
  manual_dir, data_dir = shakespeare_dirs
  builder = jdl.data.get_builder("tiny_shakespeare", data_dir)
  jdl.data.prepare(builder, download=False, manual_dir=manual_dir)
  assert builder.is_prepared()
  texts = {split: jdl.data.read_text(builder, split) for split in ("train", "validation", "test")}
  assert {split: len(t) for split, t in texts.items()} == {
      "train": 1_003_854, "validation": 55_770, "test": 55_770}
  vocab = jdl.data.CharVocabulary.from_text(texts["train"])
  assert vocab.size == 65
  assert set(texts["validation"]) | set(texts["test"]) <= set(vocab.chars)
  assert texts["train"].startswith("First Citizen:\n")


def test_load_char_lm_data_gives_batches_of_the_right_shapes(shakespeare_dirs, monkeypatch):
  """load_char_lm_data: random training windows, in-order validation windows, int32 metadata."""
  refuse_network(monkeypatch)
  manual_dir, data_dir = shakespeare_dirs
  train, evaluation, meta, vocab = jdl.data.load_char_lm_data(
      block_size=128, batch_size=16, eval_batch_size=64, data_dir=data_dir, manual_dir=manual_dir)
  assert vocab.size == 65
  assert meta == jdl.data.DatasetMeta(
      "tiny_shakespeare", (128,), 65, None,
      {"train": 1_003_853 // 128, "validation": 55_769 // 128}, input_dtype="int32")
  assert train.steps_per_epoch == 1_003_853 // (128 * 16)
  batch = next(train.epoch(0))
  assert batch["input"].shape == batch["label"].shape == (16, 128)
  assert batch["input"].dtype == batch["label"].dtype == np.int32
  assert batch["mask"].shape == (16,) and batch["mask"].all()
  eval_batches = list(evaluation.epoch(0))
  assert len(eval_batches) == -(-(55_769 // 128) // 64)
  first = eval_batches[0]
  assert first["input"].shape == first["label"].shape == (64, 128)
  assert first["input"].dtype == np.int32 and first["mask"].all()
  validation = jdl.data.read_text(jdl.data.get_builder("tiny_shakespeare", data_dir), "validation")
  assert vocab.decode(first["input"][0]) == validation[:128]
  assert vocab.decode(first["label"][1]) == validation[129:257]
  last = eval_batches[-1]
  assert last["mask"].sum() == (55_769 // 128) % 64
  assert not last["input"][~last["mask"]].any()
  # A trained workdir stores the vocabulary; a sampling script rebuilds it.
  assert jdl.data.CharVocabulary.from_json(vocab.to_json()) == vocab


def test_tiny_shakespeare_without_file_or_network_fails_fast_naming_input_txt(tmp_path,
                                                                              monkeypatch):
  """Offline and without input.txt, preparing fails within seconds and says to put input.txt
  into a manual dir (with an empty manual dir: naming that dir)."""
  refuse_network(monkeypatch)
  pretend_offline(monkeypatch)
  empty = tmp_path / "manual"
  empty.mkdir()
  builder = jdl.data.get_builder("tiny_shakespeare", str(tmp_path / "tfds"))
  for kwargs in ({}, {"download": False}, {"manual_dir": str(empty)}):
    start = time.perf_counter()
    with pytest.raises(jdl.data.DatasetUnavailableError) as error:
      jdl.data.prepare(builder, **kwargs)
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert "'input.txt'" in message and "manual_dir" in message, message
    assert "tfds build tiny_shakespeare" in message
    if "manual_dir" in kwargs:
      assert str(empty) in message
  with pytest.raises(jdl.data.DatasetUnavailableError, match="not a folder"):
    jdl.data.load_char_lm_data(block_size=8, batch_size=2, eval_batch_size=2,
                               data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "none"))


# ---------------------------------------------------------------------------------------------
# WordVocabulary and IMDB (on TFDS mock data).


def test_word_vocabulary_ranks_by_frequency_then_alphabet():
  """Lowercased words and punctuation, `<br />` dropped; ids 0 pad, 1 unknown, then by count
  with ties in alphabetical order; encode truncates and pads at the end."""
  texts = ["The cat sat.<br /><br />The DOG sat!", "a cat, a dog; don't"]
  assert text.split_words(texts[0]) == ["the", "cat", "sat", ".", "the", "dog", "sat", "!"]
  vocab = jdl.data.WordVocabulary.from_texts(texts, max_words=8)
  # Counts: a 2, cat 2, dog 2, sat 2, the 2, then 1 each: ! , . ; don't.
  assert vocab.words == ("a", "cat", "dog", "sat", "the", "!")
  assert vocab.size == 8
  ids = vocab.encode(["The cat ate a fish", "dog", "Sat. sat. sat. sat."], max_length=6)
  assert ids.dtype == np.int32 and ids.shape == (3, 6)
  np.testing.assert_array_equal(ids, [[6, 3, 1, 2, 1, 0], [4, 0, 0, 0, 0, 0],
                                      [5, 1, 5, 1, 5, 1]])
  assert vocab.decode(ids[0]) == "the cat <unk> a <unk>"
  assert jdl.data.WordVocabulary.from_json(vocab.to_json()) == vocab
  assert jdl.data.WordVocabulary.from_texts(list(reversed(texts)), max_words=8) == vocab
  with pytest.raises(ValueError, match="single string"):
    vocab.encode("the cat", max_length=4)
  with pytest.raises(ValueError, match="max_words"):
    jdl.data.WordVocabulary.from_texts(texts, max_words=2)


MOCK_EXAMPLES = 48


def test_imdb_on_mock_data_gives_padded_word_ids(tmp_path, monkeypatch):
  """load_text_classification_data on mock imdb_reviews: int32 ids in range, padding 0 only at
  the end, labels in {0, 1}, and the same vocabulary on every load."""
  refuse_network(monkeypatch)
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    kwargs = dict(max_length=12, max_words=30, batch_size=16, eval_batch_size=32,
                  data_dir=str(tmp_path))
    train, evaluation, meta, vocab = jdl.data.load_text_classification_data(**kwargs)
    _, _, _, again = jdl.data.load_text_classification_data(**kwargs)
    builder = jdl.data.get_builder("imdb_reviews", str(tmp_path))
    train_texts = [example["text"].decode("utf-8")
                   for example in tfds.as_numpy(builder.as_dataset(split="train"))]
  assert vocab == again and 3 <= vocab.size <= 30
  assert meta.name == "imdb_reviews" and meta.input_shape == (12,) and meta.num_classes == 2
  assert meta.class_names == ("neg", "pos") and meta.input_dtype == "int32"
  assert meta.split_sizes == {"train": MOCK_EXAMPLES, "test": MOCK_EXAMPLES}
  assert train.shuffle and not evaluation.shuffle
  assert train.steps_per_epoch == MOCK_EXAMPLES // 16
  assert evaluation.steps_per_epoch == -(-MOCK_EXAMPLES // 32)
  np.testing.assert_array_equal(train.inputs, vocab.encode(train_texts, 12))
  for source in (train, evaluation):
    ids = source.inputs
    assert ids.dtype == np.int32 and ids.shape == (MOCK_EXAMPLES, 12)
    assert ids.min() >= 0 and ids.max() < vocab.size
    lengths = (ids != 0).sum(axis=1)
    np.testing.assert_array_equal(ids != 0, np.arange(12) < lengths[:, None])  # padding at the end
    assert source.labels.dtype == np.int32 and set(source.labels.tolist()) <= {0, 1}
  expected_lengths = [min(len(text.split_words(t)), 12) for t in train_texts]
  np.testing.assert_array_equal((train.inputs != 0).sum(axis=1), expected_lengths)
  batch = next(train.epoch(0))
  assert batch["input"].shape == (16, 12) and batch["input"].dtype == np.int32


def test_windows_of_a_memory_mapped_uint16_token_file_without_copying_it(tmp_path):
  """A nanoGPT-style `.bin` of uint16 ids stays memory-mapped (never copied to int32): the
  source yields the int32 windows of the same stream in memory, and a resumed epoch positions
  itself without reading the windows it skips."""
  stream = (np.arange(5000) * 7919 % 60000).astype(np.uint16)
  path = tmp_path / "train.bin"
  stream.tofile(path)
  tokens = jdl.data.read_token_file(str(path))
  mapped = jdl.data.TokenWindowSource(tokens, block_size=16, batch_size=4, seed=3)
  in_memory = jdl.data.TokenWindowSource(stream.astype(np.int64), block_size=16, batch_size=4,
                                         seed=3)
  assert np.shares_memory(mapped.tokens, tokens) and mapped.tokens.dtype == np.uint16
  for a, b in zip(mapped.epoch(1), in_memory.epoch(1)):
    assert a["input"].dtype == np.int32
    np.testing.assert_array_equal(a["input"], b["input"])
    np.testing.assert_array_equal(a["label"], b["label"])
  resumed = list(mapped.epoch_from(1, 5))
  assert len(resumed) == mapped.steps_per_epoch - 5
  np.testing.assert_array_equal(resumed[0]["input"], list(mapped.epoch(1))[5]["input"])
  with pytest.raises(ValueError, match="uint16 or uint32"):
    jdl.data.read_token_file(str(path), dtype="int8")
