"""A variational autoencoder (Kingma and Welling, 2014) of fixed-size signals or images, and its
`jdl.Task` loss, `elbo_loss`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

SAMPLE_STREAM = "sample"
"""The random stream the VAE draws its latent codes from (`jdl.Task(rng_streams=...)`)."""


class VAE(nn.Module):
  """Dense encoder and decoder with `hidden` widths (mirrored), a `latent`-dimensional code: the
  `mean` and `log_variance` (`[batch, latent]`) of a diagonal Gaussian, whose draw (reparameterised,
  from `SAMPLE_STREAM`, in eval mode too: the ELBO is an expectation) is decoded to a
  `reconstruction` shaped like the input; `decode` maps codes alone."""

  hidden: Sequence[int] = (128,)
  latent: int = 8

  def setup(self) -> None:
    self.encoder = [nn.Dense(width) for width in self.hidden]
    self.to_mean, self.to_log_variance = nn.Dense(self.latent), nn.Dense(self.latent)
    self.decoder = _Decoder(tuple(reversed(self.hidden)))

  def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    del train  # no dropout or normalisation; the code is drawn in both modes
    h = x.reshape(x.shape[0], -1)
    for layer in self.encoder:
      h = nn.relu(layer(h))
    mean, log_variance = self.to_mean(h), self.to_log_variance(h)
    noise = jax.random.normal(self.make_rng(SAMPLE_STREAM), mean.shape, mean.dtype)
    code = mean + jnp.exp(0.5 * log_variance) * noise
    return {"reconstruction": self.decode(code, x.shape[1:]), "mean": mean,
            "log_variance": log_variance}

  def decode(self, code: jax.Array, example_shape: Sequence[int]) -> jax.Array:
    """Examples of `example_shape` from latent codes `[batch, latent]`."""
    return self.decoder(code, tuple(int(dim) for dim in example_shape))


class _Decoder(nn.Module):
  """Dense layers of `hidden` widths, then one to the example's size, reshaped to it."""

  hidden: Sequence[int]

  @nn.compact
  def __call__(self, code: jax.Array, example_shape: tuple[int, ...]) -> jax.Array:
    h = code
    for width in self.hidden:
      h = nn.relu(nn.Dense(width)(h))
    size = math.prod(example_shape)
    return nn.Dense(size)(h).reshape(code.shape[0], *example_shape)


def elbo_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, Any]
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Negative ELBO per example under a unit-variance Gaussian likelihood (up to its constant):
  `0.5 * ||x - reconstruction||^2 + KL(q(z | x) || N(0, I))`, with both terms as auxiliary
  values (`reconstruction`, `kl`) and `elbo` (their negated sum)."""
  x = batch["input"].astype(jnp.float32)
  error = (x - outputs["reconstruction"]).reshape(x.shape[0], -1)
  reconstruction = 0.5 * jnp.sum(jnp.square(error), axis=-1)
  mean, log_variance = outputs["mean"], outputs["log_variance"]
  kl = 0.5 * jnp.sum(jnp.exp(log_variance) + jnp.square(mean) - 1.0 - log_variance, axis=-1)
  loss = reconstruction + kl
  return loss, {"reconstruction": reconstruction, "kl": kl, "elbo": -loss}
