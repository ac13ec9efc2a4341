"""The sequence experiments: tiny configs under mock data, then sampling from the trained workdir;
and, on the real text, the LM pipeline end to end."""

import json
import shutil

import jax
import numpy as np
import pytest

import jdl

from experiments import imdb_sentiment, sample, shakespeare_char
from tests.experiments_test import MOCK_EXAMPLES, is_finite_number, run_on_mock_data

TINY_LM = ["--config.layout=none", "--config.num_steps=6", "--config.eval_every_steps=3",
           "--config.text.block_size=16", "--config.model.transformer_lm.block_size=16",
           "--config.model.transformer_lm.width=16", "--config.model.transformer_lm.num_layers=1",
           "--config.model.transformer_lm.num_heads=2", "--config.model.rnn_lm.block_size=16",
           "--config.model.rnn_lm.hidden=8", "--config.model.rnn_lm.embed_dim=8",
           "--config.model.rnn_lm.num_layers=1", "--config.optimizer.warmup_steps=1"]


@pytest.mark.parametrize("model", ["transformer_lm", "rnn_lm"])
def test_shakespeare_char_trains_on_mock_text_and_samples(tmp_path, model, capsys):
  """A few steps on mock text give finite per-character metrics and a workdir from which
  `experiments.sample` generates the same text for the same seed, in the run's vocabulary."""
  _, history = run_on_mock_data("shakespeare_char", tmp_path,
                                [*TINY_LM, f"--config.model.name={model}"])
  record = history[-1]
  assert record["step"] == 6 and [r["step"] for r in history] == [3, 6]
  assert all(is_finite_number(record[k]) for k in ("train_loss", "validation_loss",
                                                   "validation_accuracy", "learning_rate"))
  vocabulary = json.loads((tmp_path / "vocab.json").read_text())
  assert vocabulary["kind"] == "char"
  meta = json.loads((tmp_path / "data.json").read_text())
  assert meta["input_dtype"] == "int32" and meta["input_shape"] == [16]
  prompt = vocabulary["chars"][:3]
  texts = sample.sample_text(str(tmp_path), prompt=prompt, num_tokens=20, top_k=3, seed=1,
                             num_samples=2)
  again = sample.sample_text(str(tmp_path), prompt=prompt, num_tokens=20, top_k=3, seed=1,
                             num_samples=2)
  assert texts == again and all(len(t) == 23 and t.startswith(prompt) for t in texts)
  assert set("".join(texts)) <= set(vocabulary["chars"])
  capsys.readouterr()  # the training run's output
  sample.main([f"--workdir={tmp_path}", f"--prompt={prompt}", "--num_tokens=5", "--seed=1",
               "--checkpoint=best"])
  assert capsys.readouterr().out.startswith(prompt)


def test_sample_refuses_a_classification_workdir(tmp_path):
  """Sampling from an image classifier's workdir is a clear error, not a traceback."""
  run_on_mock_data("fashion_mnist_mlp", tmp_path, ["--config.layout=none"])
  with pytest.raises(SystemExit) as stopped:
    sample.main([f"--workdir={tmp_path}"])
  assert stopped.value.code == 2
  with pytest.raises(ValueError, match="sampling needs a language model"):
    sample.sample_text(str(tmp_path), prompt="a", num_tokens=1)


def test_imdb_sentiment_runs_on_mock_reviews(tmp_path):
  """One epoch of mock reviews through the transformer encoder gives finite metrics and a word
  vocabulary."""
  args = ["--config.layout=none", "--config.text.max_length=24", "--config.text.max_words=200",
          "--config.model.transformer_classifier.width=16",
          "--config.model.transformer_classifier.num_layers=1"]
  state, history = run_on_mock_data("imdb_sentiment", tmp_path, args)
  record = history[-1]
  assert record["step"] == MOCK_EXAMPLES // 16
  assert all(is_finite_number(record[k]) for k in ("train_loss", "test_loss", "test_accuracy"))
  assert state.input_dtype == "int32" and state.input_shape == (24,)
  assert json.loads((tmp_path / "vocab.json").read_text())["kind"] == "word"
  assert imdb_sentiment.get_config().model.transformer_classifier.vocab_size == 20000


def test_imdb_sentiment_lstm_variant_follows_the_text_settings():
  """`--config.model.name=rnn` builds a bidirectional LSTM over the vocabulary the text settings
  give (the run's data path is the transformer's, above): word ids in, two logits out."""
  config = jdl.apply_overrides(imdb_sentiment.get_config(), [
      "model.name=rnn", "text.max_words=200", "text.max_length=24", "model.rnn.hidden=8"])
  model = jdl.models.build_model(config.model, num_classes=2)
  assert isinstance(model, jdl.models.RNNClassifier)
  assert (model.cell, model.bidirectional, model.vocab_size) == ("lstm", True, 200)
  logits = jax.eval_shape(lambda t: model.init_with_output(jax.random.PRNGKey(0), t, train=False)[0],
                          jax.ShapeDtypeStruct((2, 24), jax.numpy.int32))
  assert logits.shape == (2, 2)


def test_shakespeare_char_config_is_the_small_cpu_model():
  """The documented CPU configuration: 4 layers, 4 heads, width 128, context 64, batch 12,
  2000 steps."""
  config = shakespeare_char.get_config()
  lm = config.model.transformer_lm
  assert (lm.num_layers, lm.num_heads, lm.width, lm.block_size) == (4, 4, 128, 64)
  assert (config.text.block_size, config.batch_size, config.num_steps) == (64, 12, 2000)


def test_real_tiny_shakespeare_trains_a_few_steps(tmp_path, shared_data):
  """The real text, prepared offline from a manual dir, through the experiment: the loss starts
  near log(65) = 4.17 nats per character and falls."""
  manual = tmp_path / "manual"
  manual.mkdir()
  shutil.copy(shared_data / "tiny_shakespeare.txt", manual / "input.txt")
  from jdl import config as config_lib  # pylint: disable=import-outside-toplevel
  from jdl.experiment import train_and_evaluate  # pylint: disable=import-outside-toplevel

  config = config_lib.apply_overrides(shakespeare_char.get_config(), [
      f"data_dir={tmp_path / 'tfds'}", f"manual_dir={manual}", "num_steps=60",
      "eval_every_steps=30", "progress=false", "layout=none", "model.transformer_lm.num_layers=1",
      "model.transformer_lm.width=32", "optimizer.warmup_steps=5", "optimizer.learning_rate=3e-3"])
  _, history = train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isclose(history[0]["train_loss"], np.log(65), atol=1.0)
  assert history[-1]["validation_loss"] < 3.3
