"""Benchmark: ResNet-50 at 224 x 224 on synthetic images, images/s and MFU, on every device.

`jdl.models.ResNet` (the ImageNet ResNet-50: bottleneck blocks 3-4-6-3, BatchNorm, 1000 classes)
trained by `jdl.make_train_step` with SGD + momentum in the default compute dtype ("auto":
bfloat16 on GPUs and TPUs, float32 on CPUs), the batch split over all devices by jdl's runner.
Two input paths, timed in one run:

  device: one batch of images already on the devices, reused every step: the ceiling.
  host:   a new uint8 batch from host memory every step, prepared by `jdl.prefetch` in a
          background thread (placed on the devices, still uint8) and scaled to [0, 1] by the
          step: what a real input pipeline can reach once decoding keeps up.

Printed: compile time, median step time, images/s for each path and the host path's fraction of
the ceiling, the step's FLOPs (XLA's cost analysis) and the MFU against `jdl.flops.peak_flops`.

  python -m benchmarks.bench_resnet50                      # batch 64 a device
  python -m benchmarks.bench_resnet50 --per_device_batch=128 --steps=30
  python -m benchmarks.bench_resnet50 --tiny               # 32 x 32, width 8: a CPU check
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jdl
from jdl import flops, models, parallel, prefetch


def timed_steps(step, state, batches, count: int, warmup: int) -> tuple[Any, list[float]]:
  """Runs `warmup + count` steps on `batches(i)`; returns the state and the timed step seconds."""
  times = []
  for index in range(warmup + count):
    start = time.perf_counter()
    state, metrics = step(state, batches(index))
    jax.block_until_ready(metrics)
    if index >= warmup:
      times.append(time.perf_counter() - start)
  return state, times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--per_device_batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--tiny", action="store_true", help="32 x 32 images, width 8: a CPU check")
  args = parser.parse_args()
  size, width = (32, 8) if args.tiny else (224, 64)
  runner = parallel.make_runner("auto")  # sharded jit over every device, or plain jit on one
  batch_size = args.per_device_batch * runner.num_devices
  model = models.ResNet(stage_sizes=(3, 4, 6, 3), block="bottleneck", num_classes=1000,
                        width=width, layout="imagenet")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(batch_size, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, 1000, size=(batch_size,), dtype=np.int32)
  tx = optax.sgd(0.1, momentum=0.9)
  state = jdl.create_train_state(model, tx, np.zeros((1, size, size, 3), np.float32),
                                 jax.random.key(0))
  task = jdl.tasks.classification(inputs="image", pixels=True)  # uint8, scaled on the device
  compute_dtype = jdl.step.check_compute_dtype("auto")
  train_step, _ = runner.compile(jdl.make_train_step(task, compute_dtype=compute_dtype), None)
  state = runner.place_state(state)
  on_device = runner.place_batch({"image": images, "label": labels})
  start = time.perf_counter()
  state, metrics = train_step(state, on_device)
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - start

  state, ceiling = timed_steps(train_step, state, lambda _: on_device, args.steps, args.warmup)

  class HostImages:  # a BatchSource of fresh host batches: every step copies its own uint8 batch
    steps_per_epoch = args.steps + args.warmup

    def epoch(self, index):
      del index
      for _ in range(self.steps_per_epoch):
        yield {"image": images.copy(), "label": labels}

  fetcher = prefetch.BatchPrefetcher(HostImages(), runner.place_batch, depth=2)
  try:
    state, host = timed_steps(train_step, state, fetcher.get, args.steps, args.warmup)
  finally:
    fetcher.close()

  step_flops = flops.step_flops(jdl.make_train_step(task, compute_dtype=compute_dtype), state,
                                on_device)
  device = jax.devices()[0]
  seconds, host_seconds = statistics.median(ceiling), statistics.median(host)
  print(f"ResNet-50 ({jdl.count_params(state.params):,} parameters) at {size} x {size}, batch "
        f"{batch_size} on {runner.num_devices} x {device.device_kind}, compute "
        f"{jnp.dtype(compute_dtype).name if compute_dtype else 'float32'}")
  print(f"compile + first step {compile_seconds:.1f} s")
  print(f"device input (ceiling): step {1e3 * seconds:.1f} ms, {batch_size / seconds:,.0f} images/s")
  print(f"host uint8 input:       step {1e3 * host_seconds:.1f} ms, "
        f"{batch_size / host_seconds:,.0f} images/s ({seconds / host_seconds:.2f} of the ceiling)")
  peak = flops.peak_flops(device)
  print(f"step FLOPs {step_flops:.4g}; peak {peak:.3g} FLOP/s a device; MFU "
        f"{100 * flops.mfu(step_flops, seconds, runner.num_devices, peak):.1f}%")


if __name__ == "__main__":
  main()
