"""Small convolutional classifiers: a 2-D CNN for images and a 1-D CNN for signals; both take an
`activation` name (`jdl.models.layers.ACTIVATIONS`) and `output` ("logits" or "softmax")."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdl.models.layers import (
    DENSE_INIT, HEAD_INIT, apply_output, as_images, check_normalization, get_activation,
    image_norm, named,
)


class CNN(nn.Module):
  """The classic small image CNN: [Conv 3x3 -> (`image_norm` of kind `normalization`) ->
  activation -> 2x2 average pool] per entry of `features`, then Dense(`dense`) -> activation ->
  Dropout -> Dense(num_classes); 824,458 parameters on 28x28x1 (824,554 with a norm, which
  replaces each convolution's bias). `axis_name` is the pmap axis of BatchNorm's statistics."""

  num_classes: int
  features: Sequence[int] = (32, 64)
  dense: int = 256
  activation: str = "relu"
  dropout_rate: float = 0.0
  output: str = "logits"
  normalization: str | None = None
  axis_name: str | None = None

  def __post_init__(self) -> None:
    check_normalization(self.normalization, allow_none=True)  # fail at construction, not in apply
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = as_images(x, "CNN")
    act = get_activation(self.activation)
    for index, channels in enumerate(self.features):
      x = nn.Conv(channels, kernel_size=(3, 3), use_bias=self.normalization is None,
                  kernel_init=named(DENSE_INIT, None, None, "conv_in", "conv_out"),
                  name=f"Conv_{index}")(x)
      if self.normalization is not None:
        x = image_norm(self.normalization, channels, train=train, axis_name=self.axis_name,
                       name=f"Norm_{index}")(x)
      x = act(x)
      x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = act(nn.Dense(self.dense, kernel_init=named(DENSE_INIT, "embed", "mlp"))(x))
    if self.dropout_rate:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return apply_output(nn.Dense(self.num_classes, kernel_init=HEAD_INIT)(x), self.output)


PATCH_LAYOUTS = ("NLC", "CLN")


class PatchConv1D(nn.Module):
  """A 1-D convolution as one matrix product over extracted patches: `nn.Conv`'s parameters and
  result (up to rounding), fast where XLA's CPU convolution in a compiled loop is slow. `layout`
  is that of the input and output: "NLC" (as `nn.Conv`) or "CLN" (`[channels, length, batch]`),
  which puts the batch, the long axis of the product, where the CPU's vector units want it."""

  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  layout: str = "NLC"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.layout not in PATCH_LAYOUTS:
      raise ValueError(f"unknown layout {self.layout!r}; expected one of {PATCH_LAYOUTS}.")
    if x.ndim != 3:
      raise ValueError(f"PatchConv1D expects a 3-D input in layout {self.layout}; got shape "
                       f"{x.shape}.")
    if self.layout == "NLC":  # computed in layout CLN, between two transposes
      x = x.transpose(2, 1, 0)
    channels, _, batch = x.shape
    stride, size = self.stride, self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (size, channels, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    padded = x.shape[1] + 2 * self.padding
    length = (padded - size) // stride + 1
    # Padded, and then to a multiple of the stride, the length is cut into `stride` phases (a free
    # reshape): tap i reads positions i, i + stride, ..., phase i % stride from row i // stride on.
    x = jax.lax.pad(x, jnp.zeros((), x.dtype),
                    [(0, 0, 0), (self.padding, self.padding + -padded % stride, 0), (0, 0, 0)])
    phases = x.reshape(channels, x.shape[1] // stride, stride, batch)
    taps = [jax.lax.slice(phases, (0, i // stride, i % stride, 0),
                          (channels, i // stride + length, i % stride + 1, batch)
                          ).reshape(channels, 1, length, batch)
            for i in range(size)]
    patches = jax.lax.concatenate(taps, 1).reshape(channels * size, length * batch)
    weights = kernel.transpose(2, 1, 0).reshape(self.features, channels * size)
    products = jax.lax.dot_general(weights, patches, (((1,), (0,)), ((), ())))
    y = products.reshape(self.features, length, batch) + bias[:, None, None]
    return y.transpose(2, 1, 0) if self.layout == "NLC" else y


CONV_IMPLEMENTATIONS = ("auto", "xla", "patches")


class CNN1D(nn.Module):
  """A 1-D CNN for signals, by default the MNIST-1D paper's model: three Conv1d 25 (k5, k3, k3;
  stride 2, padding 1) -> ReLU, then Flatten -> Dense(num_classes); 5,210 parameters on 40 samples.
  `conv` is "xla" (`nn.Conv`), "patches" (`PatchConv1D`, in layout "CLN") or "auto", patches on a
  CPU and XLA's elsewhere; the parameters are the same either way."""

  num_classes: int
  features: Sequence[int] = (25, 25, 25)
  kernel_sizes: Sequence[int] = (5, 3, 3)
  stride: int = 2
  padding: int = 1
  activation: str = "relu"
  output: str = "logits"
  conv: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    del train  # no dropout or normalisation
    if x.ndim == 2:  # [batch, length] single-channel signals
      x = x[..., None]
    if x.ndim != 3:
      raise ValueError(f"CNN1D expects signals [batch, length, channels] (or [batch, length]); "
                       f"got shape {x.shape}.")
    if len(self.features) != len(self.kernel_sizes):
      raise ValueError(f"features {tuple(self.features)} and kernel_sizes "
                       f"{tuple(self.kernel_sizes)} must have one entry per convolution.")
    if self.conv not in CONV_IMPLEMENTATIONS:
      raise ValueError(f"unknown conv {self.conv!r}; expected one of {CONV_IMPLEMENTATIONS}.")
    use_patches = self.conv == "patches" or (self.conv == "auto" and jax.default_backend() == "cpu")
    act = get_activation(self.activation)  # elementwise, so any layout will do
    if use_patches:
      x = x.transpose(2, 1, 0)  # [channels, length, batch]: see PatchConv1D
    for index, (channels, size) in enumerate(zip(self.features, self.kernel_sizes)):
      name = f"Conv_{index}"  # the same parameter names for both implementations
      if use_patches:
        x = PatchConv1D(channels, size, self.stride, self.padding, layout="CLN", name=name)(x)
      else:
        x = nn.Conv(channels, kernel_size=(size,), strides=(self.stride,),
                    padding=[(self.padding, self.padding)], name=name)(x)
      x = act(x)
    if use_patches:  # the same layer as below, read straight from [channels, length, batch]
      return apply_output(DenseFromCLN(self.num_classes, name="Dense_0")(x), self.output)
    x = x.reshape(x.shape[0], -1)
    return apply_output(nn.Dense(self.num_classes)(x), self.output)


class DenseFromCLN(nn.Module):
  """`nn.Dense(features)` (its parameters) on `x.transpose(2, 1, 0).reshape(batch, -1)`, with the
  kernel's rows reordered instead of the activations transposed, which moves fewer numbers."""

  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels, length, batch = x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (length * channels, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    rows = kernel.reshape(length, channels, self.features).transpose(1, 0, 2)
    logits = jax.lax.dot_general(x.reshape(channels * length, batch),
                                 rows.reshape(channels * length, self.features),
                                 (((0,), (0,)), ((), ())))
    return logits + bias[None, :]
