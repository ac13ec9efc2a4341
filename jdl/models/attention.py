"""Multi-head self-attention (fused or explicit), its masks, and a NaN-free masked softmax.

Shapes: B batch, T query positions, S key positions (S = T), H heads, K the width of one head,
D the model width (D = H * K). Masks are booleans, True where attention is allowed.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdl.models.layers import DENSE_INIT, ZEROS, named


def causal_mask(length: int) -> jax.Array:
  """The `[length, length]` lower-triangular mask: entry (t, s) is True when s <= t."""
  if length < 1:
    raise ValueError(f"causal_mask needs a length >= 1; got {length}.")
  positions = jnp.arange(length)
  return positions[:, None] >= positions[None, :]


def padding_mask(lengths_or_tokens: jax.Array | np.ndarray, *, length: int | None = None,
                 pad_id: int = 0) -> jax.Array:
  """The `[B, T]` mask of real tokens (True), from `[B]` integer lengths (the first `lengths[b]`
  positions of row b are real; `length` gives T) or from `[B, T]` token ids (`pad_id`: padding)."""
  values = jnp.asarray(lengths_or_tokens)
  if not jnp.issubdtype(values.dtype, jnp.integer):
    raise ValueError(
        f"padding_mask expects integer lengths [B] or token ids [B, T]; got dtype {values.dtype}.")
  if values.ndim == 1:
    if length is None:
      raise ValueError("padding_mask from lengths [B] needs `length` (T, the padded length).")
    return jnp.arange(length)[None, :] < values[:, None]
  if values.ndim == 2:
    if length is not None:
      raise ValueError(
          f"padding_mask from tokens [B, T] takes T from their shape {values.shape}; do not pass "
          f"length={length}.")
    return values != pad_id
  raise ValueError(
      f"padding_mask expects lengths [B] or token ids [B, T]; got shape {values.shape}.")


def attention_mask(padding_mask_BxT: jax.Array | None, *, causal: bool,
                   length: int) -> jax.Array | None:
  """A padding mask over keys (`[B, T]` or None) combined with the causal mask: `[B or 1, 1, T, T]`,
  the rank of the scores, or None when nothing is masked. Padding is masked as a key only: a padded
  query still attends to the real tokens, and its output is ignored downstream."""
  mask = causal_mask(length)[None, None, :, :] if causal else None
  if padding_mask_BxT is not None:
    if padding_mask_BxT.ndim != 2 or padding_mask_BxT.shape[1] != length:
      raise ValueError(
          f"padding mask must have shape [batch, {length}] (True for real tokens); "
          f"got {padding_mask_BxT.shape}.")
    keys_Bx1x1xS = padding_mask_BxT.astype(bool)[:, None, None, :]
    mask = keys_Bx1x1xS if mask is None else jnp.logical_and(mask, keys_Bx1x1xS)
  return mask


def masked_softmax(scores: jax.Array, mask: jax.Array | None, axis: int = -1) -> jax.Array:
  """Softmax over `axis` restricted to the entries where `mask` (the rank of `scores`) is True:
  masked entries get exactly zero weight and gradient, and an all-masked row is zeros, not NaN."""
  if mask is None:
    return jax.nn.softmax(scores, axis=axis)
  if mask.ndim != scores.ndim:
    raise ValueError(
        f"mask of shape {mask.shape} must have the rank of the scores {scores.shape}.")
  lowest = jnp.finfo(scores.dtype).min
  scores = jnp.where(mask, scores, lowest)
  # The max only shifts the exponent for stability; the softmax does not depend on it.
  shift = jax.lax.stop_gradient(jnp.max(scores, axis=axis, keepdims=True))
  weights = jnp.exp(scores - shift) * mask  # masked entries are exactly 0, even in a full-mask row
  total = jnp.sum(weights, axis=axis, keepdims=True)
  return weights / jnp.where(total > 0, total, 1.0)


def dot_product_attention(q_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array, *,
                          scale: float, causal: bool, key_mask_BxS: jax.Array | None = None
                          ) -> jax.Array:
  """Scaled dot-product attention, `[B, T, H, K]` outputs: `jax.nn.dot_product_attention`'s
  computation and masking (a row with every key masked attends uniformly, as there), with its
  backward pass written out.

  The weights `[B, H, T, S]` are kept unnormalised with their row sums, and the backward pass
  uses the rows of `dO . O` (Dao et al. 2022) instead of differentiating the softmax: fewer passes
  over the weights, which is where XLA's attention spends a small model's CPU step. Scores and
  softmax in float32."""
  heads_first = lambda x: x.transpose(0, 2, 1, 3)  # [B, T, H, K] <-> [B, H, T, K]
  mask = attention_mask(key_mask_BxS, causal=causal, length=q_BxTxHxK.shape[1])
  out = _attention(heads_first(q_BxTxHxK), heads_first(k_BxSxHxK), heads_first(v_BxSxHxK), mask,
                   float(scale))
  return heads_first(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
               scale: float) -> jax.Array:
  return _attention_forward(q, k, v, mask, scale)[0]


def _attention_forward(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                       scale: float) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """`[B, H, T, K]` inputs and output; residuals: the inputs, exp(scores - max), 1 / row sums."""
  scores = jnp.einsum("bhtk,bhsk->bhts", q * jnp.asarray(scale, q.dtype), k,
                      preferred_element_type=jnp.float32)
  if mask is not None:  # jax.nn.dot_product_attention's large negative number
    scores = jnp.where(mask, scores, jnp.float32(-0.7 * np.finfo(np.float32).max))
  weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
  inverse_sums = 1.0 / jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum("bhts,bhsk->bhtk", weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32) * inverse_sums
  return out.astype(v.dtype), (q, k, v, mask, weights, inverse_sums, out)


def _attention_backward(scale: float, residuals: tuple[jax.Array, ...], grad_out: jax.Array
                        ) -> tuple[jax.Array | None, ...]:
  q, k, v, mask, weights, inverse_sums, out = residuals
  grad_scaled = grad_out.astype(jnp.float32) * inverse_sums  # through the normalisation
  grad_v = jnp.einsum("bhts,bhtk->bhsk", weights, grad_scaled)
  grad_weights = jnp.einsum("bhtk,bhsk->bhts", grad_scaled, v.astype(jnp.float32))
  row_terms = jnp.sum(grad_scaled * out, axis=-1, keepdims=True)  # rows of dO . O
  grad_scores = weights * (grad_weights - row_terms)
  if mask is not None:  # a row with every key masked has weights there, but no gradient
    grad_scores = jnp.where(mask, grad_scores, 0.0)
  grad_q = jnp.einsum("bhts,bhsk->bhtk", grad_scores, k.astype(jnp.float32)) * scale
  grad_k = jnp.einsum("bhts,bhtk->bhsk", grad_scores, q.astype(jnp.float32) * scale)
  return (grad_q.astype(q.dtype), grad_k.astype(k.dtype), grad_v.astype(v.dtype),
          None if mask is None else np.zeros(mask.shape, jax.dtypes.float0))


_attention.defvjp(_attention_forward, _attention_backward)


AUTO_QUERY_CHUNK = 256
AUTO_CHUNK_FROM = 1024


def chunked_attention(q_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array, *,
                      scale: float, causal: bool, key_mask_BxS: jax.Array | None = None,
                      chunk: int = AUTO_QUERY_CHUNK) -> jax.Array:
  """Scaled dot-product attention computed `chunk` queries at a time: `[B, T, H, K]` outputs.

  Each chunk's scores `[B, H, chunk, S]` (float32) and masked softmax are computed inside a
  `jax.checkpoint`, so neither the forward nor the backward pass ever holds the weights of more
  than one chunk: memory O(B H chunk S) instead of O(B H T S), for one more computation of the
  scores in the backward pass (Rabe and Staats 2021, without their key chunking). Queries past a
  multiple of `chunk` are padded and cut off again.
  """
  batch, length, heads, head_width = q_BxTxHxK.shape
  chunk = min(int(chunk), length)
  blocks = -(-length // chunk)
  q = jnp.pad(q_BxTxHxK * jnp.asarray(scale, q_BxTxHxK.dtype),
              ((0, 0), (0, blocks * chunk - length), (0, 0), (0, 0)))
  q_NxBxCxHxK = q.reshape(batch, blocks, chunk, heads, head_width).swapaxes(0, 1)
  keys_1xS = jnp.arange(k_BxSxHxK.shape[1])[None, :]
  padding = None if key_mask_BxS is None else key_mask_BxS.astype(bool)[:, None, None, :]

  @jax.checkpoint
  def attend(chunk_and_start: tuple[jax.Array, jax.Array]) -> jax.Array:
    q_BxCxHxK, start = chunk_and_start
    scores_BxHxCxS = jnp.einsum("bthk,bshk->bhts", q_BxCxHxK, k_BxSxHxK,
                                preferred_element_type=jnp.float32)
    mask = padding
    if causal:
      allowed = ((start + jnp.arange(chunk))[:, None] >= keys_1xS)[None, None]
      mask = allowed if mask is None else jnp.logical_and(mask, allowed)
    weights = masked_softmax(scores_BxHxCxS, mask).astype(v_BxSxHxK.dtype)
    return jnp.einsum("bhts,bshk->bthk", weights, v_BxSxHxK)

  out_NxBxCxHxK = jax.lax.map(attend, (q_NxBxCxHxK, jnp.arange(blocks) * chunk))
  return out_NxBxCxHxK.swapaxes(0, 1).reshape(batch, blocks * chunk, heads, head_width)[:, :length]


class MultiHeadSelfAttention(nn.Module):
  """Multi-head scaled dot-product self-attention (Vaswani et al. 2017): one projection
  D -> 3 x H x K for queries, keys and values (the `qkv` kernel), scores `q . k / sqrt(K)`, a masked
  softmax over keys (query t sees keys s <= t only when `causal`), dropout on the weights, and an
  output projection H x K -> D; `num_heads` (H) must divide D.

  It runs `jax.nn.dot_product_attention` on GPUs (cuDNN's flash attention) and
  `dot_product_attention` elsewhere, `query_chunk` queries at a time if chunked
  (`chunked_attention`; None: chunks of `AUTO_QUERY_CHUNK` off GPUs from `AUTO_CHUNK_FROM` tokens;
  0: never), and with explicit weights where they are needed: dropout on them in training, a caller
  asking for them (sown as `attention_weights` under `mutable=["intermediates"]`), or
  `fused=False`. docs/models.md compares the paths.
  """

  num_heads: int
  causal: bool = False
  dropout_rate: float = 0.0
  use_bias: bool = True
  fused: bool = True
  query_chunk: int | None = None

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, *, train: bool,
               padding_mask: jax.Array | None = None) -> jax.Array:
    """`[B, T, D]` -> `[B, T, D]`; padded keys (False in `padding_mask`, `[B, T]`) get no weight."""
    if x_BxTxD.ndim != 3:
      raise ValueError("MultiHeadSelfAttention expects inputs [batch, length, width]; got shape "
                       f"{x_BxTxD.shape}.")
    _, length, width = x_BxTxD.shape
    if self.num_heads < 1 or width % self.num_heads:
      raise ValueError(
          f"width {width} must be divisible by num_heads {self.num_heads} (each head gets "
          "width // num_heads features).")
    head_width = width // self.num_heads

    # Queries, keys and values from one product (one larger matrix multiply, not three).
    qkv_BxTx3xHxK = nn.DenseGeneral(
        (3, self.num_heads, head_width), use_bias=self.use_bias, name="qkv",
        kernel_init=named(DENSE_INIT, "embed", None, "heads", "kv"),
        bias_init=named(ZEROS, None, "heads", "kv"))(x_BxTxD)
    q_BxTxHxK, k_BxSxHxK, v_BxSxHxK = (qkv_BxTx3xHxK[:, :, i] for i in range(3))
    scale = 1.0 / math.sqrt(head_width)
    explicit = (not self.fused or (self.dropout_rate and train)
                or self.is_mutable_collection("intermediates"))
    if explicit:
      out_BxTxHxK = self._explicit(q_BxTxHxK * scale, k_BxSxHxK, v_BxSxHxK, padding_mask,
                                   length=length, train=train)
    elif chunk := self._query_chunk(length):
      out_BxTxHxK = chunked_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, scale=scale,
                                      causal=self.causal, key_mask_BxS=padding_mask, chunk=chunk)
    elif jax.default_backend() == "gpu":  # cuDNN's kernel where it applies, else XLA's
      keys = attention_mask(padding_mask, causal=False, length=length)  # [B, 1, 1, S]
      out_BxTxHxK = jax.nn.dot_product_attention(
          q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask=keys, scale=scale, is_causal=self.causal)
    else:
      out_BxTxHxK = dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, scale=scale,
                                          causal=self.causal, key_mask_BxS=padding_mask)
    return nn.DenseGeneral(width, axis=(-2, -1), use_bias=self.use_bias, name="out",
                           kernel_init=named(DENSE_INIT, "heads", "kv", "embed"))(out_BxTxHxK)

  def _query_chunk(self, length: int) -> int:
    if self.query_chunk is not None:
      if self.query_chunk < 0:
        raise ValueError(f"query_chunk must be >= 0 (0: whole sequences); got "
                         f"{self.query_chunk}.")
      return self.query_chunk if self.query_chunk < length else 0
    automatic = jax.default_backend() != "gpu" and length >= AUTO_CHUNK_FROM
    return AUTO_QUERY_CHUNK if automatic else 0

  def _explicit(self, q_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array,
                padding_mask: jax.Array | None, *, length: int, train: bool) -> jax.Array:
    """Attention with its weights materialised: sown, and dropped out while training."""
    scores_BxHxTxS = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxSxHxK)
    mask = attention_mask(padding_mask, causal=self.causal, length=length)
    weights_BxHxTxS = masked_softmax(scores_BxHxTxS, mask)
    self.sow("intermediates", "attention_weights", weights_BxHxTxS)
    if self.dropout_rate:
      weights_BxHxTxS = nn.Dropout(self.dropout_rate, deterministic=not train)(weights_BxHxTxS)
    return jnp.einsum("bhts,bshk->bthk", weights_BxHxTxS, v_BxSxHxK)
