"""Model FLOPs and MFU: how much of the hardware's arithmetic a train step puts to use.

Model FLOPs utilisation (MFU, Chowdhery et al. 2022, appendix B), a step's FLOPs over its time over
the devices' peak, compares across hardware, batch sizes and implementations. XLA's cost analysis
(`step_flops`) matches the textbook count (`transformer_train_flops`) at GPT-2-small's shape.
"""

from __future__ import annotations

import functools
import timeit
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PEAK_BF16_FLOPS = {
    "H100": 989e12,  # SXM, dense
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}
"""Dense bfloat16 peak FLOP/s per chip, by the start of `jax.Device.device_kind` (longest match)."""


def step_flops(step: Callable[..., Any], *args: Any) -> float:
  """FLOPs of one call of `step(*args)`, from XLA's cost analysis of its lowered program (the
  global program's under a mesh); `args` may be `jax.ShapeDtypeStruct`s, as nothing is compiled.

  Raises ValueError for a program with a loop (scanned layers, chunked attention or loss): XLA
  counts a loop's body once, whatever its trip count, so its number would be too low; `fit` then
  logs no MFU rather than a wrong one.
  """
  jitted = step if hasattr(step, "lower") else jax.jit(step)
  lowered = jitted.lower(*args)
  if "stablehlo.while" in lowered.as_text():
    raise ValueError("this step's program loops (scanned layers, or attention or a loss a chunk "
                     "at a time); XLA's cost analysis counts a loop's body once.")
  analysis = lowered.cost_analysis()
  if not analysis or "flops" not in analysis:
    raise ValueError("XLA's cost analysis of this step reports no FLOPs.")
  return float(analysis["flops"])


def transformer_train_flops(num_params: int, *, num_layers: int, width: int, context: int,
                            tokens: int) -> float:
  """Training FLOPs of a decoder transformer for `tokens` tokens: `6 N` per token for the
  parameters' products (forward 2 N, backward 4 N) plus `12 L T D` for attention at context T
  (Kaplan et al. 2020; Chowdhery et al. 2022, appendix B)."""
  return float(tokens) * (6.0 * num_params + 12.0 * num_layers * context * width)


def peak_flops(device: jax.Device | None = None) -> float:
  """The peak FLOP/s of one device: the table's dense bfloat16 peak for a known accelerator, or,
  for a CPU (and any device the table lacks), the float32 matrix-product rate measured on it."""
  device = device or jax.devices()[0]
  kind = device.device_kind
  matches = [name for name in PEAK_BF16_FLOPS if kind.startswith(name) or name in kind]
  if matches:
    return PEAK_BF16_FLOPS[max(matches, key=len)]
  return _measured_peak(device)


@functools.lru_cache(maxsize=None)
def _measured_peak(device: jax.Device, size: int = 1024, repeats: int = 5) -> float:
  """The best rate of a `size`^3 float32 matrix product on `device`, over `repeats` runs."""
  a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
  product = jax.jit(lambda x: x @ x)
  product(a).block_until_ready()  # compiled, warmed
  best = min(timeit.repeat(lambda: product(a).block_until_ready(), number=1, repeat=repeats))
  return 2.0 * size ** 3 / best


def mfu(flops_per_step: float, seconds_per_step: float, num_devices: int = 1,
        peak_per_device: float | None = None) -> float:
  """Model FLOPs utilisation: `flops_per_step / seconds_per_step / (num_devices * peak)`."""
  if seconds_per_step <= 0 or num_devices < 1:
    raise ValueError(f"mfu needs seconds_per_step > 0 and num_devices >= 1; got "
                     f"{seconds_per_step} and {num_devices}.")
  peak = peak_per_device if peak_per_device is not None else peak_flops()
  return flops_per_step / seconds_per_step / (num_devices * peak)
