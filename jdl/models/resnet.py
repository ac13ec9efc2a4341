"""Residual networks (He et al. 2016): one configurable `ResNet`, and constructors of the published
ImageNet ResNet-18/34/50 (torchvision's parameter counts with 1000 classes) and CIFAR ResNet-20/56.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdl.models.layers import HEAD_INIT, IMAGE_NORMALIZATIONS, as_images, image_norm, named

BLOCKS = ("basic", "bottleneck")
LAYOUTS = ("imagenet", "cifar")
BOTTLENECK_EXPANSION = 4  # a bottleneck block outputs 4x the channels of its inner convolutions
CONV_INIT = named(nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                  None, None, "conv_in", "conv_out")


def _conv(features: int, size: int, stride: int = 1, name: str | None = None) -> nn.Conv:
  """A bias-free convolution (a norm follows) with torchvision's symmetric padding; "SAME" would
  pad only the bottom/right edge for stride 2 on an even input, shifting the sampling grid."""
  pad = (size - 1) // 2
  return nn.Conv(features, kernel_size=(size, size), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=CONV_INIT, name=name)


class _Block(nn.Module):
  """A residual block's settings and output: `features` channels in its convolutions, `stride` in
  the strided one and the shortcut, `norm(channels, scale_init=..., name=...)` making its norms."""

  features: int
  stride: int
  norm: Callable[..., nn.Module]
  zero_init_residual: bool = True

  def _output(self, y: jax.Array, x_BxHxWxC: jax.Array, last_norm: str) -> jax.Array:
    """`relu(norm(y) + shortcut(x))` inside a compact `__call__`; the shortcut is the identity, or
    where the shape changes a strided 1x1 conv + norm (the paper's option B)."""
    features = y.shape[-1]
    scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = self.norm(features, scale_init=scale, name=last_norm)(y)
    if self.stride != 1 or x_BxHxWxC.shape[-1] != features:
      x_BxHxWxC = _conv(features, 1, self.stride, name="shortcut_conv")(x_BxHxWxC)
      x_BxHxWxC = self.norm(features, name="shortcut_norm")(x_BxHxWxC)
    return nn.relu(y + x_BxHxWxC)


class BasicBlock(_Block):
  """Two 3x3 convolutions and a shortcut: relu(norm(conv(relu(norm(conv(x))))) + shortcut(x))."""

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    y = _conv(self.features, 3, self.stride, name="conv1")(x_BxHxWxC)
    y = nn.relu(self.norm(self.features, name="norm1")(y))
    return self._output(_conv(self.features, 3, name="conv2")(y), x_BxHxWxC, "norm2")


class BottleneckBlock(_Block):
  """1x1 reduce, 3x3, 1x1 expand (x4) and a shortcut; the stride on the 3x3 (torchvision's v1.5)."""

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    y = _conv(self.features, 1, name="conv1")(x_BxHxWxC)
    y = nn.relu(self.norm(self.features, name="norm1")(y))
    y = _conv(self.features, 3, self.stride, name="conv2")(y)
    y = nn.relu(self.norm(self.features, name="norm2")(y))
    y = _conv(self.features * BOTTLENECK_EXPANSION, 1, name="conv3")(y)
    return self._output(y, x_BxHxWxC, "norm3")


class ResNet(nn.Module):
  """A residual network: stem -> stages of residual blocks -> global average pool -> Dense logits.

  Stage i (from 0) has `width * 2**i` channels (x4 at a bottleneck block's output); each stage after
  the first halves the resolution in its first block. Kernels are He-normal (fan-out), as
  torchvision's. "ResNet-18 for CIFAR" is `ResNet((2, 2, 2, 2), "basic", 10, layout="cifar")`.

  Attributes:
    stage_sizes: number of residual blocks in each stage.
    block: "basic" (two 3x3 convolutions) or "bottleneck" (1x1, 3x3, 1x1 with 4x expansion).
    width: channels of the stem and of the first stage.
    layout: "imagenet" (stem: 7x7/2 conv, norm, relu, 3x3/2 max-pool) or "cifar" (3x3/1 conv).
    normalization: "batch", "group" or "layer" (`jdl.models.layers.image_norm`).
    axis_name: the pmap axis of BatchNorm's statistics; None under jit and sharded jit.
    zero_init_residual: each block starts as the identity (Goyal et al. 2017; torchvision: False).
  """

  stage_sizes: Sequence[int]
  block: str
  num_classes: int
  width: int = 64
  layout: str = "imagenet"
  normalization: str = "batch"
  axis_name: str | None = None
  zero_init_residual: bool = True

  def __post_init__(self) -> None:
    for attribute, valid in (("block", BLOCKS), ("layout", LAYOUTS),
                             ("normalization", IMAGE_NORMALIZATIONS)):
      value = getattr(self, attribute)
      if value not in valid:
        raise ValueError(f"unknown {attribute} {value!r}; expected one of {valid}.")
    if not self.stage_sizes or any(int(n) < 1 for n in self.stage_sizes):
      raise ValueError("stage_sizes must be a non-empty sequence of positive block counts; got "
                       f"{self.stage_sizes!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = as_images(x, "ResNet")
    norm = functools.partial(image_norm, self.normalization, train=train, axis_name=self.axis_name)
    imagenet = self.layout == "imagenet"
    x = _conv(self.width, 7 if imagenet else 3, 2 if imagenet else 1, name="stem_conv")(x)
    x = nn.relu(norm(self.width, name="stem_norm")(x))
    if imagenet:
      x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    block_cls = BasicBlock if self.block == "basic" else BottleneckBlock
    for stage, num_blocks in enumerate(self.stage_sizes):
      for index in range(num_blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        x = block_cls(self.width * 2**stage, stride, norm, self.zero_init_residual,
                      name=f"stage{stage + 1}_block{index + 1}")(x)
    features_BxC = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head", kernel_init=HEAD_INIT)(features_BxC)


PUBLISHED: dict[str, dict[str, Any]] = {
    "resnet18": {"stage_sizes": (2, 2, 2, 2), "block": "basic", "layout": "imagenet", "width": 64},
    "resnet34": {"stage_sizes": (3, 4, 6, 3), "block": "basic", "layout": "imagenet", "width": 64},
    "resnet50": {"stage_sizes": (3, 4, 6, 3), "block": "bottleneck", "layout": "imagenet",
                 "width": 64},
    "resnet20": {"stage_sizes": (3, 3, 3), "block": "basic", "layout": "cifar", "width": 16},
    "resnet56": {"stage_sizes": (9, 9, 9), "block": "basic", "layout": "cifar", "width": 16},
}
"""The settings of the published ResNets, by name (`jdl.models.MODELS` registers them too)."""


def resnet18(num_classes: int, **overrides: Any) -> ResNet:
  """ResNet-18: ImageNet layout, basic blocks, stages (2, 2, 2, 2); 11,689,512 parameters."""
  return ResNet(num_classes=num_classes, **{**PUBLISHED["resnet18"], **overrides})


def resnet34(num_classes: int, **overrides: Any) -> ResNet:
  """ResNet-34: ImageNet layout, basic blocks, stages (3, 4, 6, 3); 21,797,672 parameters."""
  return ResNet(num_classes=num_classes, **{**PUBLISHED["resnet34"], **overrides})


def resnet50(num_classes: int, **overrides: Any) -> ResNet:
  """ResNet-50: ImageNet layout, bottleneck blocks, stages (3, 4, 6, 3); 25,557,032 parameters."""
  return ResNet(num_classes=num_classes, **{**PUBLISHED["resnet50"], **overrides})


def resnet20(num_classes: int, **overrides: Any) -> ResNet:
  """ResNet-20 for CIFAR: basic blocks, stages (3, 3, 3), widths 16, 32, 64; 272,474 parameters
  with 10 classes (the paper's, plus 2,752 for two projection shortcuts in place of option A)."""
  return ResNet(num_classes=num_classes, **{**PUBLISHED["resnet20"], **overrides})


def resnet56(num_classes: int, **overrides: Any) -> ResNet:
  """ResNet-56 for CIFAR: stages (9, 9, 9), otherwise `resnet20`; 855,770 parameters."""
  return ResNet(num_classes=num_classes, **{**PUBLISHED["resnet56"], **overrides})
