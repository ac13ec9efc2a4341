"""Recurrent layers and classifiers: LSTM and GRU, one- or two-directional, with padding.

Shapes: B batch, T positions (the padded length), F input features, H the hidden width of one
direction, D the output width of a layer (H, or 2H when bidirectional). The cells are Flax's,
scanned by `nn.RNN` (docs/models.md). Padding is at the end, given as `lengths` [B] or a prefix
`mask` [B, T]: the real outputs are exactly those of the unpadded sequences; padded ones are zero.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdl.models.attention import padding_mask
from jdl.models.layers import apply_output

CELLS = ("lstm", "gru")
INITIALIZERS = ("flax", "uniform")
""""flax": the cells' own (LeCun-normal input kernels, orthogonal recurrent ones, zero biases);
"uniform": every kernel and bias from U(-1/sqrt(H), 1/sqrt(H)), as PyTorch's."""
POOLINGS = ("last", "mean", "flatten")


def _check(module: nn.Module, *choices: str) -> None:
  """Refuses, at construction rather than in apply, an unknown value of the `choices` attributes
  (`cell`, `initializer`, `pooling`) of `module`, or a `num_layers` below 1."""
  valid = {"cell": CELLS, "initializer": INITIALIZERS, "pooling": POOLINGS}
  for attribute in choices:
    value = getattr(module, attribute)
    if value not in valid[attribute]:
      raise ValueError(f"unknown {attribute} {value!r}; expected one of {valid[attribute]}.")
  if getattr(module, "num_layers", 1) < 1:
    raise ValueError(f"num_layers must be >= 1; got {module.num_layers}.")


def _concrete(value: jax.Array) -> np.ndarray | None:
  """`value` as numpy when it is known now (outside jit), None while it is being traced."""
  return None if isinstance(value, jax.core.Tracer) else np.asarray(value)


def sequence_lengths(batch: int, length: int, *, lengths: jax.Array | None = None,
                     mask: jax.Array | None = None) -> jax.Array | None:
  """The `[B]` int32 lengths of B sequences padded to T, from `lengths` (`[B]` in `[0, T]`) or a
  prefix `mask` (`[B, T]`, True where real); None when neither is given. Outside jit a length out
  of range or a mask row that is not a prefix is an error; under jit lengths are clipped to
  `[0, T]` and a mask counts its True entries."""
  if lengths is not None and mask is not None:
    raise ValueError("give either lengths [B] or mask [B, T], not both.")
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    if mask.shape != (batch, length):
      raise ValueError(f"mask must have shape [batch, time] = {(batch, length)}; got {mask.shape}.")
    known = _concrete(mask)
    if known is not None:
      prefix = np.arange(length)[None, :] < known.sum(axis=1)[:, None]
      if not np.array_equal(known, prefix):
        rows = np.flatnonzero((known != prefix).any(axis=1)).tolist()
        raise ValueError(f"mask rows {rows} are not prefixes: a recurrent layer needs the padding "
                         "at the end of each row (True for the first L positions, then False).")
    return jnp.sum(mask, axis=1, dtype=jnp.int32)
  if lengths is None:
    return None
  lengths = jnp.asarray(lengths)
  if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be integers of shape [batch] = ({batch},); got shape "
                     f"{lengths.shape} and dtype {lengths.dtype}.")
  known = _concrete(lengths)
  if known is not None and known.size and (known.min() < 0 or known.max() > length):
    raise ValueError(f"lengths must lie in [0, {length}] (the padded length T); got values from "
                     f"{known.min()} to {known.max()}.")
  return jnp.clip(lengths, 0, length).astype(jnp.int32)


def lengths_from_tokens(tokens_BxT: jax.Array, pad_id: int = 0) -> jax.Array:
  """`[B]` lengths of end-padded token ids: 1 + the position of the last token not `pad_id`."""
  positions = jnp.arange(1, tokens_BxT.shape[1] + 1, dtype=jnp.int32)[None, :]
  return jnp.max(jnp.where(tokens_BxT != pad_id, positions, 0), axis=1)


def _cell(cell: str, hidden: int, initializer: str, name: str) -> nn.RNNCellBase:
  cell_class = nn.LSTMCell if cell == "lstm" else nn.GRUCell
  if initializer == "flax":
    return cell_class(features=hidden, name=name)
  bound = 1.0 / math.sqrt(hidden)
  uniform = functools.partial(jax.random.uniform, minval=-bound, maxval=bound)
  return cell_class(features=hidden, kernel_init=uniform, recurrent_kernel_init=uniform,
                    bias_init=uniform, name=name)


