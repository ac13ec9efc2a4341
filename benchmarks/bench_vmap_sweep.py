"""Benchmark: a learning-rate sweep of N models trained at once with jax.vmap vs N separate runs.

MNIST-1D, the paper's MLP 40-100-100-10 (or `--model=cnn1d`, its CNN), Adam, batch 100, N learning
rates spaced evenly in log from 1e-4 to 1e-1, every member from seed 0 on the same data order.
Contenders, in one process, `--repeats` times in turn (medians reported):
  vmapped     `jdl.vmap_sweep.train_vmapped`: one compiled program trains all N members, each
              evaluation interval one loop over the device-resident split
  sequential  N runs, one after another, of the same device-resident scanned loop `jdl.fit` uses
              (`jdl.resident.make_train_chunk`), each with `jdl.make_optimizer` at its learning
              rate, so each compiles its own program (the learning rate is part of the optimizer)
  jdl.fit     N runs of `jdl.fit` (total time only: its compilation happens inside)
Compilation (ahead of time, `jit(...).lower(...).compile()`) is timed apart from training plus the
final test evaluation. The data are loaded before any clock starts. Member by member, the last
repeat's vmapped and sequential runs are compared: they compute the same thing, but a batched
matrix product rounds differently from N single ones, and over many steps training amplifies
those differences (fastest at large learning rates), so expect agreement to float rounding for
short runs only, and close, not equal, accuracies after thousands of steps.

  python -m benchmarks.bench_vmap_sweep --members=8 --steps=2000 --repeats=3
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jdl
from jdl import models, resident, vmap_sweep

BATCH = 100


def load_mnist1d(data_dir: str | None) -> tuple[tuple[np.ndarray, np.ndarray],
                                               tuple[np.ndarray, np.ndarray]]:
  """MNIST-1D's train and test arrays, generated offline by jdl's TFDS builder."""
  builder = jdl.data.get_builder("mnist1d", data_dir)
  jdl.data.prepare(builder)
  return jdl.data.load_split_arrays(builder, "train"), jdl.data.load_split_arrays(builder, "test")


def build_model(name: str) -> models.MLP | models.CNN1D:
  """The MNIST-1D paper's MLP or CNN, as jdl's models."""
  if name == "mlp":
    return models.MLP(hidden=(100, 100), num_classes=10)
  if name == "cnn1d":
    return models.CNN1D(features=(25, 25, 25), kernel_sizes=(5, 3, 3), num_classes=10)
  raise ValueError(f"unknown --model={name!r}; expected mlp or cnn1d.")


def run_vmapped(model: nn.Module, rates: list[float], train: jdl.data.ArraySource,
                test: jdl.data.ArraySource, steps: int) -> dict:
  """All members at once: `jdl.vmap_sweep.train_vmapped`."""
  run = vmap_sweep.train_vmapped(model, {"name": "adam"}, train, test, num_steps=steps,
                            learning_rates=rates, seeds=[0], eval_every_steps=steps)
  return {"compile": run.compile_seconds, "train": run.train_seconds,
          "accuracy": np.asarray(run.history[-1]["test_accuracy"]),
          "params": [run.member_state(i).params for i in range(len(rates))]}


def _unchanged(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The batch as it is: on one device there is no sharding to constrain it to."""
  return batch


def run_one(model: nn.Module, rate: float, train: jdl.data.ArraySource, test: jdl.data.ArraySource,
            steps: int) -> tuple[float, float, float, object]:
  """One plain run: `jdl.fit`'s device-resident scanned loop, compiled ahead of time."""
  state = jdl.create_train_state(model, jdl.make_optimizer({"name": "adam", "learning_rate": rate}),
                                 train.inputs[:1], jax.random.PRNGKey(0))
  train_step, eval_step = jdl.make_train_step(), jdl.make_eval_step()
  data = resident.ResidentData(
      *map(jnp.asarray, resident.with_padding_row(train.inputs, train.labels)),
      batch_size=BATCH, shuffle=True, seed=train.seed)
  eval_arrays = tuple(map(jnp.asarray, resident.with_padding_row(test.inputs, test.labels)))
  probe = resident.gather_batch(data.inputs, data.labels, jnp.zeros((BATCH,), jnp.int32))
  loop = not resident.loops_are_slow(train_step, state, probe)
  length = steps if loop else 1  # as `ResidentEngine`: one step a call where loops are slow
  chunk = jax.jit(resident.make_train_chunk(train_step, data, _unchanged, loop=loop),
                  donate_argnums=(0, 3))
  eval_all = resident.make_eval_all(eval_step, test.batch_size, test.num_examples, _unchanged,
                                    loop=loop)
  start = time.perf_counter()
  order = jax.device_put(data.initial_order())
  compiled = chunk.lower(state, data.inputs, data.labels, order, np.int32(0),
                         np.int32(length)).compile()
  if hasattr(eval_all, "lower"):
    eval_all = eval_all.lower(state, *eval_arrays).compile()
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  sums = None
  for step in range(0, steps, length):
    state, chunk_sums, order = compiled(state, data.inputs, data.labels, order, np.int32(step),
                                        np.int32(min(length, steps - step)))
    sums = jdl.merge_metrics(sums, chunk_sums)
  jdl.compute_metrics(sums)  # the train metrics reach the host, as in a real run
  accuracy = jdl.compute_metrics(eval_all(state, *eval_arrays))["accuracy"]
  return compile_seconds, time.perf_counter() - start, accuracy, state.params


