"""Where a training step's time goes: per-operation times of the program `jdl.fit` runs.

  python -m benchmarks.profile_step --model=seed_mlp      # 784-128-10 MLP, Adam 1e-3, batch 32
  python -m benchmarks.profile_step --model=mnist1d_cnn   # the MNIST-1D paper's CNN, batch 100
  python -m benchmarks.profile_step --model=seed_mlp --no_check_finite   # without the NaN watch

With the experiment's CPU thread count (`cpu_threads`; `--cpu_threads` overrides it), runs
`--steps` training steps (at most one epoch: 1,875 for the MLP, 40 for the CNN, so that every
timed call repeats the same steps of epoch 0) with the program `jdl.fit` runs on device-resident
data: `jdl.resident.make_train_chunk` jitted with `donate_argnums=(0, 3)` (state and carried order
donated), all the steps in one call, or one step a call without a loop where a loop would be slow
(`jdl.resident.loops_are_slow`: the CNN on a CPU). Its step is `jdl.make_steps()`'s, the NaN/inf
watch over the loss included unless `--no_check_finite`; the data are random,
of the benchmark's shape. The steps are first timed without a profiler (median of `--repeats`
runs), then run once under `jax.profiler` and read back with JAX's own reader
(`jax.profiler.ProfileData`). On the CPU the trace holds XLA:CPU's per-operation events
(`--xla_cpu_enable_xprof_traceme`, set here before JAX starts); on a GPU, its kernels. It prints
the operations that took most time per step, what each computes (the JAX operation XLA names in
its metadata, where the name matches one), and the device-only time of a step: how long something
ran on the device, against the step's time without the profiler; the rest is the executor's own
work between operations (on a GPU: launches and the loop's control; with one call a step, the
dispatch too). The profiler slows every operation a little, so shares matter more than the
absolute numbers. It also prints the system (OS kernel) time and the page faults of a timed step:
a program that faults its buffers in on every run shows there (see
`jdl.experiment.reuse_host_memory`, which the experiments apply on a CPU, as this does through
`jdl.experiment.configure_process`).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import resource
import statistics
import tempfile
import time
from typing import Any

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_enable_xprof_traceme=true").strip()

# pylint: disable=wrong-import-position
import jax
import ml_collections
import numpy as np

import jdl
from jdl import resident

MODELS = ("seed_mlp", "mnist1d_cnn")
CONTAINER = re.compile(r"(while|conditional|call)(\.\d+)?$")
"""HLO operations whose profiler events contain those of the operations they run."""


def build(model_name: str, *, check_finite: bool = True
          ) -> tuple[jdl.TrainState, Any, np.ndarray, np.ndarray, int]:
  """(state, train_step, inputs, labels, batch_size) for one of `MODELS`."""
  rng = np.random.default_rng(0)
  if model_name == "seed_mlp":
    inputs = rng.random((60_000, 28, 28, 1), dtype=np.float32)
    model = jdl.models.MLP(hidden=(128,), num_classes=10)
    optimizer, batch_size = {"name": "adam", "learning_rate": 1e-3}, 32
  else:
    config = experiment_config(model_name)
    inputs = rng.normal(size=(4000, 40)).astype(np.float32)
    model = jdl.models.build_model(config.model, num_classes=10)
    optimizer, batch_size = config.optimizer, config.batch_size
  labels = rng.integers(0, 10, len(inputs)).astype(np.int32)
  state = jdl.create_train_state(model, jdl.make_optimizer(optimizer), inputs[:1],
                                 jax.random.PRNGKey(0))
  train_step, _ = jdl.make_steps(check_finite=check_finite)
  return state, train_step, inputs, labels, batch_size


def experiment_config(model_name: str) -> ml_collections.ConfigDict:
  """The config of the experiment that trains `model_name`: its CPU settings are profiled."""
  # pylint: disable=import-outside-toplevel
  from experiments import fashion_mnist_mlp, mnist1d

  return (fashion_mnist_mlp if model_name == "seed_mlp" else mnist1d).get_config()


def operation_sources(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the JAX operation in its metadata (shortened)."""
  sources = {}
  for match in re.finditer(r"%([\w.\-]+) = .*?op_name=\"([^\"]+)\"", hlo_text):
    path = match.group(2).split("/")
    sources[match.group(1)] = "/".join(p for p in path[-3:] if p not in ("while", "body"))
  return sources


def trace_events(trace_dir: str) -> list[tuple[str, str, int, int]]:
  """`(plane, name, start_ns, duration_ns)` of every event in the trace written to `trace_dir`,
  read with JAX's own reader (`jax.profiler.ProfileData`)."""
  path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
  events = []
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      events.extend((plane.name, event.name, int(event.start_ns), int(event.duration_ns))
                    for event in line.events)
  return events


