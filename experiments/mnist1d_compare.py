"""What depth and convolution buy: logistic regression vs the residual MLP vs the CNN on MNIST-1D.

The MNIST-1D paper's three models with its settings (Adam 1e-2, batch 100, 6000 steps), each
trained from several seeds on the same data; prints a table of test accuracy (mean, standard
deviation, worst and best over the seeds) and wall time. The paper reports about 0.32 (logistic),
0.68 (MLP) and 0.94 (CNN) from single runs; the MLP overfits and its final accuracy moves by
about +-0.02 from seed to seed, so one seed alone says little.

  python -m experiments.mnist1d_compare
  python -m experiments.mnist1d_compare --config.seeds='(0,)' --config.models='("logistic", "cnn1d")'
"""

import os
import statistics
import time

import ml_collections

from experiments import mnist1d
from jdl import config as config_lib
from jdl import experiment
from jdl.experiment import train_and_evaluate


def get_config() -> ml_collections.ConfigDict:
  config = mnist1d.get_config()
  config.models = ("logistic", "residual_mlp", "cnn1d")  # trained in this order
  config.seeds = (0, 1, 2, 3, 4)  # every model is trained once per seed
  config.model.logistic = ml_collections.ConfigDict()  # Flatten -> Dense(10)
  config.model.residual_mlp = ml_collections.ConfigDict()
  config.model.residual_mlp.width = 100  # 40 -> 100, residual 100 -> 100, -> 10
  config.eval_every_steps = 0  # evaluate after every epoch (40 steps)
  config.progress = False  # one table at the end instead of a progress bar per run
  return config


def compare(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Trains each model of `config.models` from each seed of `config.seeds` (one workdir per run,
  `<workdir>/<model>/seed<k>`) and prints the comparison table; returns one row per model."""
  if not config.seeds:
    raise config_lib.ConfigError("config.seeds is empty; give at least one seed, e.g. (0,).")
  rows = []
  for name in config.models:
    accuracies, seconds = [], []
    for seed in config.seeds:
      run = config_lib.apply_overrides(config, [f"model.name={name}", f"seed={seed}"])
      start = time.perf_counter()
      _, history = train_and_evaluate(run, os.path.join(workdir, name, f"seed{seed}"))
      seconds.append(time.perf_counter() - start)
      accuracies.append(history[-1]["test_accuracy"])
    rows.append({
        "model": name, "test_accuracy": statistics.fmean(accuracies),
        "std": statistics.pstdev(accuracies), "worst": min(accuracies), "best": max(accuracies),
        "accuracies": accuracies, "seconds": statistics.median(seconds),
        "steps": history[-1]["step"],
    })
  print(f"\nMNIST-1D, {rows[0]['steps']} steps of batch {config.batch_size}, "
        f"{config.optimizer.name} {config.optimizer.learning_rate:g}, seeds {tuple(config.seeds)}")
  print(f"{'model':<14} {'test accuracy':>13} {'std':>6} {'worst':>6} {'best':>6} "
        f"{'s/run':>6}")
  for row in rows:
    print(f"{row['model']:<14} {row['test_accuracy']:13.4f} {row['std']:6.3f} "
          f"{row['worst']:6.3f} {row['best']:6.3f} {row['seconds']:6.1f}")
  return rows


def main() -> None:
  experiment.main(get_config, name="mnist1d_compare", train=compare)


if __name__ == "__main__":
  main()
