"""The pieces models choose by name (activations, the output, image normalisation layers), a layer
normalisation with its backward pass written out, and the image input check."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Activation = Callable[[jax.Array], jax.Array]
Initializer = Callable[..., Any]


_RECORDING = contextvars.ContextVar("jdl_recording_axis_names", default=False)


def named(init: Initializer, *names: str | None) -> Initializer:
  """`init`, whose array also carries the logical name of each dimension ("embed", "mlp", "heads",
  "kv", "vocab", "classes", "conv_in", "conv_out" or None) inside `recording_axis_names()`: there
  it is boxed by `nn.with_logical_partitioning`, which `create_train_state` reads into
  `TrainState.param_axes` (for `jdl.sharding`) and removes. Elsewhere, as in a plain
  `model.init`, the parameters are plain arrays."""
  boxed = nn.with_logical_partitioning(init, names)
  return lambda *args, **kwargs: (boxed if _RECORDING.get() else init)(*args, **kwargs)


@contextlib.contextmanager
def recording_axis_names() -> Iterator[None]:
  """Within it, the initialisers of `named` box their arrays with their logical axis names."""
  token = _RECORDING.set(True)
  try:
    yield
  finally:
    _RECORDING.reset(token)


DENSE_INIT = nn.initializers.lecun_normal()  # nn.Dense's and nn.Conv's default
HEAD_INIT = named(DENSE_INIT, "embed", "classes")  # a classifier's output layer
ZEROS = nn.initializers.zeros_init()

ACTIVATIONS: dict[str, Activation] = {
    "relu": nn.relu,
    "sigmoid": nn.sigmoid,
    "tanh": nn.tanh,
    "leaky_relu": nn.leaky_relu,  # slope 0.01 for x < 0
    "gelu": nn.gelu,
    "elu": nn.elu,
    "identity": lambda x: x,
}


def get_activation(name: str) -> Activation:
  """The activation called `name`; a clear error lists the valid names."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


OUTPUTS = ("logits", "softmax")


def apply_output(logits: jax.Array, output: str) -> jax.Array:
  """Returns logits as they are, or their softmax probabilities for `output="softmax"`."""
  if output == "logits":
    return logits
  if output == "softmax":
    return nn.softmax(logits, axis=-1)
  raise ValueError(f"unknown output {output!r}; expected one of {OUTPUTS}.")


class LayerNorm(nn.Module):
  """Layer normalisation over the last axis (Ba et al. 2016), `nn.LayerNorm`'s parameters ("scale"
  and "bias", float32) and outputs, statistics in float32 whatever the input's dtype.

  Its backward pass is written out (`layer_norm`): two reductions over the features for the input's
  gradient, where differentiating the forward pass gives several more passes over the activations,
  which is what a small model's CPU step spends its time on."""

  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    return layer_norm(x, scale, bias, self.epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  """`(x - mean) / sqrt(var + epsilon) * scale + bias` over the last axis of `x`, in `x`'s dtype."""
  return _layer_norm_forward(x, scale, bias, epsilon)[0]


def _layer_norm_forward(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
                        ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array, jax.Array]]:
  x32 = x.astype(jnp.float32)
  centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
  inverse_std = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + epsilon)
  normalised = centred * inverse_std
  out = (normalised * _along_last(scale, x) + _along_last(bias, x)).astype(x.dtype)
  return out, (normalised, inverse_std, scale, bias)


def _layer_norm_backward(epsilon: float, residuals: tuple[jax.Array, ...], grad_out: jax.Array
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
  del epsilon
  normalised, inverse_std, scale, bias = residuals
  grad32 = grad_out.astype(jnp.float32)
  grad_normalised = grad32 * _along_last(scale, grad_out)
  grad_x = inverse_std * (grad_normalised - jnp.mean(grad_normalised, axis=-1, keepdims=True)
                          - normalised * jnp.mean(grad_normalised * normalised, axis=-1,
                                                  keepdims=True))
  rows = tuple(range(grad_out.ndim - 1))
  grad_scale = jnp.sum(grad32 * normalised, axis=rows).astype(scale.dtype)
  return grad_x.astype(grad_out.dtype), grad_scale, jnp.sum(grad32, axis=rows).astype(bias.dtype)


def _along_last(features: jax.Array, x: jax.Array) -> jax.Array:
  """`features` [F] in float32 shaped to broadcast along the last axis of `x`."""
  return features.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + features.shape)


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


IMAGE_NORMALIZATIONS = ("batch", "group", "layer")

GROUPS = 32
"""Groups of GroupNorm (Wu & He 2018); a layer uses gcd(32, channels), so narrow widths work."""


def as_images(x: jax.Array, model: str) -> jax.Array:
  """`x` as images [batch, height, width, channels]; [batch, height, width] gets a channel axis."""
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise ValueError(
        f"{model} expects images [batch, height, width, channels] (or [batch, height, width]); "
        f"got shape {x.shape}.")
  return x


def check_normalization(kind: str | None, *, allow_none: bool) -> None:
  """Raises a clear error unless `kind` names an image normalisation (or is None, if allowed)."""
  valid = ((None,) if allow_none else ()) + IMAGE_NORMALIZATIONS
  if kind not in valid:
    raise ValueError(f"unknown normalization {kind!r}; expected one of {valid}.")


def image_norm(kind: str, channels: int, *, train: bool, axis_name: str | None = None,
               scale_init: Callable[..., Any] = nn.initializers.ones,
               name: str | None = None) -> nn.Module:
  """A normalisation layer for `[batch, height, width, channels]`: "batch" (BatchNorm, statistics
  in "batch_stats" averaged over the pmap axis `axis_name`; momentum 0.9, epsilon 1e-5), "group"
  (GroupNorm, gcd(`GROUPS`, channels) groups) or "layer" (LayerNorm over height, width and
  channels, a scale and bias per channel). A zero `scale_init` starts a residual branch at zero."""
  check_normalization(kind, allow_none=False)
  if kind == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        axis_name=axis_name, scale_init=scale_init, name=name)
  if kind == "group":
    return nn.GroupNorm(num_groups=math.gcd(GROUPS, channels), epsilon=1e-5,
                        scale_init=scale_init, name=name)
  return nn.LayerNorm(epsilon=1e-5, reduction_axes=(-3, -2, -1), feature_axes=-1,
                      scale_init=scale_init, name=name)
