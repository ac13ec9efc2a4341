"""Model FLOPs from XLA's cost analysis, against the formula; peaks and MFU."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdl
from jdl import flops, models
from jdl.models import attention


def test_gpt2_small_train_step_flops_match_the_formula_within_5_percent():
  """GPT-2 small (124M parameters, context 1024, batch 8, bfloat16): the lowered train step's
  FLOPs are 6 N + 12 L T D per token within 5%. Abstract shapes only: nothing is allocated."""
  model = models.TransformerLM(num_classes=50257, block_size=1024, num_layers=12, num_heads=12,
                               width=768, query_chunk=0)
  sample = jnp.zeros((1, 1024), jnp.int32)
  state = jax.eval_shape(lambda key: jdl.create_train_state(model, optax.adamw(1e-4), sample, key),
                         jax.random.key(0))
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  assert 124_000_000 < num_params < 125_000_000
  tokens = jax.ShapeDtypeStruct((8, 1024), jnp.int32)
  measured = flops.step_flops(jdl.make_train_step(compute_dtype=jnp.bfloat16), state,
                              {"input": tokens, "label": tokens})
  expected = flops.transformer_train_flops(num_params, num_layers=12, width=768, context=1024,
                                           tokens=8 * 1024)
  assert measured == pytest.approx(expected, rel=0.05)
  scanned = models.TransformerLM(num_classes=16, block_size=8, num_layers=2, num_heads=2, width=8,
                                 scan_layers=True)
  small = jax.eval_shape(lambda key: jdl.create_train_state(
      scanned, optax.sgd(0.1), jnp.zeros((1, 8), jnp.int32), key), jax.random.key(0))
  few = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  with pytest.raises(ValueError, match="counts a loop's body once"):
    flops.step_flops(jdl.make_train_step(), small, {"input": few, "label": few})


def test_peaks_and_mfu():
  class Device:  # what peak_flops reads of a jax.Device
    device_kind = "NVIDIA H100 80GB HBM3"
  assert flops.peak_flops(Device()) == flops.PEAK_BF16_FLOPS["H100"]
  Device.device_kind = "TPU v5 lite"
  assert flops.peak_flops(Device()) == 197e12
  cpu_peak = flops.peak_flops(jax.devices("cpu")[0])
  assert 1e8 < cpu_peak < 1e14  # measured: a float32 matrix product's rate on this CPU
  assert flops.mfu(1e12, 0.5, num_devices=2, peak_per_device=4e12) == pytest.approx(0.25)
  with pytest.raises(ValueError, match="seconds_per_step > 0"):
    flops.mfu(1e12, 0.0)


def test_gpt2_small_layer_needs_a_quarter_of_the_temporary_memory_of_full_logits_and_scores(
    monkeypatch):
  """One GPT-2-small layer at batch 8, context 1024, bfloat16: with attention a chunk of queries
  at a time and the loss from logits a chunk of positions at a time (`output="hidden"`,
  `tasks.language_model`), the compiled step's temporary memory is at most a quarter of the one
  that holds all `[B, H, T, T]` scores (XLA's attention, `jax.nn.dot_product_attention`) and
  `[B, T, V]` logits. Compiled, never run."""
  tokens = jax.ShapeDtypeStruct((8, 1024), jnp.int32)
  temporary = {}
  for name, query_chunk, output, task in (
      ("whole", 0, "logits", jdl.tasks.classification()),
      ("chunked", None, "hidden", jdl.tasks.language_model())):
    if name == "whole":
      monkeypatch.setattr(attention, "dot_product_attention",
                          lambda q, k, v, *, scale, causal, key_mask_BxS: (
                              jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal)))
    else:
      monkeypatch.undo()
    model = models.TransformerLM(num_classes=50257, block_size=1024, num_layers=1, num_heads=12,
                                 width=768, query_chunk=query_chunk, output=output)
    state = jax.eval_shape(lambda key, m=model: jdl.create_train_state(
        m, optax.adamw(1e-4), jnp.zeros((1, 1024), jnp.int32), key), jax.random.key(0))
    step = jax.jit(jdl.make_train_step(task, compute_dtype=jnp.bfloat16), donate_argnums=0)
    compiled = step.lower(state, {"input": tokens, "label": tokens}).compile()
    temporary[name] = compiled.memory_analysis().temp_size_in_bytes
  assert temporary["chunked"] <= temporary["whole"] / 4, temporary
