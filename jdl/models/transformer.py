"""Transformers from one pre-LayerNorm block: a text classifier, a GPT-style language model, a ViT.

Shapes: B batch, T sequence length (tokens or patches), D width, V vocabulary size. Every block is
`x + Dropout(MHSA(LN(x)))` then `x + Dropout(MLP(LN(x)))`, the MLP GELU and `mlp_ratio * D` wide
(12 D^2 + 13 D parameters a block at ratio 4). Embeddings start as N(0, 0.02^2), as GPT-2's. The
models share `num_layers` blocks of `num_heads` heads (which must divide `width`, D),
`mlp_ratio`, `dropout_rate` (on the embeddings, attention weights and residual branches) and
`output` ("logits" or "softmax"). `remat` (`REMAT_POLICIES`), `scan_layers` (the blocks as one
`nn.scan` over parameters stacked under "blocks") and `query_chunk` (`MultiHeadSelfAttention`'s)
change how the blocks run, not what they compute (docs/models.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdl.models.attention import MultiHeadSelfAttention, padding_mask as make_padding_mask
from jdl.models.layers import DENSE_INIT, HEAD_INIT, LayerNorm, apply_output, as_images, named

EMBEDDING_INIT = nn.initializers.normal(stddev=0.02)
TOKEN_INIT = named(EMBEDDING_INIT, "vocab", "embed")
POSITION_INIT = named(EMBEDDING_INIT, None, "embed")
POOLS = ("cls", "mean")
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,  # no rematerialisation: every activation is kept
    "full": None,  # keeps only each block's input
    # Keeps the projections' outputs (dots without batch dimensions) and recomputes the attention
    # scores [B, H, T, T], which grow as T^2 (`checkpoint_dots` would keep them).
    "matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
"""What a block keeps from the forward pass for the backward one, by name."""


def _check_architecture(module: nn.Module) -> None:
  """Raises a clear error for a transformer shape that cannot be built."""
  model, width, num_heads = type(module).__name__, module.width, module.num_heads
  if num_heads < 1 or width < 1 or width % num_heads:
    raise ValueError(f"{model}: width {width} must be a positive multiple of num_heads {num_heads} "
                     "(each head gets width // num_heads features).")
  for attribute in ("num_layers", "mlp_ratio"):
    if getattr(module, attribute) < 1:
      raise ValueError(f"{model}: {attribute} must be >= 1; got {getattr(module, attribute)}.")
  if not 0.0 <= module.dropout_rate < 1.0:
    raise ValueError(f"{model}: dropout_rate must be in [0, 1); got {module.dropout_rate}.")
  if module.remat not in REMAT_POLICIES:
    raise ValueError(f"{model}: unknown remat policy {module.remat!r}; expected one of "
                     f"{tuple(REMAT_POLICIES)}.")
  if not isinstance(module.scan_layers, bool):
    raise ValueError(f"{model}: scan_layers must be a bool; got {module.scan_layers!r}.")


def _check_tokens(tokens: jax.Array, model: str, max_length: int, limit_name: str) -> None:
  """Tokens must be integer ids `[B, T]` with 1 <= T <= the model's maximum length."""
  if tokens.ndim != 2:
    raise ValueError(f"{model} expects token ids [batch, length]; got shape {tokens.shape}.")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"{model} expects integer token ids; got dtype {tokens.dtype}.")
  if not 1 <= tokens.shape[1] <= max_length:
    raise ValueError(
        f"{model}: sequence length {tokens.shape[1]} must be in [1, {limit_name}={max_length}].")


class TransformerBlock(nn.Module):
  """One pre-LayerNorm block: LN -> MHSA -> Dropout -> +x, LN -> MLP -> Dropout -> +x, with the
  MLP Dense(mlp_ratio * D) -> GELU (tanh approximation) -> Dense(D); causal or bidirectional."""

  num_heads: int
  causal: bool = False
  mlp_ratio: int = 4
  dropout_rate: float = 0.0
  query_chunk: int | None = None

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, *, train: bool,
               padding_mask: jax.Array | None = None) -> jax.Array:
    width = x_BxTxD.shape[-1]
    y = LayerNorm(name="ln_attention")(x_BxTxD)
    y = MultiHeadSelfAttention(self.num_heads, causal=self.causal, dropout_rate=self.dropout_rate,
                               query_chunk=self.query_chunk, name="attention")(
                                   y, train=train, padding_mask=padding_mask)
    x_BxTxD = x_BxTxD + self._dropout(y, train)
    y = LayerNorm(name="ln_mlp")(x_BxTxD)
    y = nn.gelu(nn.Dense(self.mlp_ratio * width, name="mlp_in",
                         kernel_init=named(DENSE_INIT, "embed", "mlp"))(y))
    y = nn.Dense(width, name="mlp_out", kernel_init=named(DENSE_INIT, "mlp", "embed"))(y)
    return x_BxTxD + self._dropout(y, train)

  def _dropout(self, y: jax.Array, train: bool) -> jax.Array:
    if not self.dropout_rate:
      return y
    return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


