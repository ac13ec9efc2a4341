"""Input-shape checks shared by the models."""

from __future__ import annotations

import jax


def as_images(x: jax.Array, model: str) -> jax.Array:
  """`x` as images [batch, height, width, channels]; [batch, height, width] gets a channel axis."""
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise ValueError(
        f"{model} expects images [batch, height, width, channels] (or [batch, height, width]); "
        f"got shape {x.shape}.")
  return x
