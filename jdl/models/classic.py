"""Classic small models: logistic regression, LeNet-5, and the MNIST-1D paper's residual MLP; each
takes `output` ("logits" or "softmax"), and those with hidden layers an `activation` name."""

from __future__ import annotations

import flax.linen as nn
import jax

from jdl.models.layers import apply_output, as_images, get_activation


class LogisticRegression(nn.Module):
  """Flatten -> Dense(num_classes): the linear baseline (410 parameters on MNIST-1D)."""

  num_classes: int
  output: str = "logits"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    del train
    return apply_output(nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1)), self.output)


class LeNet5(nn.Module):
  """LeNet-5 (LeCun et al., 1998) as usually built for 28x28 digits: Conv 6@5x5 (same padding),
  2x2 average pool, Conv 16@5x5 (valid), 2x2 average pool, Dense 120, Dense 84, Dense num_classes,
  the activation (tanh, as in the paper) after each hidden layer; 61,706 parameters on 28x28x1
  with 10 classes."""

  num_classes: int
  activation: str = "tanh"
  output: str = "logits"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    del train
    x = as_images(x, "LeNet5")
    act = get_activation(self.activation)
    x = nn.avg_pool(act(nn.Conv(6, (5, 5), padding="SAME")(x)), (2, 2), strides=(2, 2))
    x = nn.avg_pool(act(nn.Conv(16, (5, 5), padding="VALID")(x)), (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = act(nn.Dense(120)(x))
    x = act(nn.Dense(84)(x))
    return apply_output(nn.Dense(self.num_classes)(x), self.output)


class ResidualMLP(nn.Module):
  """The MNIST-1D paper's MLP: h = ReLU(Dense(width)), h + ReLU(Dense(h)), Dense(num_classes);
  15,210 parameters with 40 inputs, width 100 and 10 classes."""

  num_classes: int
  width: int = 100
  activation: str = "relu"
  output: str = "logits"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    del train
    act = get_activation(self.activation)
    h = act(nn.Dense(self.width)(x.reshape(x.shape[0], -1)))
    h = h + act(nn.Dense(self.width)(h))
    return apply_output(nn.Dense(self.num_classes)(h), self.output)