def _new_block(module: nn.Module, *, causal: bool, name: str | None = None) -> TransformerBlock:
  """One block with `module`'s heads, MLP ratio and dropout (named by Flax when `name` is None)."""
  return TransformerBlock(module.num_heads, causal=causal, mlp_ratio=module.mlp_ratio,
                          dropout_rate=module.dropout_rate, query_chunk=module.query_chunk,
                          name=name)


def _run_blocks(module: nn.Module, blocks: TransformerBlock | Sequence[TransformerBlock],
                x_BxTxD: jax.Array, *, train: bool,
                padding_mask: jax.Array | None = None) -> jax.Array:
  """Runs `module`'s blocks (a list, or the one block whose parameters `nn.scan` stacks) under its
  `remat` setting; `train`, a Python bool, is static in the lifted functions."""

  def step(block: TransformerBlock, x: jax.Array,
           mask: jax.Array | None) -> tuple[jax.Array, None]:
    return block(x, train=train, padding_mask=mask), None

  if module.remat != "none":
    # Under scan, the loop itself keeps XLA from merging the recomputation into the forward pass,
    # so prevent_cse's extra barriers are not needed (JAX's advice for jax.checkpoint in scan).
    step = nn.remat(step, policy=REMAT_POLICIES[module.remat],
                    prevent_cse=not module.scan_layers)
  if not module.scan_layers:
    for block in blocks:
      x_BxTxD, _ = step(block, x_BxTxD, padding_mask)
    return x_BxTxD
  # Each layer gets its own parameters (and initialisation and dropout keys); sown attention
  # weights stack like the parameters.
  scan = nn.scan(step, variable_axes={"params": 0, "intermediates": 0},
                 metadata_params={nn.PARTITION_NAME: "layers"},
                 split_rngs={"params": True, "dropout": True}, in_axes=nn.broadcast,
                 length=module.num_layers)
  x_BxTxD, _ = scan(blocks, x_BxTxD, padding_mask)
  return x_BxTxD


def _encode(module: nn.Module, x_BxTxD: jax.Array, *, train: bool,
            padding_mask: jax.Array | None = None) -> jax.Array:
  """Dropout, then a bidirectional model's blocks (`block0`, `block1`, ... or the scanned
  "blocks"), then the final LayerNorm; called inside the model's compact `__call__`."""
  if module.dropout_rate:
    x_BxTxD = nn.Dropout(module.dropout_rate, deterministic=not train)(x_BxTxD)
  blocks = (_new_block(module, causal=False, name="blocks") if module.scan_layers else
            [_new_block(module, causal=False, name=f"block{i}") for i in range(module.num_layers)])
  x_BxTxD = _run_blocks(module, blocks, x_BxTxD, train=train, padding_mask=padding_mask)
  return LayerNorm(name="ln_final")(x_BxTxD)


