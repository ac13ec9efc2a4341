"""Regression through the same step, `fit` and logs: scikit-learn's bundled diabetes data.

442 patients, 10 standardised features, a real-valued measure of disease progression a year
later. 20% of the patients (drawn with `config.seed`) are held out; features and target are
standardised with the training part's statistics. A linear model (`hidden=()`) trained by Adam
on the mean squared error should reach the closed-form least-squares fit, printed beside it; an
MLP (`--config.hidden='(32,)'`) shows what a hidden layer adds (little: the relation is almost
linear). The regression task reports MSE, mean absolute error and the largest absolute error.

  python -m experiments.diabetes_regression
  python -m experiments.diabetes_regression --config.hidden='(32,)' --config.num_steps=2000
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

import jdl
from jdl import experiment, models, tasks
from jdl.data import ArraySource


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # the held-out split and the initialisation
  config.hidden = ()  # widths of hidden Dense layers; () is linear regression
  config.optimizer = ml_collections.ConfigDict({"name": "adam", "learning_rate": 0.05})
  config.batch_size = 0  # examples per step; 0: the whole training split (batch gradient descent)
  config.num_steps = 500
  config.eval_every_steps = 100
  config.test_fraction = 0.2  # the held-out share of the patients
  config.progress = True
  config.cpu_threads = 1  # a model this small trains fastest on one CPU thread
  config.compilation_cache_dir = "~/.cache/jdl/xla"  # "" for none
  config.lock()
  return config


def load_diabetes(seed: int, test_fraction: float) -> dict[str, np.ndarray]:
  """The diabetes data split into train and test, standardised with the training statistics;
  targets are `[n, 1]` float32 (the model's output shape)."""
  from sklearn import datasets  # pylint: disable=import-outside-toplevel

  if not 0.0 < test_fraction < 1.0:
    raise jdl.ConfigError(f"config.test_fraction must be in (0, 1); got {test_fraction}.")
  x, y = datasets.load_diabetes(return_X_y=True)
  order = np.random.default_rng(seed).permutation(len(y))
  held_out = int(round(test_fraction * len(y)))
  test, train = order[:held_out], order[held_out:]
  x_mean, x_std = x[train].mean(0), x[train].std(0)
  y_mean, y_std = y[train].mean(), y[train].std()
  scale_x = lambda rows: ((x[rows] - x_mean) / x_std).astype(np.float32)
  scale_y = lambda rows: ((y[rows] - y_mean) / y_std).astype(np.float32)[:, None]
  return {"x_train": scale_x(train), "y_train": scale_y(train), "x_test": scale_x(test),
          "y_test": scale_y(test), "target_std": np.float64(y_std)}


def least_squares_mse(data: dict[str, np.ndarray]) -> tuple[float, float]:
  """Train and test MSE of the closed-form least-squares fit (with an intercept)."""
  design = lambda x: np.concatenate([x, np.ones((len(x), 1), x.dtype)], axis=1).astype(np.float64)
  weights, *_ = np.linalg.lstsq(design(data["x_train"]), data["y_train"], rcond=None)
  mse = lambda x, y: float(np.mean(np.square(design(x) @ weights - y)))
  return mse(data["x_train"], data["y_train"]), mse(data["x_test"], data["y_test"])


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fits the model, writes its records to `workdir` and prints it beside least squares."""
  data = load_diabetes(config.seed, config.test_fraction)
  num_train = len(data["y_train"])
  batch_size = config.batch_size or num_train
  train_data = ArraySource(data["x_train"], data["y_train"], batch_size, shuffle=True,
                           seed=config.seed)
  test_data = ArraySource(data["x_test"], data["y_test"], len(data["y_test"]), shuffle=False)
  model = models.MLP(hidden=tuple(config.hidden), num_classes=1)
  state = jdl.create_train_state(model, jdl.make_optimizer(config.optimizer),
                                 data["x_train"][:1], jax.random.key(config.seed))
  train_step, eval_step = jdl.make_steps(tasks.regression(), check_finite=True)
  with jdl.MetricWriter(workdir) as writer:
    writer.write_config(config)
    state, history = jdl.fit(state, train_step, eval_step, train_data, test_data,
                             num_steps=config.num_steps, eval_every_steps=config.eval_every_steps,
                             writer=writer, progress=config.progress)
  # The model's MSE on the whole training split, as least squares measures it.
  train_mse = jdl.evaluate(state, jax.jit(eval_step),
                           ArraySource(data["x_train"], data["y_train"], num_train,
                                       shuffle=False))["loss"]
  ls_train, ls_test = least_squares_mse(data)
  final = history[-1]
  print(f"\ndiabetes: {num_train} train / {len(data['y_test'])} test patients, standardised "
        f"target (1 unit = {data['target_std']:.1f} of the original scale)")
  print(f"{'model':<22} {'train MSE':>10} {'test MSE':>10} {'test MAE':>10}")
  print(f"{'least squares':<22} {ls_train:>10.4f} {ls_test:>10.4f} {'':>10}")
  name = f"jdl MLP {tuple(config.hidden)}" if config.hidden else "jdl linear (Adam)"
  print(f"{name:<22} {train_mse:>10.4f} {final['test_loss']:>10.4f} "
        f"{final['test_mean_absolute_error']:>10.4f}")
  return {"train_mse": train_mse, "test_mse": final["test_loss"], "least_squares_train_mse":
          ls_train, "least_squares_test_mse": ls_test, "history": history}


def main() -> None:
  experiment.main(get_config, name="diabetes_regression", train=train)


if __name__ == "__main__":
  main()
