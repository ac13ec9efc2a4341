"""Where a training step's time goes: per-operation times of jdl's scanned train step.

  python -m experiments.profile_step --model=seed_mlp      # 784-128-10 MLP, Adam 1e-3, batch 32
  python -m experiments.profile_step --model=mnist1d_cnn   # the MNIST-1D paper's CNN, batch 100

Runs `--steps` training steps (at most one epoch: 1,875 for the MLP, 40 for the CNN, so that
every timed call repeats the same steps of epoch 0) as one device-resident loop, the program
`jdl.fit` runs (`jdl.resident.make_train_chunk`), on random data of the benchmark's shape: first timed without a
profiler (median of `--repeats` calls), then once under `jax.profiler` with XLA:CPU's
per-operation trace events (`--xla_cpu_enable_xprof_traceme`, set here before JAX starts). It
prints the operations that took most time per step, what each computes (the JAX operation XLA
names in its metadata), and how much of the step the operations together account for; the rest
is the executor's own work between operations. Reading the trace needs `xprof` (the bench
extra: `pip install -e ".[bench]"`). The profiler slows every operation a little, so shares
matter more than the absolute numbers.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import tempfile
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_enable_xprof_traceme=true").strip()

# pylint: disable=wrong-import-position
import jax
import numpy as np

import jdl
from jdl import resident

MODELS = ("seed_mlp", "mnist1d_cnn")


def build(model_name: str):
  """(state, train_step, inputs, labels, batch_size) for one of `MODELS`."""
  rng = np.random.default_rng(0)
  if model_name == "seed_mlp":
    inputs = rng.random((60_000, 28, 28, 1), dtype=np.float32)
    model = jdl.models.MLP(hidden=(128,), num_classes=10)
    optimizer, batch_size = {"name": "adam", "learning_rate": 1e-3}, 32
  else:
    from experiments import mnist1d  # pylint: disable=import-outside-toplevel

    config = mnist1d.get_config()
    inputs = rng.normal(size=(4000, 40)).astype(np.float32)
    model = jdl.models.build_model(config.model, num_classes=10)
    optimizer, batch_size = config.optimizer, config.batch_size
  labels = rng.integers(0, 10, len(inputs)).astype(np.int32)
  state = jdl.create_train_state(model, jdl.make_optimizer(optimizer), inputs[:1],
                                 jax.random.PRNGKey(0))
  train_step, _ = jdl.make_classification_steps()
  return state, train_step, inputs, labels, batch_size


def operation_sources(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the JAX operation in its metadata (shortened)."""
  sources = {}
  for match in re.finditer(r"%([\w.\-]+) = .*?op_name=\"([^\"]+)\"", hlo_text):
    path = match.group(2).split("/")
    sources[match.group(1)] = "/".join(p for p in path[-3:] if p not in ("while", "body"))
  return sources


def per_operation_microseconds(trace_dir: str, names: set[str]) -> dict[str, float]:
  """Total microseconds of each HLO operation in the trace written to `trace_dir`."""
  from xprof.convert import raw_to_tool_data  # pylint: disable=import-outside-toplevel

  path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
  data, _ = raw_to_tool_data.xspace_to_tool_data([path], "trace_viewer", {})
  events = json.loads(data if isinstance(data, str) else data.decode())["traceEvents"]
  totals: dict[str, float] = collections.defaultdict(float)
  for event in events:
    if event.get("ph") == "X" and event.get("name") in names:
      totals[event["name"]] += event.get("dur", 0.0)
  return totals


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=MODELS, default="seed_mlp")
  parser.add_argument("--steps", type=int, default=1000, help="capped at one epoch")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--cpu_threads", type=int, default=None,
                      help="XLA CPU threads (jdl.set_cpu_threads); default: the experiment's "
                           "(1 for mnist1d_cnn, one per core for seed_mlp)")
  args = parser.parse_args()
  threads = args.cpu_threads
  if threads is None:  # the experiment's own setting; the seed MLP keeps XLA's default
    from experiments import mnist1d  # pylint: disable=import-outside-toplevel

    threads = mnist1d.get_config().cpu_threads if args.model == "mnist1d_cnn" else 0
  if threads:
    jdl.set_cpu_threads(threads)  # before JAX's first computation

  state, train_step, inputs, labels, batch_size = build(args.model)
  train = resident.ResidentData(*jax.device_put(resident.with_padding_row(inputs, labels)),
                                batch_size=batch_size, shuffle=True, seed=0)
  steps = min(args.steps, train.steps_per_epoch)
  chunk = jax.jit(resident.make_train_chunk(train_step, train, lambda batch: batch),
                  static_argnames=("length",), donate_argnums=(0, 3))
  order = jax.device_put(train.initial_order())
  hlo = chunk.lower(state, train.inputs, train.labels, order, np.int32(0),
                    length=steps).compile().as_text()
  state, _, order = chunk(state, train.inputs, train.labels, order, np.int32(0), length=steps)
  seconds = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    state, sums, order = chunk(state, train.inputs, train.labels, order, np.int32(0),
                               length=steps)
    jax.block_until_ready(sums)
    seconds.append(time.perf_counter() - start)
  step_us = statistics.median(seconds) / steps * 1e6

  sources = operation_sources(hlo)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      state, sums, order = chunk(state, train.inputs, train.labels, order, np.int32(0),
                                 length=steps)
      jax.block_until_ready(sums)
    totals = per_operation_microseconds(trace_dir, set(sources))
  per_step = {name: total / steps for name, total in totals.items()}
  profiled = sum(per_step.values())
  print(f"{args.model}: {steps} steps in one scan on {jax.devices()[0].device_kind}; "
        f"{step_us:.0f} us a step without the profiler, operations {profiled:.0f} us a step "
        "under it")
  print(f"{'us/step':>8} {'share':>6}  {'operation':<28} computes")
  for name, micros in sorted(per_step.items(), key=lambda item: -item[1])[:args.top]:
    print(f"{micros:8.1f} {micros / profiled:6.1%}  {name:<28} {sources[name]}")


if __name__ == "__main__":
  main()
