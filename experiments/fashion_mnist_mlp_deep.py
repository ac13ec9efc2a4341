"""The seed tutorial's variant with two hidden layers: 784-128-64-10, otherwise unchanged.

  python -m experiments.fashion_mnist_mlp_deep
"""

import ml_collections

from experiments import fashion_mnist_mlp
from jdl import experiment


def get_config() -> ml_collections.ConfigDict:
  config = fashion_mnist_mlp.get_config()
  config.model.mlp.hidden = (128, 64)
  return config


def main() -> None:
  experiment.main(get_config, name="fashion_mnist_mlp_deep")


if __name__ == "__main__":
  main()
