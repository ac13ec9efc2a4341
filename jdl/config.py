"""Experiment configs: the base config every experiment starts from, and command-line overrides
(`--config.optimizer.learning_rate=3e-4`). Configs are locked ml_collections ConfigDicts: an
override of a key that does not exist is an error naming the closest valid key, never a default.
"""

from __future__ import annotations

import ast
import copy
import difflib
from collections.abc import Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

from jdl import sharding
from jdl.transfer import transfer_config


class ConfigError(ValueError):
  """A config override names an unknown key or gives a value of the wrong type."""


def base_config() -> ml_collections.ConfigDict:
  """Every key `jdl.experiment.train_and_evaluate` reads, for every task (`config.task`), with
  defaults; experiments change a few."""
  config = ml_collections.ConfigDict()
  # Data.
  config.task = "classification"  # classification, language_model, text_classification
  config.dataset = "mnist1d"  # TFDS name; "mnist1d" is generated offline, others are downloaded
  config.data_dir = config_dict.placeholder(str)  # TFDS data dir; None: TFDS's default
  config.manual_dir = config_dict.placeholder(str)  # raw files for builders that read them
  config.download = True  # may a missing dataset be downloaded (fails fast when offline)
  config.train_split = "train"  # TFDS split to train on ("train[:90%]" works too)
  config.eval_split = "test"  # TFDS split evaluated in full after every epoch
  config.in_memory = True  # load whole splits as arrays (fast) instead of streaming via tf.data
  config.text = ml_collections.ConfigDict()  # text tasks (jdl.data.text)
  config.text.block_size = 64  # language_model: characters of context per example
  config.text.max_length = 256  # text_classification: words kept per text (padded with 0)
  config.text.max_words = 20000  # text_classification: vocabulary size (with padding and unknown)
  # Model.
  config.model = ml_collections.ConfigDict()
  config.model.name = "mlp"  # one of jdl.models.MODELS; its attributes are in config.model.<name>
  config.model.mlp = ml_collections.ConfigDict()
  config.model.mlp.hidden = (128,)  # hidden Dense widths
  config.model.mlp.activation = "relu"  # relu, sigmoid, tanh, leaky_relu, gelu, elu, identity
  config.model.mlp.dropout_rate = 0.0  # dropout after hidden layers (training only)
  config.model.mlp.output = "logits"  # "softmax" pairs with loss cross_entropy_from_probabilities
  # Objective.
  config.loss = "softmax_cross_entropy"  # or "cross_entropy_from_probabilities"
  config.l1 = 0.0  # L1 penalty coefficient on weight matrices and kernels
  config.l2 = 0.0  # L2 penalty coefficient on weight matrices and kernels
  config.label_smoothing = 0.0  # mix this much of the uniform distribution into training targets
  config.top_k = ()  # extra top-k accuracies to report, e.g. (5,)
  # Augmentation of training batches (jdl.augment); all off by default.
  config.augment = ml_collections.ConfigDict()
  config.augment.crop_padding = 0  # random crop after zero-padding each side by this many pixels
  config.augment.flip = False  # random horizontal flip
  config.augment.cutout_size = 0  # side of a random zeroed square (cutout / random erasing)
  config.augment.brightness = 0.0  # add U[-b, b] per image
  config.augment.contrast = 0.0  # scale around the image mean by U[1-c, 1+c]
  config.augment.mixup_alpha = 0.0  # mixup with Beta(alpha, alpha) weights; 0: off
  config.augment.value_range = (0.0, 1.0)  # inputs' valid range; jittered values are clipped to it
  config.augment.where = "device"  # device (jax ops in the train step) or pipeline (tf.data ops)
  # Adversarial training (jdl.analysis.adversarial.make_adversary); off while epsilon is 0.
  config.adversarial = ml_collections.ConfigDict()
  config.adversarial.epsilon = 0.0  # radius of the attack's ball; 0: plain training
  config.adversarial.attack = "pgd"  # pgd or fgsm
  config.adversarial.norm = "linf"  # linf or l2
  config.adversarial.num_steps = 7  # PGD steps
  config.adversarial.value_range = (0.0, 1.0)  # valid input range the attack stays in
  config.adversarial.fraction = 1.0  # share of each batch replaced by adversarial examples
  # Optimisation: see jdl.optim for every key.
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adam"  # sgd, adam, adamw, rmsprop
  config.optimizer.learning_rate = 1e-3  # peak learning rate
  config.optimizer.momentum = 0.0  # SGD/RMSProp momentum (0: plain SGD)
  config.optimizer.nesterov = False  # Nesterov momentum for SGD
  config.optimizer.b1 = 0.9  # Adam first-moment decay
  config.optimizer.b2 = 0.999  # Adam second-moment decay (RMSProp decay)
  config.optimizer.eps = 1e-7  # Adam epsilon (Keras' default)
  config.optimizer.weight_decay = 0.0  # adamw: decoupled weight decay; sgd: added to the gradient
  config.optimizer.weight_decay_mask = "kernels"  # decay weight matrices only, or "all"
  config.optimizer.schedule = "constant"  # constant, step, warmup_cosine
  config.optimizer.warmup_steps = 0  # warmup_cosine: linear warm-up steps
  config.optimizer.decay_every = 0  # step: steps between decays
  config.optimizer.decay_factor = 0.1  # step: multiplier at each decay
  config.optimizer.end_fraction = 0.0  # warmup_cosine: final / peak learning rate
  config.optimizer.clip_norm = config_dict.placeholder(float)  # global-norm clipping; None: off
  config.optimizer.accumulate_steps = 1  # average this many steps' gradients into one update
  config.optimizer.ema_decay = 0.0  # evaluate an EMA of the parameters with this decay; 0: off
  # Training.
  config.compute_dtype = "auto"  # bfloat16 on GPUs/TPUs (float32 weights), float32 on CPUs
  config.check_finite = True  # stop at the first NaN/inf loss (docs/checkpoints.md)
  config.gradient_norms = False  # log grad/param norms; with check_finite, name the NaN gradient
  config.microbatches = 1  # split each batch into this many, accumulated inside one step
  config.batch_size = 32  # examples per gradient step (1: SGD; the train split size: full batch)
  config.eval_batch_size = 1000  # examples per eval step (speed only; metrics are exact)
  config.num_epochs = 10  # passes over the training split...
  config.num_steps = 0  # ...or, when > 0, this many gradient steps instead
  config.eval_every_steps = 0  # evaluate every this many steps; 0: after every epoch
  config.seed = 0  # seeds initialisation, dropout and the shuffle order
  config.shuffle = True  # shuffle the training split every epoch (false: in order)
  config.transfer = transfer_config()  # start from a trained run: init_from, skip, freeze, ...
  # Checkpoints (orbax), in workdir/checkpoints.
  config.checkpoint = True  # save checkpoints (at evaluations, epoch ends, and below)
  config.checkpoint_every_steps = 0  # also save every this many steps; 0: only the above
  config.checkpoint_min_seconds = 60.0  # but skip epoch-end / every-N saves closer than this
  config.keep_checkpoints = 3  # how many recent checkpoints to keep (plus the best)
  config.best_metric = "accuracy"  # also keep the best by this eval metric ("" for none)
  config.resume = True  # continue from the latest good checkpoint in the workdir
  config.progress = True  # progress bar and one line per evaluation
  # Devices.
  config.layout = "auto"  # auto (shard if >1 device), none (jit, 1 device), shard (jit+mesh), pmap
  config.num_devices = 0  # devices to use; 0: all (per process for pmap)
  # Sharded state (jdl.sharding, docs/devices.md): fsdp or tensor > 1 lays out a mesh of
  # data x fsdp x tensor devices (layout "shard"); the batch is split over data and fsdp.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = 0  # devices that split the batch and replicate the state; 0: the rest
  config.mesh.fsdp = 1  # devices that split the batch and the state (parameters, optimizer)
  config.mesh.tensor = 1  # devices that split parameters along their model dimensions
  rules = {name: ",".join(axes) for name, axes in sharding.DEFAULT_RULES.items()}
  config.sharding_rules = ml_collections.ConfigDict(rules)  # a parameter dimension's logical
  # name -> the mesh axes it is split over ("" whole, "fsdp,tensor" both), for models that name
  # their parameters' axes (jdl's transformers, MLP, CNN, ResNet)
  config.fsdp_min_size = sharding.FSDP_MIN_SIZE  # smaller arrays are split only by their names
  config.distributed = "auto"  # join a multi-process run: auto (JAX_COORDINATOR_ADDRESS), on, off
  config.cpu_threads = 0  # XLA CPU threads for command-line runs on a CPU; 0: one per core
  config.reuse_host_memory = True  # CPU runs: malloc keeps freed memory for the next step
  # (jdl.experiment.reuse_host_memory: no page faults each step; the process keeps its peak)
  config.compilation_cache_dir = "~/.cache/jdl/xla"  # compiled programs kept across runs; "": off
  return config


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for key in config.keys():
    keys.append(f"{prefix}{key}")
    if isinstance(config[key], ml_collections.ConfigDict):
      keys.extend(_flat_keys(config[key], f"{prefix}{key}."))
  return keys