class TransformerEncoderClassifier(nn.Module):
  """A bidirectional transformer over token ids for sequence classification (e.g. IMDB sentiment).

  Token + position embedding -> blocks -> final LayerNorm -> mean over the real tokens -> Dense.
  Padding gets no attention weight and is left out of the mean, so it does not change the logits
  (all-padding pools to zeros).

  Attributes (and those of the module docstring):
    vocab_size: V, the number of token ids (including the padding id).
    max_length: the longest sequence (number of learned positions).
    pad_id: the token id that marks padding.
  """

  num_classes: int
  vocab_size: int = 8192
  max_length: int = 256
  num_layers: int = 2
  num_heads: int = 4
  width: int = 64
  mlp_ratio: int = 4
  dropout_rate: float = 0.0
  pad_id: int = 0
  output: str = "logits"
  remat: str = "none"
  scan_layers: bool = False
  query_chunk: int | None = None

  def __post_init__(self) -> None:
    _check_architecture(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool) -> jax.Array:
    """Maps `[B, T]` token ids to `[B, num_classes]` logits (or probabilities)."""
    _check_tokens(tokens, "TransformerEncoderClassifier", self.max_length, "max_length")
    real_BxT = make_padding_mask(tokens, pad_id=self.pad_id)
    x_BxTxD = nn.Embed(self.vocab_size, self.width, embedding_init=TOKEN_INIT,
                       name="token_embedding")(tokens)
    positions_LxD = self.param("position_embedding", POSITION_INIT, (self.max_length, self.width))
    x_BxTxD = x_BxTxD + positions_LxD[None, :tokens.shape[1], :]
    x_BxTxD = _encode(self, x_BxTxD, train=train, padding_mask=real_BxT)
    weights_BxTx1 = real_BxT.astype(x_BxTxD.dtype)[:, :, None]
    count_Bx1 = jnp.maximum(jnp.sum(weights_BxTx1, axis=1), 1.0)
    pooled_BxD = jnp.sum(x_BxTxD * weights_BxTx1, axis=1) / count_Bx1
    head = nn.Dense(self.num_classes, name="head", kernel_init=HEAD_INIT)
    return apply_output(head(pooled_BxD), self.output)


class TransformerLM(nn.Module):
  """A decoder-only (GPT-style) language model: `[B, T]` tokens -> `[B, T, V]` logits.

  Token + learned position embedding -> causal blocks (`blocks_0`, ... unrolled) -> final
  LayerNorm -> output projection; position t sees tokens 0..t only.

  Attributes (and those of the module docstring; `output` is per position):
    num_classes: V, the vocabulary size (so `jdl.models.build_model(config, num_classes=V)` fits).
    block_size: the longest context (number of learned positions); longer inputs are an error.
    tie_weights: the output projection is the embedding's transpose, else a bias-free Dense(V).
    output: "logits", "softmax", or "hidden": `{"hidden": [B, T, D] final features,
      "unembedding": [V, D] output projection}`, for `jdl.tasks.language_model`'s loss, which
      computes the logits a chunk of positions at a time and never holds all `[B, T, V]` of them.
  """

  num_classes: int
  block_size: int = 128
  num_layers: int = 4
  num_heads: int = 4
  width: int = 128
  dropout_rate: float = 0.0
  tie_weights: bool = True
  mlp_ratio: int = 4
  output: str = "logits"
  remat: str = "none"
  scan_layers: bool = False
  query_chunk: int | None = None

  def __post_init__(self) -> None:
    _check_architecture(self)
    if self.block_size < 1:
      raise ValueError(f"TransformerLM: block_size must be >= 1; got {self.block_size}.")
    super().__post_init__()

  @property
  def vocab_size(self) -> int:
    """V, the vocabulary size (the same as `num_classes`)."""
    return self.num_classes

  def setup(self) -> None:
    self.token_embedding = nn.Embed(self.num_classes, self.width, embedding_init=TOKEN_INIT)
    self.position_embedding = self.param("position_embedding", POSITION_INIT,
                                         (self.block_size, self.width))
    self.embedding_dropout = nn.Dropout(self.dropout_rate)
    self.blocks = (_new_block(self, causal=True) if self.scan_layers
                   else [_new_block(self, causal=True) for _ in range(self.num_layers)])
    self.ln_final = LayerNorm()
    if not self.tie_weights:
      self.head = nn.Dense(self.num_classes, use_bias=False,
                           kernel_init=named(DENSE_INIT, "embed", "vocab"))

  def __call__(self, tokens: jax.Array, *, train: bool) -> jax.Array:
    """Maps `[B, T]` token ids (T <= block_size) to `[B, T, V]` next-token logits."""
    _check_tokens(tokens, "TransformerLM", self.block_size, "block_size")
    return self.logits_from_embeddings(self.token_embedding(tokens), train=train)

  def logits_from_embeddings(self, x_BxTxD: jax.Array, *, train: bool) -> jax.Array:
    """The model after the token lookup: `[B, T, D]` embeddings -> `[B, T, V]` logits; called with
    `method=TransformerLM.logits_from_embeddings` to differentiate with respect to the inputs."""
    if x_BxTxD.ndim != 3 or x_BxTxD.shape[-1] != self.width:
      raise ValueError(
          f"TransformerLM expects embeddings [batch, length, {self.width}]; got {x_BxTxD.shape}.")
    length = x_BxTxD.shape[1]
    if length > self.block_size:
      raise ValueError(
          f"TransformerLM: sequence length {length} must be in [1, block_size={self.block_size}].")
    x_BxTxD = x_BxTxD + self.position_embedding[None, :length, :]
    x_BxTxD = self.embedding_dropout(x_BxTxD, deterministic=not train)
    x_BxTxD = self.ln_final(_run_blocks(self, self.blocks, x_BxTxD, train=train))
    if self.output == "hidden":
      return {"hidden": x_BxTxD, "unembedding": self._unembedding(x_BxTxD)}
    head = self.token_embedding.attend if self.tie_weights else self.head
    return apply_output(head(x_BxTxD), self.output)

  def _unembedding(self, x_BxTxD: jax.Array) -> jax.Array:
    """The output projection as `[V, D]`: logits are `hidden @ unembedding.T`."""
    if self.tie_weights:
      return self.token_embedding.embedding
    if self.is_initializing():  # the head's kernel exists once the head has been called
      self.head(x_BxTxD[:1, :1])
    return nn.meta.unbox(self.head.variables["params"]["kernel"]).T


