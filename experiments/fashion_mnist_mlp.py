"""The seed tutorial: an MLP 784-128-10 with Adam on Fashion-MNIST.

Flatten -> Dense(128, relu) -> Dense(10) logits; Adam with learning rate 1e-3; sparse categorical
cross-entropy from logits; batch 32; 10 epochs; pixels scaled to [0, 1]; the test accuracy
printed at the end. Expect about 0.88-0.89 test accuracy.

  python -m experiments.fashion_mnist_mlp
  python -m experiments.fashion_mnist_mlp --config.num_epochs=5 --config.data_dir=/data/tfds
"""

import ml_collections

from jdl import config as config_lib
from jdl import experiment


def get_config() -> ml_collections.ConfigDict:
  config = config_lib.base_config()
  config.dataset = "fashion_mnist"
  config.model.name = "mlp"
  config.model.mlp.hidden = (128,)
  config.model.mlp.activation = "relu"
  config.loss = "softmax_cross_entropy"
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-3
  config.batch_size = 32
  config.num_epochs = 10
  return config


def main() -> None:
  experiment.main(get_config, name="fashion_mnist_mlp")


if __name__ == "__main__":
  main()