class Recurrent(nn.Module):
  """One recurrent layer over padded sequences: `[B, T, F]` -> `[B, T, D]`, one output per position.

  `hidden` is H, `initializer` one of `INITIALIZERS`; `bidirectional=True` adds a direction from
  the last real position back, its outputs after the forward ones (D = 2H). Parameters per
  direction: LSTM 4H(F + H + 1), GRU 3H(F + H + 1) + H."""

  hidden: int
  cell: str = "lstm"
  bidirectional: bool = False
  initializer: str = "flax"

  def __post_init__(self) -> None:
    _check(self, "cell", "initializer")
    super().__post_init__()

  @nn.compact
  def __call__(self, x_BxTxF: jax.Array, *, lengths: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    """`[B, T, D]` outputs, zero at the padding `lengths` or `mask` mark (`sequence_lengths`)."""
    if x_BxTxF.ndim != 3 or x_BxTxF.shape[1] < 1:
      raise ValueError("Recurrent expects sequences [batch, time, features] with time >= 1; got "
                       f"shape {x_BxTxF.shape}.")
    batch, length = x_BxTxF.shape[:2]
    lengths_B = sequence_lengths(batch, length, lengths=lengths, mask=mask)
    # The cells hold the parameters, under "forward" and "backward"; nn.RNN only scans them.
    outputs = nn.RNN(_cell(self.cell, self.hidden, self.initializer, "forward"))(
        x_BxTxF, seq_lengths=lengths_B)
    if self.bidirectional:
      # nn.RNN reverses only each row's first L positions (the padding stays at the end), so the
      # backward scan starts at position L-1; keep_order puts its outputs back in position order.
      backward = nn.RNN(_cell(self.cell, self.hidden, self.initializer, "backward"))(
          x_BxTxF, seq_lengths=lengths_B, reverse=True, keep_order=True)
      outputs = jnp.concatenate([outputs, backward], axis=-1)
    if lengths_B is None:
      return outputs
    # Past a row's end the scan went on over padding; those outputs mean nothing: zero them.
    return jnp.where(padding_mask(lengths_B, length=length)[..., None], outputs, 0.0)


def pool_sequence(outputs_BxTxD: jax.Array, pooling: str, *, lengths: jax.Array | None,
                  bidirectional: bool) -> jax.Array:
  """One `[B, ...]` summary of each sequence of recurrent outputs (zero at padding): "last", the
  state after the sequence in each direction (the forward half at position L-1, the backward half,
  when `bidirectional`, at 0; `[B, D]`, zeros for L = 0); "mean" over the L real positions,
  `[B, D]`; "flatten", every position's outputs in a row, `[B, T * D]` (padding as zeros)."""
  batch, length, width = outputs_BxTxD.shape
  if pooling == "flatten":
    return outputs_BxTxD.reshape(batch, length * width)
  if lengths is None:
    lengths = jnp.full((batch,), length, jnp.int32)
  if pooling == "mean":
    real_BxTx1 = padding_mask(lengths, length=length)[..., None]
    total_BxD = jnp.sum(jnp.where(real_BxTx1, outputs_BxTxD, 0.0), axis=1)
    return total_BxD / jnp.maximum(lengths, 1)[:, None].astype(outputs_BxTxD.dtype)
  if pooling == "last":
    last_BxD = outputs_BxTxD[jnp.arange(batch), jnp.maximum(lengths - 1, 0)]
    forward = width // 2 if bidirectional else width  # the backward half ends at position 0
    return jnp.concatenate([last_BxD[:, :forward], outputs_BxTxD[:, 0, forward:]], axis=-1)
  raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}.")