class ViT(nn.Module):
  """A Vision Transformer (Dosovitskiy et al. 2021) image classifier.

  A `patch_size`-strided patch convolution (image sides must be multiples of it) -> a CLS token
  in front (`pool="cls"`) -> position embeddings -> blocks -> final LayerNorm -> the CLS output
  or the patch mean -> Dense.

  Attributes (and those of the module docstring):
    patch_size: p, the side of a square patch.
    pool: "cls" (a learned CLS token) or "mean" (mean of the patch outputs).
  """

  num_classes: int
  patch_size: int = 4
  width: int = 64
  num_layers: int = 4
  num_heads: int = 4
  mlp_ratio: int = 4
  dropout_rate: float = 0.0
  pool: str = "cls"
  output: str = "logits"
  remat: str = "none"
  scan_layers: bool = False
  query_chunk: int | None = None

  def __post_init__(self) -> None:
    _check_architecture(self)
    if self.patch_size < 1:
      raise ValueError(f"ViT: patch_size must be >= 1; got {self.patch_size}.")
    if self.pool not in POOLS:
      raise ValueError(f"ViT: unknown pool {self.pool!r}; expected one of {POOLS}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Maps `[B, H, W, C]` (or `[B, H, W]`) images to `[B, num_classes]` logits."""
    x_BxHxWxC = as_images(x, "ViT")
    height, width = x_BxHxWxC.shape[1:3]
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f"ViT: image size {height}x{width} must be divisible by patch_size {p}.")
    x = nn.Conv(self.width, kernel_size=(p, p), strides=(p, p), padding="VALID",
                kernel_init=named(DENSE_INIT, None, None, "conv_in", "embed"),
                name="patch_embedding")(x_BxHxWxC)
    batch = x.shape[0]
    x_BxNxD = x.reshape(batch, -1, self.width)
    if self.pool == "cls":
      cls_1x1xD = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width))
      x_BxNxD = jnp.concatenate(
          [jnp.broadcast_to(cls_1x1xD, (batch, 1, self.width)), x_BxNxD], axis=1)
    positions_NxD = self.param("position_embedding", POSITION_INIT, x_BxNxD.shape[1:])
    x_BxNxD = x_BxNxD + positions_NxD[None, :, :]
    x_BxNxD = _encode(self, x_BxNxD, train=train)
    pooled_BxD = x_BxNxD[:, 0, :] if self.pool == "cls" else jnp.mean(x_BxNxD, axis=1)
    head = nn.Dense(self.num_classes, name="head", kernel_init=HEAD_INIT)
    return apply_output(head(pooled_BxD), self.output)


VIT_PRESETS: dict[str, dict[str, Any]] = {
    "vit_tiny": {"patch_size": 4, "width": 192, "num_layers": 12, "num_heads": 3},
}
"""Named ViT shapes (`jdl.models.MODELS` registers them too)."""


def vit_tiny(num_classes: int, **overrides: Any) -> ViT:
  """ViT-tiny for 32x32 images: the ViT-Ti width, depth and heads with 4x4 patches."""
  return ViT(num_classes=num_classes, **{**VIT_PRESETS["vit_tiny"], **overrides})
