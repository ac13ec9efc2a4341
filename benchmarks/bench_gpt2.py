"""Benchmark: a GPT-2-small language model's train step on synthetic tokens, tokens/s and MFU.

GPT-2 small (12 layers, 12 heads, width 768, context 1024, vocabulary 50,257: 124M parameters) as
`jdl.models.TransformerLM`, trained by `jdl.make_train_step` under jit with AdamW, in the
experiments' default compute dtype ("auto": bfloat16 on GPUs and TPUs, float32 on CPUs), on
random token ids already on the device (the input path is not measured). Prints the compile time,
the median step time over `--steps` steps (after `--warmup`), tokens per second, the step's FLOPs
from XLA's cost analysis beside the 6 N + 12 L T D formula, the device's peak (`jdl.flops`) and
the MFU; and whether the compiled program calls a fused attention kernel (cuDNN's on GPUs).

  python -m benchmarks.bench_gpt2                          # on the accelerator, batch 8
  python -m benchmarks.bench_gpt2 --batch=16 --steps=20
  python -m benchmarks.bench_gpt2 --tiny                   # a 2-layer, width-64 check on a CPU
  python -m benchmarks.bench_gpt2 --mesh=fsdp              # parameters and Adam split over devices

`--mesh` lays the state out over every device (`jdl.sharding`): "data" replicates it, "fsdp"
splits it (FSDP), "fsdp_tensor" splits it over fsdp x 2-way tensor; the batch is the global one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jdl
from jdl import flops, models, parallel


MESHES = {"data": {"data": -1}, "fsdp": {"fsdp": -1}, "fsdp_tensor": {"fsdp": -1, "tensor": 2}}


def build(tiny: bool) -> tuple[models.TransformerLM, int]:
  """The model and its context length: GPT-2 small, or a tiny one for a CPU check."""
  if tiny:
    return models.TransformerLM(num_classes=512, block_size=64, num_layers=2, num_heads=4,
                                width=64), 64
  return models.TransformerLM(num_classes=50257, block_size=1024, num_layers=12, num_heads=12,
                              width=768), 1024


def fused_attention_calls(hlo_text: str) -> list[str]:
  """Names of fused attention kernels the compiled program calls (cuDNN's on GPUs)."""
  return sorted({word for word in hlo_text.replace('"', " ").split()
                 if "fmha" in word or "flash" in word.lower()})


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--tiny", action="store_true", help="a 2-layer model, for a CPU check")
  parser.add_argument("--mesh", choices=sorted(MESHES), default=None)
  args = parser.parse_args()
  model, context = build(args.tiny)
  compute_dtype = jdl.step.check_compute_dtype("auto")
  sample = np.zeros((1, context), np.int32)
  runner = (parallel.make_runner("none") if args.mesh is None else
            parallel.make_runner(mesh_shape=MESHES[args.mesh], batch_size=args.batch))
  state = jdl.create_train_state(model, optax.adamw(3e-4), sample, jax.random.key(0),
                                 shardings=runner.state_shardings)
  num_params = jdl.count_params(state.params)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (args.batch, context + 1), 0,
                                         model.num_classes))
  batch = jax.device_put(runner.place_batch({"input": tokens[:, :-1], "label": tokens[:, 1:]}))
  step, _ = runner.compile(jdl.make_train_step(compute_dtype=compute_dtype), None)
  if args.mesh is not None:
    print(runner.plan.describe(state))

  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - start
  step_flops = flops.step_flops(step, state, batch)
  formula = flops.transformer_train_flops(num_params, num_layers=model.num_layers,
                                          width=model.width, context=context,
                                          tokens=args.batch * context)
  times = []
  for index in range(args.warmup + args.steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    if index >= args.warmup:
      times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  device = jax.devices()[0]
  peak = flops.peak_flops(device)
  loss = float(metrics["loss_sum"]) / int(metrics["count"])
  print(f"{'tiny' if args.tiny else 'GPT-2 small'}: {num_params:,} parameters, batch "
        f"{args.batch} x context {context}, compute {jnp.dtype(compute_dtype).name}, on "
        f"{jax.device_count()} x {device.device_kind}")
  print(f"compile {compile_seconds:.1f} s; step {1e3 * seconds:.1f} ms (median of {args.steps}); "
        f"{args.batch * context / seconds:,.0f} tokens/s; loss {loss:.3f}")
  print(f"step FLOPs {step_flops:.4g} (XLA's cost analysis), formula {formula:.4g} "
        f"(ratio {step_flops / formula:.3f}); peak {peak:.3g} FLOP/s per device; "
        f"MFU {100 * flops.mfu(step_flops, seconds, runner.num_devices, peak):.1f}%")
  kernels = fused_attention_calls(compiled.as_text())
  print(f"fused attention kernels in the program: {', '.join(kernels) if kernels else 'none'}")


if __name__ == "__main__":
  main()
