"""Activation functions by name, so configs can choose them."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax

Activation = Callable[[jax.Array], jax.Array]

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