def _parse_value(text: str, current: Any, key: str) -> Any:
  if isinstance(current, bool):
    lowered = text.strip().lower()
    if lowered not in ("true", "1", "yes", "false", "0", "no"):
      raise ConfigError(f"config key {key!r} is a bool; got {text!r} (use true or false).")
    return lowered in ("true", "1", "yes")
  if text.strip() == "None":
    return None  # unsets an optional field, e.g. --config.model.cnn.normalization=None
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if current is None:
      return text  # an unset string-like field
    raise ConfigError(f"config key {key!r} expects a {type(current).__name__}; {text!r} is not a "
                      "Python literal.") from None
  if isinstance(current, (tuple, list)):
    value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  return value


def override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets the dotted `key` of `config` from its command-line text, checking the key and type."""
  valid = _flat_keys(config)
  if key not in valid:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown config key {key!r}.{hint} Valid keys: {', '.join(valid)}.")
  parent, _, leaf = key.rpartition(".")
  node = config[parent] if parent else config  # ConfigDict reads dotted keys, but sets only its own
  if isinstance(node[leaf], ml_collections.ConfigDict):
    raise ConfigError(f"config key {key!r} is a group; set one of its keys, e.g. {key}.name.")
  value = _parse_value(text, node[leaf], key)
  try:
    node[leaf] = value
  except (TypeError, ValueError) as error:
    raise ConfigError(f"bad value {text!r} for config key {key!r}: {error}") from None


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies `KEY=VALUE` overrides in order to a locked copy of `config` and returns the copy."""
  config = copy.deepcopy(config).lock()  # no key can be added by mistake
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"config override {item!r} must look like KEY=VALUE.")
    key, text = item.split("=", 1)
    override(config, key.strip(), text)
  return config


USAGE = """usage: python -m experiments.{name} [--workdir=DIR] [--config.KEY=VALUE ...]

  --workdir=DIR        where metrics.jsonl, TensorBoard files and config.json go
                       (default: {workdir})
  --config.KEY=VALUE   override a config key; nested keys use dots
  --help               print this and the config with its current values
"""


def parse_command_line(config: ml_collections.ConfigDict, argv: Sequence[str], *, name: str,
                       default_workdir: str) -> tuple[ml_collections.ConfigDict, str] | None:
  """Parses `--workdir=` and `--config.KEY=VALUE` arguments; returns None after `--help`."""
  overrides, workdir, show_help = [], default_workdir, False
  for arg in argv:
    if arg in ("-h", "--help"):
      show_help = True
    elif arg.startswith("--workdir="):
      workdir = arg.split("=", 1)[1]
    elif arg.startswith("--config."):
      overrides.append(arg[len("--config."):])
    else:
      raise ConfigError(f"unexpected argument {arg!r}; expected --workdir=DIR or "
                        "--config.KEY=VALUE (see --help).")
  config = apply_overrides(config, overrides)
  if show_help:
    print(USAGE.format(name=name, workdir=default_workdir))
    print(config)
    return None
  return config, workdir
