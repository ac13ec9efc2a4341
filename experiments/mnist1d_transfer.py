"""Transfer learning on MNIST-1D: pretrain on digits 0-4, then learn digits 5-9 from a few labels.

The MNIST-1D paper's CNN is pretrained on the training signals of digits 0-4 (about 2000; Adam
1e-2, batch 100). The new task is digits 5-9, relabelled 0-4, learnt from only `shots` labelled
training signals per class and evaluated on every test signal of digits 5-9 (about 500). The new
task has as many classes as the old one, so the head would fit; it is re-initialised all the same
(`skip`), because its classes now mean other digits. Methods, all with the same optimizer, steps
and full-batch training, from the same initialisation of the head:

  frozen          pretrained convolutions, frozen (`jdl.transfer.freeze`); only the head trains
  finetune        pretrained convolutions and the new head, all trained
  finetune_lowlr  the same, the convolutions' learning rate times `backbone_lr_factor`
                  (`jdl.transfer.per_group_optimizer`)
  scratch         the same model from a random initialisation

Every seed pretrains its own model and draws its own labelled examples (the smaller `shots` are
a subset of the larger); the table shows the mean, spread and range of test accuracy over the
seeds and the seconds per fine-tuning run (compilation included).

  python -m experiments.mnist1d_transfer
  python -m experiments.mnist1d_transfer --config.finetune.shots='(5, 50)' --config.seeds='(0,)'
  python -m experiments.mnist1d_transfer --config.model.name=mlp   # the paper's MLP instead
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import ml_collections
import numpy as np
from ml_collections import config_dict

import jdl
from jdl import config as config_lib
from jdl import experiment
from jdl import data as data_lib
from jdl import models, transfer

METHODS = ("frozen", "finetune", "finetune_lowlr", "scratch")


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.data_dir = config_dict.placeholder(str)  # TFDS data dir for the generated MNIST-1D
  config.source_classes = (0, 1, 2, 3, 4)  # digits of the pretraining task
  config.target_classes = (5, 6, 7, 8, 9)  # digits of the new task, relabelled 0, 1, ...
  config.model = ml_collections.ConfigDict()
  config.model.name = "cnn1d"  # or "mlp"
  config.model.cnn1d = ml_collections.ConfigDict()
  config.model.cnn1d.features = (25, 25, 25)  # the paper's CNN
  config.model.cnn1d.kernel_sizes = (5, 3, 3)
  config.model.mlp = ml_collections.ConfigDict()
  config.model.mlp.hidden = (100, 100)  # the paper's MLP
  config.head = ()  # patterns of the head (re-initialised); (): the model's last module
  config.pretrain = ml_collections.ConfigDict()
  config.pretrain.learning_rate = 1e-2  # Adam, the paper's setting
  config.pretrain.batch_size = 100
  config.pretrain.num_steps = 2000  # 100 epochs of the ~2000 pretraining signals
  config.finetune = ml_collections.ConfigDict()
  config.finetune.shots = (10, 20)  # labelled training signals per new class
  config.finetune.learning_rate = 1e-3  # Adam, every method
  config.finetune.num_steps = 300  # full-batch steps
  config.finetune.backbone_lr_factor = 0.1  # finetune_lowlr: the backbone's learning-rate factor
  config.methods = METHODS  # compared in this order
  config.seeds = (0, 1, 2)  # each seed: its own pretraining, labelled examples and head init
  return config


def _task(inputs: np.ndarray, labels: np.ndarray,
          classes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """The examples of `classes`, relabelled by their position in `classes`."""
  keep = np.isin(labels, classes)
  relabel = np.full(int(labels.max()) + 1, -1, np.int32)
  relabel[list(classes)] = np.arange(len(classes), dtype=np.int32)
  return inputs[keep], relabel[labels[keep]]


def _per_class_order(labels: np.ndarray, num_classes: int, seed: int) -> list[np.ndarray]:
  """A seeded permutation of each class's example indices; the first k of each are k shots."""
  rng = np.random.default_rng(seed)
  return [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]


def _fit(state: jdl.TrainState, train: tuple[np.ndarray, np.ndarray],
         test: tuple[np.ndarray, np.ndarray], *, batch_size: int, num_steps: int,
         seed: int) -> tuple[jdl.TrainState, float, float]:
  """`(state, test accuracy, seconds)` after `num_steps` steps, evaluated once at the end."""
  train_step, eval_step = jdl.make_steps(jdl.tasks.classification("softmax_cross_entropy"))
  start = time.perf_counter()
  state, history = jdl.fit(
      state, train_step, eval_step,
      data_lib.ArraySource(*train, batch_size, shuffle=True, seed=seed),
      data_lib.ArraySource(*test, 500, shuffle=False),
      num_steps=num_steps, eval_every_steps=num_steps, progress=False)
  return state, history[-1]["test_accuracy"], time.perf_counter() - start


