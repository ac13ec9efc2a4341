"""Plain Flax linen models. Every model is called as `model.apply(variables, x, train=...)`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from jdl.models.classic import LeNet5, LogisticRegression, ResidualMLP
from jdl.models.cnn import CNN, CNN1D, PatchConv1D
from jdl.models.layers import ACTIVATIONS, get_activation
from jdl.models.mlp import MLP
from jdl.models.recurrent import Mnist1dGRU, Recurrent, RecurrentLM, RNNClassifier
from jdl.models.resnet import PUBLISHED, ResNet
from jdl.models.transformer import VIT_PRESETS, TransformerEncoderClassifier, TransformerLM, ViT
from jdl.models.vae import VAE, elbo_loss

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "cnn1d": CNN1D,
    "logistic": LogisticRegression,
    "lenet5": LeNet5,
    "residual_mlp": ResidualMLP,
    "resnet": ResNet,  # set stage_sizes, block, layout, width in its sub-config
    "rnn": RNNClassifier,  # LSTM/GRU over token ids [B, T] (set vocab_size; 0 = padding) or signals
    "mnist1d_gru": Mnist1dGRU,  # the MNIST-1D paper's bidirectional GRU (hidden 6, flatten)
    "rnn_lm": RecurrentLM,  # LSTM/GRU language model; num_classes is the vocabulary size
    "transformer_classifier": TransformerEncoderClassifier,  # token ids [B, T], 0 = padding
    "transformer_lm": TransformerLM,  # num_classes is the vocabulary size
    "vit": ViT,
}
MODELS.update({name: functools.partial(ResNet, **settings) for name, settings in PUBLISHED.items()})
MODELS.update({name: functools.partial(ViT, **settings) for name, settings in VIT_PRESETS.items()})
"""Models an experiment config may name in `config.model.name` (the published ResNets and the ViT
presets by name)."""


def build_model(config: Mapping[str, Any], *, num_classes: int,
                axis_name: str | None = None) -> nn.Module:
  """The model `config.name` (a key of `MODELS`) with the attributes in the sub-config of the same
  name, e.g. `{"name": "mlp", "mlp": {"hidden": (128,)}}`; other models' sub-configs may sit beside
  it, and an attribute the chosen model does not have is an error listing the valid ones."""
  name = config.get("name")
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}.")
  attributes = dict(config.get(name) or {})
  cls = MODELS[name]
  module_class = cls.func if isinstance(cls, functools.partial) else cls
  valid = set(module_class.__dataclass_fields__) - {"parent", "name", "num_classes", "axis_name"}
  unknown = sorted(set(attributes) - valid)
  if unknown:
    raise ValueError(f"model {name!r} has no attributes {unknown}; valid attributes: "
                     f"{sorted(valid)}.")
  if "axis_name" in module_class.__dataclass_fields__:
    attributes["axis_name"] = axis_name
  return cls(num_classes=num_classes, **attributes)


__all__ = [
    "ACTIVATIONS", "CNN", "CNN1D", "LeNet5", "LogisticRegression", "MLP", "MODELS", "ResNet",
    "PatchConv1D", "ResidualMLP", "TransformerEncoderClassifier", "TransformerLM", "ViT",
    "Mnist1dGRU", "RNNClassifier", "Recurrent", "RecurrentLM", "VAE", "elbo_loss",
    "build_model", "get_activation",
]
