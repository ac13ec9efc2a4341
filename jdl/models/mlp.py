"""Multi-layer perceptron: Flatten -> [Dense -> activation -> Dropout] * n -> Dense."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from jdl.models.activations import apply_output, get_activation


class MLP(nn.Module):
  """A fully connected classifier.

  `MLP(hidden=(128,), num_classes=10)` on 28x28x1 images is the seed tutorial's model:
  Flatten -> Dense(128, relu) -> Dense(10), 784*128+128 + 128*10+10 = 101,770 parameters.

  Attributes:
    hidden: widths of the hidden Dense layers; () gives logistic regression.
    num_classes: width of the output layer.
    activation: hidden activation: relu, sigmoid, tanh, leaky_relu, gelu, elu or identity.
    dropout_rate: dropout after each hidden activation, active only when `train=True`.
    output: "logits" (for `softmax_cross_entropy`) or "softmax" (probabilities).
  """

  hidden: Sequence[int]
  num_classes: int
  activation: str = "relu"
  dropout_rate: float = 0.0
  output: str = "logits"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    act = get_activation(self.activation)
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = act(nn.Dense(width)(x))
      if self.dropout_rate:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return apply_output(nn.Dense(self.num_classes)(x), self.output)