def busy_nanoseconds(intervals: list[tuple[int, int]]) -> int:
  """Length of the union of `(start, duration)` intervals: time during which something ran."""
  total, end = 0, None
  for start, duration in sorted(intervals):
    stop = start + duration
    if end is None or start > end:
      total += duration
      end = stop
    elif stop > end:
      total += stop - end
      end = stop
  return total


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=MODELS, default="seed_mlp")
  parser.add_argument("--steps", type=int, default=1000, help="capped at one epoch")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--cpu_threads", type=int, default=None,
                      help="XLA CPU threads (config.cpu_threads); default: the "
                           "experiment's (1 for mnist1d_cnn, one per core for seed_mlp)")
  parser.add_argument("--no_check_finite", action="store_true",
                      help="profile the step without its NaN/inf watch (make_steps(check_finite="
                           "False)), to see what the watch costs")
  args = parser.parse_args()
  config = experiment_config(args.model)
  if args.cpu_threads is not None:  # else the experiment's (the seed MLP's: XLA's default)
    config.cpu_threads = args.cpu_threads
  # Before JAX's first computation, as the experiment: its threads and, on a CPU, host memory.
  jdl.experiment.configure_process(config)

  state, train_step, inputs, labels, batch_size = build(args.model,
                                                        check_finite=not args.no_check_finite)
  train = resident.ResidentData(*jax.device_put(resident.with_padding_row(inputs, labels)),
                                batch_size=batch_size, shuffle=True, seed=0)
  steps = min(args.steps, train.steps_per_epoch)
  # The program `jdl.resident.ResidentEngine` builds for `fit`: state and order donated; one loop
  # over the steps, or, where loops are slow (a convolution on the CPU), one step a call.
  probe = jax.eval_shape(resident.gather_batch, train.inputs, train.labels,
                         jax.ShapeDtypeStruct((batch_size,), np.int32))
  loop = not resident.loops_are_slow(train_step, state, probe)
  chunk = jax.jit(resident.make_train_chunk(train_step, train, loop=loop), donate_argnums=(0, 3))
  calls = [(np.int32(0), np.int32(steps))] if loop else [
      (np.int32(step), np.int32(1)) for step in range(steps)]
  order = jax.device_put(train.initial_order())
  hlo = chunk.lower(state, train.inputs, train.labels, order, *calls[0]).compile().as_text()

  def run(state: jdl.TrainState, order: resident.EpochOrder
          ) -> tuple[jdl.TrainState, resident.EpochOrder]:
    """The `steps` steps of epoch 0, as `fit` calls them; returns when they are done."""
    for first, length in calls:
      state, sums, order = chunk(state, train.inputs, train.labels, order, first, length)
    jax.block_until_ready(sums)
    return state, order

  state, order = run(state, order)
  seconds = []
  usage = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(args.repeats):
    start = time.perf_counter()
    state, order = run(state, order)
    seconds.append(time.perf_counter() - start)
  step_us = statistics.median(seconds) / steps * 1e6
  after = resource.getrusage(resource.RUSAGE_SELF)
  timed_steps = args.repeats * steps
  kernel_us = (after.ru_stime - usage.ru_stime) / timed_steps * 1e6
  faults = (after.ru_minflt - usage.ru_minflt) / timed_steps

  sources = operation_sources(hlo)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      state, order = run(state, order)
    events = trace_events(trace_dir)
  # On an accelerator its kernels (and copies) lie on the device's planes; on the CPU the HLO
  # operations are events of the host's threads, named as in the compiled program.
  device_events = [e for e in events if e[0].startswith("/device:") and "CPU" not in e[0]]
  if not device_events:
    device_events = [e for e in events if e[1] in sources]
  # A loop's event spans its body's operations: count the operations, not the loop as well.
  device_events = [e for e in device_events if not CONTAINER.match(e[1])]
  totals: dict[str, float] = collections.defaultdict(float)
  for _, name, _, duration in device_events:
    totals[name] += duration / 1e3
  per_step = {name: total / steps for name, total in totals.items()}
  profiled = sum(per_step.values())
  busy_us = busy_nanoseconds([(e[2], e[3]) for e in device_events]) / 1e3 / steps
  device = jax.devices()[0]
  watch = "without" if args.no_check_finite else "with"
  calls_text = "in one loop" if loop else "one call each (no loop: see loops_are_slow)"
  print(f"{args.model}: {steps} steps {calls_text} on {device.device_kind} ({device.platform}), "
        f"{watch} the NaN/inf watch; {step_us:.1f} us a step without the profiler; under it the "
        f"operations take {profiled:.1f} us a step, and something runs {busy_us:.1f} us of each "
        f"step ({busy_us / step_us:.0%} of the unprofiled step); system (OS kernel) time "
        f"{kernel_us:.1f} us and {faults:.1f} page faults a step")
  print(f"{'us/step':>8} {'share':>6}  {'operation':<40} computes")
  for name, micros in sorted(per_step.items(), key=lambda item: -item[1])[:args.top]:
    print(f"{micros:8.1f} {micros / profiled:6.1%}  {name[:40]:<40} {sources.get(name, '')}")


if __name__ == "__main__":
  main()
