"""Sentiment of movie reviews (TFDS `imdb_reviews`, 25,000 train / 25,000 test): a transformer
encoder over word ids by default, an LSTM as a variant.

Reviews become ids of the 20,000 most frequent training words (0 pads, 1 stands for any other
word), cut or padded to 256 words. Published baselines for this setting reach about 0.85-0.88
test accuracy (a one-layer LSTM or a small transformer trained from scratch for a few epochs).

  python -m experiments.imdb_sentiment
  python -m experiments.imdb_sentiment --config.model.name=rnn      # a (bidirectional) LSTM
"""

import ml_collections

from jdl import config as config_lib
from jdl import experiment


def get_config() -> ml_collections.ConfigDict:
  config = config_lib.base_config()
  config.task = "text_classification"
  config.dataset = "imdb_reviews"
  config.text.max_length = 256  # words per review
  config.text.max_words = 20000  # vocabulary, padding and unknown included
  vocab_size = config.text.get_ref("max_words")  # the models follow an override of max_words
  config.model.name = "transformer_classifier"
  config.model.transformer_classifier = ml_collections.ConfigDict()
  config.model.transformer_classifier.vocab_size = vocab_size
  config.model.transformer_classifier.max_length = config.text.get_ref("max_length")
  config.model.transformer_classifier.num_layers = 2
  config.model.transformer_classifier.num_heads = 4
  config.model.transformer_classifier.width = 64
  config.model.transformer_classifier.dropout_rate = 0.1
  config.model.rnn = ml_collections.ConfigDict()  # for --config.model.name=rnn
  config.model.rnn.cell = "lstm"
  config.model.rnn.hidden = 64
  config.model.rnn.bidirectional = True
  config.model.rnn.vocab_size = vocab_size
  config.model.rnn.embed_dim = 64
  config.model.rnn.pooling = "last"
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 0.01
  config.optimizer.clip_norm = 1.0
  config.batch_size = 64
  config.eval_batch_size = 500
  config.num_epochs = 3
  return config


def main() -> None:
  experiment.main(get_config, name="imdb_sentiment")


if __name__ == "__main__":
  main()