def run_sequential(model: nn.Module, rates: list[float], train: jdl.data.ArraySource,
                   test: jdl.data.ArraySource, steps: int) -> dict:
  """The members one after another, each its own compiled program (`run_one`)."""
  results = [run_one(model, rate, train, test, steps) for rate in rates]
  return {"compile": sum(r[0] for r in results), "train": sum(r[1] for r in results),
          "accuracy": np.asarray([r[2] for r in results]), "params": [r[3] for r in results]}


def run_fit(model: nn.Module, rates: list[float], train: jdl.data.ArraySource,
            test: jdl.data.ArraySource, steps: int) -> dict:
  """The members one after another through `jdl.fit` (its compilation inside its time)."""
  start = time.perf_counter()
  accuracies = []
  for rate in rates:
    state = jdl.create_train_state(
        model, jdl.make_optimizer({"name": "adam", "learning_rate": rate}), train.inputs[:1],
        jax.random.PRNGKey(0))
    _, history = jdl.fit(state, jdl.make_train_step(), jdl.make_eval_step(), train, test,
                         num_steps=steps, eval_every_steps=steps, progress=False,
                         runner=jdl.parallel.JitRunner(), device_resident=True)
    accuracies.append(history[-1]["test_accuracy"])
  return {"compile": None, "train": None, "total": time.perf_counter() - start,
          "accuracy": np.asarray(accuracies)}


def _cell(value: float | None, width: int) -> str:
  """A right-aligned number with two decimals, or "-" where there is none."""
  return f"{value:{width}.2f}" if value is not None else "-".rjust(width)


CONTENDERS = {"vmapped": run_vmapped, "sequential": run_sequential, "jdl.fit": run_fit}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--members", type=int, default=8, help="learning rates (models) N")
  parser.add_argument("--steps", type=int, default=2000, help="train steps per model")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--model", default="mlp", choices=("mlp", "cnn1d"))
  parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: TFDS's)")
  parser.add_argument("--skip_fit", action="store_true", help="leave out the jdl.fit contender")
  args = parser.parse_args()
  (x, y), (x_test, y_test) = load_mnist1d(args.data_dir)
  train = jdl.data.ArraySource(x, y, BATCH, shuffle=True, seed=0)
  test = jdl.data.ArraySource(x_test, y_test, 1000, shuffle=False)
  model = build_model(args.model)
  rates = [float(f"{r:.3g}") for r in np.geomspace(1e-4, 1e-1, args.members)]
  names = [n for n in CONTENDERS if not (args.skip_fit and n == "jdl.fit")]
  runs: dict[str, list[dict]] = {name: [] for name in names}
  for repeat in range(args.repeats):
    for name in names:
      result = CONTENDERS[name](model, rates, train, test, args.steps)
      if result.get("total") is None:
        result["total"] = result["compile"] + result["train"]
      runs[name].append(result)
      timing = ", ".join(f"{k} {result[k]:.2f}s" for k in ("compile", "train", "total")
                         if result.get(k) is not None)
      print(f"repeat {repeat + 1}/{args.repeats} {name}: {timing}", flush=True)

  def median(name: str, key: str) -> float | None:
    values = [r[key] for r in runs[name] if r.get(key) is not None]
    return statistics.median(values) if values else None

  device = jax.devices()[0]
  print(f"\nMNIST-1D {args.model}, Adam, batch {BATCH}, {args.steps} steps per model, "
        f"N={args.members} learning rates {rates[0]:g}..{rates[-1]:g}; medians of "
        f"{args.repeats} repeats; {device.platform} ({device.device_kind})")
  print(f"{'contender':<11} {'compile s':>9} {'train s':>8} {'total s':>8} "
        f"{'seq/this train':>14} {'seq/this total':>14}")
  for name in names:
    cells = [_cell(median(name, key), width) for key, width in
             (("compile", 9), ("train", 8), ("total", 8))]
    for key in ("train", "total"):
      value, reference = median(name, key), median("sequential", key)
      cells.append(_cell(reference / value if value and reference else None, 14))
    print(f"{name:<11} " + " ".join(cells))
  vmapped, sequential = runs["vmapped"][-1], runs["sequential"][-1]
  print("\nlast repeat, member by member (the same data order and initialisation):")
  print(f"{'learning rate':>13} {'vmapped acc':>11} {'sequential acc':>14} "
        f"{'max |param diff|':>16}")
  for rate, member, single, vmapped_accuracy, single_accuracy in zip(
      rates, vmapped["params"], sequential["params"], vmapped["accuracy"], sequential["accuracy"]):
    difference = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                     for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(single)))
    print(f"{rate:13g} {vmapped_accuracy:11.4f} {single_accuracy:14.4f} {difference:16.2e}")

if __name__ == "__main__":
  main()
