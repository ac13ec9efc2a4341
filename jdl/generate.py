"""Autoregressive sampling from a causal language model.

`generate` runs one jitted `lax.fori_loop` over a fixed-size token buffer, so a call compiles once
whatever the number of new tokens; each step reruns the model on the last `block_size` tokens (no
KV cache). Shapes: B batch, T0 prompt length, N new tokens, V vocabulary size, W the window.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ApplyFn = Callable[..., jax.Array]
"""`apply_fn(variables, tokens [B, T], train=False) -> logits [B, T, V]`, e.g. `model.apply`."""


def _is_int(value: Any) -> bool:
  """A Python or numpy integer, not a bool (so it can be a static argument)."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_top_k(top_k: int | None, vocab_size: int) -> None:
  if top_k is None:
    return
  if not _is_int(top_k):
    raise ValueError(f"top_k must be an integer in [1, {vocab_size}] or None; got {top_k!r}.")
  if not 1 <= top_k <= vocab_size:
    raise ValueError(f"top_k must be in [1, vocabulary size {vocab_size}]; got {top_k}.")


def _check_temperature(temperature: float) -> float:
  try:
    value = float(temperature)
  except (TypeError, ValueError):
    value = float("nan")
  if not 0.0 <= value < float("inf"):  # also rejects NaN
    raise ValueError(
        f"temperature must be a finite number >= 0 (0 is greedy); got {temperature!r}.")
  return value


def top_k_logits(logits: jax.Array, k: int) -> jax.Array:
  """Keeps the `k` (in [1, V]) largest logits along the last axis and sets the others to -inf;
  exactly k survive per row, among equal logits the lower index (`lax.top_k`'s order)."""
  vocab_size = logits.shape[-1]
  _check_top_k(k, vocab_size)
  if k == vocab_size:
    return logits
  _, indices = jax.lax.top_k(logits, k)
  keep = jnp.put_along_axis(jnp.zeros(logits.shape, bool), indices, True, axis=-1, inplace=False)
  return jnp.where(keep, logits, -jnp.inf)


def sample_next(logits: jax.Array, key: jax.Array, temperature: float = 1.0,
                top_k: int | None = None) -> jax.Array:
  """`[B]` int32 tokens sampled from `softmax(top_k_logits(logits [B, V], top_k) / temperature)`;
  temperature 0 is greedy argmax (`key` unused), and `top_k` None samples from all V."""
  if logits.ndim != 2:
    raise ValueError(f"sample_next expects logits [batch, vocab]; got shape {logits.shape}.")
  temperature = _check_temperature(temperature)
  if top_k is not None:
    logits = top_k_logits(logits, top_k)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits.astype(jnp.float32) / temperature
  return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


def generate(model: nn.Module | ApplyFn, variables: Any, prompt_tokens: jax.Array | np.ndarray, *,
             num_new_tokens: int, key: jax.Array, temperature: float = 1.0,
             top_k: int | None = None, block_size: int | None = None,
             greedy: bool = False) -> jax.Array:
  """Extends each prompt (`[B, T0]` ids) by N = `num_new_tokens` tokens: `[B, T0 + N]` int32.

  The model must be causal: each step feeds a window of W = min(block_size, T0 + N) tokens, which
  early on holds unfilled slots after the current position. `model` is a linen Module (its
  `block_size` the default) or an `ApplyFn`, a static argument of the jitted loop (pass the same
  object every call). Step i samples as `sample_next` with `fold_in(key, i)`; `greedy` is argmax.
  """
  module = model if isinstance(model, nn.Module) else getattr(model, "__self__", None)
  if isinstance(module, nn.Module) and getattr(module, "output", None) == "hidden":
    model = module.clone(output="logits")  # trained by the chunked loss: sampled from logits
  if isinstance(model, nn.Module):
    apply_fn = model.apply
    if block_size is None:
      block_size = getattr(model, "block_size", None)
  elif callable(model):
    apply_fn = model
  else:
    raise ValueError(
        f"model must be a linen Module or an apply function; got {type(model).__name__}.")
  if block_size is None:
    raise ValueError("generate needs block_size (the model's longest context); this model has no "
                     "block_size attribute.")
  if not _is_int(block_size) or block_size < 1:
    raise ValueError(f"block_size must be an integer >= 1; got {block_size!r}.")
  if not _is_int(num_new_tokens) or num_new_tokens < 0:
    raise ValueError(f"num_new_tokens must be an integer >= 0; got {num_new_tokens!r}.")
  temperature = 0.0 if greedy else _check_temperature(temperature)
  prompt = jnp.asarray(prompt_tokens)
  if prompt.ndim != 2:
    raise ValueError(f"prompt_tokens must be token ids [batch, length]; got shape {prompt.shape}.")
  if prompt.shape[0] < 1 or prompt.shape[1] < 1:
    raise ValueError(f"prompt_tokens is empty (shape {prompt.shape}); generation needs at least "
                     "one token per row to condition on.")
  if not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"prompt_tokens must be integer token ids; got dtype {prompt.dtype}.")
  _check_top_k(top_k, np.iinfo(np.int32).max)  # type and >= 1 now; <= V once V is known
  if num_new_tokens == 0:
    return prompt.astype(jnp.int32)
  return _generate(apply_fn, variables, prompt.astype(jnp.int32), key,
                   num_new_tokens=int(num_new_tokens), temperature=temperature, top_k=top_k,
                   block_size=int(block_size))


@functools.partial(
    jax.jit, static_argnames=("apply_fn", "num_new_tokens", "temperature", "top_k", "block_size"))
def _generate(apply_fn: ApplyFn, variables: Any, prompt_BxT0: jax.Array, key: jax.Array, *,
              num_new_tokens: int, temperature: float, top_k: int | None,
              block_size: int) -> jax.Array:
  batch, prompt_length = prompt_BxT0.shape
  total = prompt_length + num_new_tokens
  window = min(block_size, total)
  tokens_BxL = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_length].set(prompt_BxT0)

  def step(index: jax.Array, tokens_BxL: jax.Array) -> jax.Array:
    filled = prompt_length + index  # tokens 0..filled-1 are known; this step writes `filled`
    start = jnp.maximum(filled - window, 0)
    context_BxW = jax.lax.dynamic_slice(tokens_BxL, (0, start), (batch, window))
    logits_BxWxV = apply_fn(variables, context_BxW, train=False)
    if logits_BxWxV.ndim != 3 or logits_BxWxV.shape[:2] != (batch, window):
      raise ValueError(f"the model must return logits [batch, length, vocab] = [{batch}, {window}, "
                       f"V]; got shape {logits_BxWxV.shape}.")
    _check_top_k(top_k, logits_BxWxV.shape[-1])
    last = filled - 1 - start
    logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxWxV, last, axis=1, keepdims=False)
    next_B = sample_next(logits_BxV, jax.random.fold_in(key, index), temperature, top_k)
    return jax.lax.dynamic_update_slice(tokens_BxL, next_B[:, None], (0, filled))

  return jax.lax.fori_loop(0, num_new_tokens, step, tokens_BxL)
