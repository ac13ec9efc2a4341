"""What depth and convolution buy: logistic regression vs the residual MLP vs the CNN on MNIST-1D.

The MNIST-1D paper's three models with its settings (Adam 1e-2, batch 100, 6000 steps), trained
one after the other on the same data and seed; prints a table of test accuracy and wall time.
The paper reports about 0.32 (logistic), 0.68 (MLP) and 0.94 (CNN).

  python -m experiments.mnist1d_compare
  python -m experiments.mnist1d_compare --config.num_steps=2000 --config.models='("logistic", "cnn1d")'
"""

import os
import time

import ml_collections

from experiments import mnist1d
from jdl import config as config_lib
from jdl.loop import train_and_evaluate


def get_config() -> ml_collections.ConfigDict:
  config = mnist1d.get_config()
  config.models = ("logistic", "residual_mlp", "cnn1d")  # trained in this order
  config.model.logistic = ml_collections.ConfigDict()  # Flatten -> Dense(10)
  config.model.residual_mlp = ml_collections.ConfigDict()
  config.model.residual_mlp.width = 100  # 40 -> 100, residual 100 -> 100, -> 10
  config.eval_every_steps = 0  # evaluate after every epoch (40 steps)
  config.progress = False  # one table at the end instead of a progress bar per model
  return config


def compare(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Trains each model of `config.models` (one workdir each) and prints the comparison table."""
  rows = []
  for name in config.models:
    run = config_lib.apply_overrides(config, [f"model.name={name}"])
    start = time.perf_counter()
    _, history = train_and_evaluate(run, os.path.join(workdir, name))
    rows.append({"model": name, "test_accuracy": history[-1]["test_accuracy"],
                 "seconds": time.perf_counter() - start, "steps": history[-1]["step"]})
  print(f"\nMNIST-1D, {rows[0]['steps']} steps of batch {config.batch_size}, "
        f"{config.optimizer.name} {config.optimizer.learning_rate:g}, seed {config.seed}")
  print(f"{'model':<14} {'test accuracy':>13} {'seconds':>8}")
  for row in rows:
    print(f"{row['model']:<14} {row['test_accuracy']:13.4f} {row['seconds']:8.1f}")
  return rows


def main() -> None:
  config_lib.main(get_config, name="mnist1d_compare", train=compare)


if __name__ == "__main__":
  main()
