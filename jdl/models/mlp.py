"""Multi-layer perceptron: Flatten -> [Dense -> norm -> activation -> Dropout] * n -> Dense."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from jdl.models.layers import DENSE_INIT, HEAD_INIT, LayerNorm, apply_output, get_activation, named

NORMALIZATIONS = (None, "batch", "layer")


class MLP(nn.Module):
  """A fully connected classifier with `hidden` widths (() gives logistic regression); the
  `normalization` (None, "batch" or "layer") sits between each hidden Dense and its `activation`
  (a name in `jdl.models.layers.ACTIVATIONS`), dropout after it in training. `output` is "logits"
  or "softmax"; `axis_name` is the pmap axis over which BatchNorm averages its statistics."""

  hidden: Sequence[int]
  num_classes: int
  activation: str = "relu"
  dropout_rate: float = 0.0
  normalization: str | None = None
  output: str = "logits"
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.normalization not in NORMALIZATIONS:
      raise ValueError(f"unknown normalization {self.normalization!r}; expected one of "
                       f"{NORMALIZATIONS}.")
    act = get_activation(self.activation)
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      # A bias before BatchNorm gets a zero gradient plus rounding noise, which Adam amplifies.
      x = nn.Dense(width, use_bias=self.normalization != "batch",
                   kernel_init=named(DENSE_INIT, "embed", "mlp"))(x)
      if self.normalization == "batch":
        x = nn.BatchNorm(use_running_average=not train, axis_name=self.axis_name)(x)
      elif self.normalization == "layer":
        x = LayerNorm()(x)
      x = act(x)
      if self.dropout_rate:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return apply_output(nn.Dense(self.num_classes, kernel_init=HEAD_INIT)(x), self.output)