class RNNClassifier(nn.Module):
  """A stack of recurrent layers, a pooling over positions, then Dense(num_classes).

  Inputs are `[B, T]` integer token ids (with `vocab_size`; id 0 is end padding) or `[B, T]` /
  `[B, T, F]` float signals. One LSTM layer (H = 128) over 10,000 tokens embedded in 128, with 2
  classes, has 1,411,842 parameters. `cell`, `hidden`, `bidirectional` and `initializer` are as
  in `Recurrent`."""

  num_classes: int
  cell: str = "lstm"
  hidden: int = 128
  num_layers: int = 1  # stacked, each reading the previous one's outputs
  bidirectional: bool = False
  vocab_size: int | None = None  # token ids (id 0 is padding); None for signals
  embed_dim: int = 128  # width of the token embedding
  pooling: str = "last"  # "last", "mean" or "flatten" (`pool_sequence`; "flatten" fixes T)
  dropout_rate: float = 0.0  # on the outputs of every recurrent layer, in training
  initializer: str = "flax"
  output: str = "logits"

  def __post_init__(self) -> None:
    _check(self, "cell", "initializer", "pooling")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, lengths: jax.Array | None = None) -> jax.Array:
    """`[B, num_classes]` outputs; `lengths` (`[B]` in `[0, T]`) replace those read from tokens."""
    name = type(self).__name__
    integer = jnp.issubdtype(x.dtype, jnp.integer)
    if self.vocab_size is not None:
      if x.ndim != 2 or not integer:
        raise ValueError(f"{name} with vocab_size={self.vocab_size} expects integer token ids "
                         f"[batch, time]; got shape {x.shape} and dtype {x.dtype}.")
      known = _concrete(x)
      if known is not None and known.size and (known.min() < 0 or known.max() >= self.vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {self.vocab_size}) (vocab_size={self.vocab_size}); got "
            f"values from {known.min()} to {known.max()}.")
      if lengths is None:
        lengths = lengths_from_tokens(x)
      h = nn.Embed(self.vocab_size, self.embed_dim)(x)
    else:
      if integer:
        raise ValueError(f"{name} got integer inputs of shape {x.shape} but vocab_size is None: "
                         "set vocab_size for token ids, or give float signals.")
      h = x[..., None] if x.ndim == 2 else x
      if h.ndim != 3:
        raise ValueError(f"{name} expects signals [batch, time] or [batch, time, features]; got "
                         f"shape {x.shape}.")
    lengths = sequence_lengths(h.shape[0], h.shape[1], lengths=lengths)
    for _ in range(self.num_layers):
      h = Recurrent(self.hidden, cell=self.cell, bidirectional=self.bidirectional,
                    initializer=self.initializer)(h, lengths=lengths)
      if self.dropout_rate:
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    pooled = pool_sequence(h, self.pooling, lengths=lengths, bidirectional=self.bidirectional)
    return apply_output(nn.Dense(self.num_classes)(pooled), self.output)


class Mnist1dGRU(RNNClassifier):
  """The MNIST-1D paper's recurrent model: a bidirectional GRU (hidden 6) over the 40 samples,
  all 40 * 12 = 480 outputs into Dense(num_classes); 5,110 parameters for 10 classes. Initialised
  as PyTorch's `nn.GRU` ("uniform"): with Flax's, the one input feature's weights have standard
  deviation 1 instead of 0.24, and it trains to a lower accuracy."""

  cell: str = "gru"
  hidden: int = 6
  bidirectional: bool = True
  pooling: str = "flatten"
  initializer: str = "uniform"


class RecurrentLM(nn.Module):
  """A causal language model: Embed -> `num_layers` unidirectional LSTM/GRU layers -> Dense. V is
  `num_classes` (as `build_model` passes it); dropout acts on the embeddings and between layers;
  `jdl.generate.generate` crops contexts to `block_size`."""

  num_classes: int
  cell: str = "lstm"
  hidden: int = 256
  num_layers: int = 2
  embed_dim: int = 128
  dropout_rate: float = 0.0
  block_size: int = 256
  output: str = "logits"

  def __post_init__(self) -> None:
    _check(self, "cell")
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, *, train: bool) -> jax.Array:
    """`[B, T]` integer token ids -> `[B, T, V]` next-token logits."""
    if tokens_BxT.ndim != 2 or not jnp.issubdtype(tokens_BxT.dtype, jnp.integer):
      raise ValueError(f"RecurrentLM expects integer token ids [batch, time]; got shape "
                       f"{tokens_BxT.shape} and dtype {tokens_BxT.dtype}.")
    h = nn.Embed(self.num_classes, self.embed_dim)(tokens_BxT)
    for _ in range(self.num_layers):
      h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
      h = Recurrent(self.hidden, cell=self.cell)(h)
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    return apply_output(nn.Dense(self.num_classes)(h), self.output)