def _optimizer(method: str, config: ml_collections.ConfigDict, params: jdl.state.Params,
               backbone: tuple[str, ...]):
  settings = {"name": "adam", "learning_rate": config.finetune.learning_rate}
  if method == "frozen":
    return transfer.freeze(jdl.make_optimizer(settings), params, backbone)
  if method == "finetune_lowlr":
    low = config.finetune.learning_rate * config.finetune.backbone_lr_factor
    return transfer.per_group_optimizer([("backbone", backbone, {"learning_rate": low})], params,
                                        default=settings)
  if method in ("finetune", "scratch"):
    return jdl.make_optimizer(settings)
  raise config_lib.ConfigError(f"unknown method {method!r} in config.methods; expected one of "
                               f"{METHODS}.")


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Pretrains and fine-tunes as the module docstring says, prints the table, writes
  `results.json` into `workdir` and returns one row per (shots, method)."""
  if not config.seeds:
    raise config_lib.ConfigError("config.seeds is empty; give at least one seed, e.g. (0,).")
  unknown = sorted(set(config.methods) - set(METHODS))
  if unknown:
    raise config_lib.ConfigError(f"unknown methods {unknown} in config.methods; expected some of "
                                 f"{METHODS}.")
  builder = data_lib.get_builder("mnist1d", config.data_dir)
  data_lib.prepare(builder)  # generated offline
  x_train, y_train = data_lib.load_split_arrays(builder, "train")
  x_test, y_test = data_lib.load_split_arrays(builder, "test")
  source_train = _task(x_train, y_train, tuple(config.source_classes))
  source_test = _task(x_test, y_test, tuple(config.source_classes))
  target_pool = _task(x_train, y_train, tuple(config.target_classes))
  target_test = _task(x_test, y_test, tuple(config.target_classes))
  num_target = len(config.target_classes)
  sample = x_train[:1]

  pretrain_model = models.build_model(config.model, num_classes=len(config.source_classes))
  target_model = models.build_model(config.model, num_classes=num_target)
  params = jdl.create_train_state(target_model, jdl.make_optimizer({}), sample,
                                  jax.random.PRNGKey(0)).params
  modules = list(params)
  head = tuple(config.head) or (modules[-1],)
  backbone = tuple(m for m in modules if not any(transfer.path_matches(m, p) for p in head))
  if not backbone:
    raise config_lib.ConfigError(f"config.head {head} covers every module of the model "
                                 f"({modules}); nothing would be transferred.")

  pretrain_accuracy, pretrain_seconds, reported = [], [], False
  results: dict[tuple[int, str], dict[str, list[float]]] = {
      (shots, method): {"accuracies": [], "seconds": []}
      for shots in config.finetune.shots for method in config.methods}
  for seed in config.seeds:
    key = jax.random.PRNGKey(seed)
    pretrain_state = jdl.create_train_state(
        pretrain_model, jdl.make_optimizer({"name": "adam",
                                            "learning_rate": config.pretrain.learning_rate}),
        sample, key)
    pretrained, accuracy, seconds = _fit(
        pretrain_state, source_train, source_test, batch_size=config.pretrain.batch_size,
        num_steps=config.pretrain.num_steps, seed=seed)
    pretrain_accuracy.append(accuracy)
    pretrain_seconds.append(seconds)
    order = _per_class_order(target_pool[1], num_target, seed)
    for shots in config.finetune.shots:
      chosen = np.concatenate([indices[:shots] for indices in order])
      labelled = (target_pool[0][chosen], target_pool[1][chosen])
      for method in config.methods:
        tx = _optimizer(method, config, params, backbone)
        # The same head (and scratch backbone) initialisation for every method of this seed.
        state = jdl.create_train_state(target_model, tx, sample, jax.random.fold_in(key, 1))
        if method != "scratch":
          state, report = transfer.load_pretrained_state(state, pretrained, skip=head)
          if not reported:  # the same for every seed and method: show it once
            print(f"pretrained -> new task: {report}")
            reported = True
        _, accuracy, seconds = _fit(state, labelled, target_test, batch_size=len(chosen),
                                    num_steps=config.finetune.num_steps, seed=seed)
        results[shots, method]["accuracies"].append(accuracy)
        results[shots, method]["seconds"].append(seconds)

  rows = [{"shots": shots, "method": method, "test_accuracy": statistics.fmean(r["accuracies"]),
           "std": statistics.pstdev(r["accuracies"]), "worst": min(r["accuracies"]),
           "best": max(r["accuracies"]), "accuracies": r["accuracies"],
           "seconds": statistics.fmean(r["seconds"])}
          for (shots, method), r in results.items()]
  print(f"\nMNIST-1D transfer, {config.model.name}: pretrained on digits "
        f"{tuple(config.source_classes)} ({len(source_train[1])} signals, "
        f"{config.pretrain.num_steps} steps): test accuracy there "
        f"{statistics.fmean(pretrain_accuracy):.4f}, "
        f"{statistics.fmean(pretrain_seconds):.1f} s/run")
  print(f"new task: digits {tuple(config.target_classes)} from `shots` labelled signals each, "
        f"tested on {len(target_test[1])}; head {head} re-initialised; Adam "
        f"{config.finetune.learning_rate:g}, {config.finetune.num_steps} full-batch steps; "
        f"seeds {tuple(config.seeds)}")
  print(f"{'shots':>5}  {'method':<15} {'test accuracy':>13} {'std':>6} {'worst':>6} "
        f"{'best':>6} {'s/run':>6}")
  for row in rows:
    print(f"{row['shots']:>5}  {row['method']:<15} {row['test_accuracy']:13.4f} {row['std']:6.3f} "
          f"{row['worst']:6.3f} {row['best']:6.3f} {row['seconds']:6.1f}")
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
    json.dump({"config": config.to_dict(), "pretrain_test_accuracy": pretrain_accuracy,
               "rows": rows}, f, indent=2, default=str)
  return rows


def main() -> None:
  experiment.main(get_config, name="mnist1d_transfer", train=run)


if __name__ == "__main__":
  main()
