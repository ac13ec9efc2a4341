"""A character-level language model of Shakespeare: a small GPT-style transformer (or an LSTM)
trained to predict the next character of TFDS `tiny_shakespeare`.

The default is the small CPU configuration: 4 layers, 4 heads, width 128, 64 characters of
context, batch 12, 2000 steps, AdamW 1e-3 with warm-up and cosine decay. The validation loss is
reported in nats per character over every 64-character window of the validation split; a
well-trained model of this size reaches about 1.8-1.9 (an LSTM of 2 x 256 about the same, more
slowly). Then sample from the trained workdir:

  python -m experiments.shakespeare_char --config.manual_dir=DIR_WITH_input.txt
  python -m experiments.sample --workdir=runs/shakespeare_char --prompt="ROMEO:" --top_k=10
  python -m experiments.shakespeare_char --config.model.name=rnn_lm   # the LSTM variant

TFDS prepares `tiny_shakespeare` from its download URL, or offline from a folder holding the
same `input.txt` (`--config.manual_dir`).
"""

import ml_collections

from jdl import config as config_lib
from jdl import experiment


def get_config() -> ml_collections.ConfigDict:
  config = config_lib.base_config()
  config.task = "language_model"
  config.dataset = "tiny_shakespeare"
  config.eval_split = "validation"  # evaluated on all of it, window by window
  config.text.block_size = 64  # characters of context
  config.model.name = "transformer_lm"
  config.model.transformer_lm = ml_collections.ConfigDict()
  config.model.transformer_lm.num_layers = 4
  config.model.transformer_lm.num_heads = 4
  config.model.transformer_lm.width = 128
  config.model.transformer_lm.block_size = 64  # learned positions: the context length
  config.model.transformer_lm.dropout_rate = 0.0
  config.model.transformer_lm.tie_weights = True  # output projection = token embedding
  config.model.transformer_lm.remat = "none"  # "full" or "matmuls": less memory, more compute
  config.model.transformer_lm.scan_layers = False  # True: nn.scan over blocks, flat compile time
  config.model.rnn_lm = ml_collections.ConfigDict()  # for --config.model.name=rnn_lm
  config.model.rnn_lm.cell = "lstm"
  config.model.rnn_lm.hidden = 256
  config.model.rnn_lm.num_layers = 2
  config.model.rnn_lm.embed_dim = 128
  config.model.rnn_lm.block_size = 64
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.b2 = 0.99  # a short run: a shorter memory of squared gradients
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.1  # on weight matrices only (not biases, norms)
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.warmup_steps = 100
  config.optimizer.end_fraction = 0.1
  config.optimizer.clip_norm = 1.0
  config.batch_size = 12
  config.eval_batch_size = 256
  config.num_steps = 2000
  config.eval_every_steps = 500
  config.best_metric = "loss"  # keep the checkpoint with the lowest validation loss
  return config


def main() -> None:
  experiment.main(get_config, name="shakespeare_char")


if __name__ == "__main__":
  main()
