"""MNIST-1D with the paper's CNN (or MLP): the default experiment, which needs no download.

The data are generated offline by the `mnist1d` package (4000 train / 1000 test signals of length
40). The CNN is the MNIST-1D paper's (Conv1d 1->25 k5 s2, 25->25 k3 s2 twice, ReLU, Dense 125->10)
with its settings (Adam 1e-2, batch 100, 6000 steps); the paper reports 0.92-0.94 test accuracy.

  python -m experiments.mnist1d                            # the CNN
  python -m experiments.mnist1d --config.model.name=mlp    # the MLP 40-100-100-10
"""

import ml_collections

from jdl import config as config_lib
from jdl import experiment


def get_config() -> ml_collections.ConfigDict:
  config = config_lib.base_config()
  config.dataset = "mnist1d"
  config.model.name = "cnn1d"
  config.model.cnn1d = ml_collections.ConfigDict()
  config.model.cnn1d.features = (25, 25, 25)  # channels of the three convolutions
  config.model.cnn1d.kernel_sizes = (5, 3, 3)  # their kernel sizes (stride 2, padding 1)
  config.model.mlp.hidden = (100, 100)  # the paper's MLP, for --config.model.name=mlp
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-2
  config.batch_size = 100
  config.num_steps = 6000  # 150 epochs of 40 steps
  config.eval_every_steps = 1000  # six evaluations on the full test split
  config.cpu_threads = 1  # a model this small trains faster on one CPU thread
  return config


def main() -> None:
  experiment.main(get_config, name="mnist1d")


if __name__ == "__main__":
  main()
