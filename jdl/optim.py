"""One optimizer factory: an Optax chain built from a config mapping.

The config names the update rule, the learning-rate schedule and optional global-norm clipping:

  name:          "sgd" | "adam" | "adamw" | "rmsprop"
  learning_rate: peak learning rate (> 0)
  momentum:      SGD / RMSProp momentum; 0 gives plain SGD
  nesterov:      Nesterov momentum for SGD
  b1, b2, eps:   Adam / AdamW moments and epsilon (RMSProp uses `eps` and `decay`=b2)
  weight_decay:  decoupled weight decay (AdamW only)
  schedule:      "constant" | "step" | "warmup_cosine"
  warmup_steps:  linear warm-up from 0 ("warmup_cosine")
  decay_every:   steps between decays ("step")
  decay_factor:  learning-rate multiplier at each decay ("step")
  end_fraction:  final learning rate as a fraction of the peak ("warmup_cosine")
  clip_norm:     clip gradients to this global norm first; None or 0 disables

Any key left out takes the default in `OPTIMIZER_DEFAULTS`; an unknown key is an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optax

OPTIMIZER_DEFAULTS: dict[str, Any] = {
    "name": "adam",
    "learning_rate": 1e-3,
    "momentum": 0.0,
    "nesterov": False,
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-7,
    "weight_decay": 0.0,
    "schedule": "constant",
    "warmup_steps": 0,
    "decay_every": 0,
    "decay_factor": 0.1,
    "end_fraction": 0.0,
    "clip_norm": None,
}

OPTIMIZER_NAMES = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULE_NAMES = ("constant", "step", "warmup_cosine")


def _resolve(config: Mapping[str, Any]) -> dict[str, Any]:
  unknown = sorted(set(config) - set(OPTIMIZER_DEFAULTS))
  if unknown:
    raise ValueError(f"unknown optimizer config keys {unknown}; valid keys: {sorted(OPTIMIZER_DEFAULTS)}.")
  return {**OPTIMIZER_DEFAULTS, **dict(config)}


def make_schedule(config: Mapping[str, Any], *, total_steps: int | None = None) -> optax.Schedule:
  """The learning-rate schedule of an optimizer config (see the module docstring).

  Args:
    config: optimizer config mapping.
    total_steps: length of the run; required by "warmup_cosine", which decays over it.
  """
  c = _resolve(config)
  peak = float(c["learning_rate"])
  if not peak > 0:
    raise ValueError(f"learning_rate must be > 0; got {c['learning_rate']}.")
  kind = c["schedule"]
  if kind == "constant":
    return optax.constant_schedule(peak)
  if kind == "step":
    if int(c["decay_every"]) <= 0:
      raise ValueError(f"schedule 'step' needs decay_every > 0; got {c['decay_every']}.")
    return optax.exponential_decay(
        peak, transition_steps=int(c["decay_every"]), decay_rate=float(c["decay_factor"]),
        staircase=True,
    )
  if kind == "warmup_cosine":
    if not total_steps or total_steps <= 0:
      raise ValueError(f"schedule 'warmup_cosine' needs total_steps > 0; got {total_steps}.")
    warmup = int(c["warmup_steps"])
    if not 0 <= warmup < total_steps:
      raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}); got {warmup}.")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=total_steps,
        end_value=peak * float(c["end_fraction"]),
    )
  raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULE_NAMES}.")


def make_optimizer(
    config: Mapping[str, Any], *, total_steps: int | None = None
) -> optax.GradientTransformation:
  """Builds the Optax optimizer an optimizer config describes (see the module docstring).

  Examples:
    `make_optimizer({"name": "adam", "learning_rate": 1e-3})` is Keras' default Adam;
    `make_optimizer({"name": "sgd", "learning_rate": 0.1, "momentum": 0.9})` is SGD with momentum;
    `make_optimizer({"name": "sgd", "learning_rate": 0.1})` is plain (stochastic) gradient descent.
  """
  c = _resolve(config)
  schedule = make_schedule(c, total_steps=total_steps)
  name = c["name"]
  momentum = float(c["momentum"]) or None
  if name == "sgd":
    rule = optax.sgd(schedule, momentum=momentum, nesterov=bool(c["nesterov"]))
  elif name == "adam":
    rule = optax.adam(schedule, b1=c["b1"], b2=c["b2"], eps=c["eps"])
  elif name == "adamw":
    rule = optax.adamw(schedule, b1=c["b1"], b2=c["b2"], eps=c["eps"], weight_decay=c["weight_decay"])
  elif name == "rmsprop":
    rule = optax.rmsprop(schedule, decay=c["b2"], eps=c["eps"], momentum=momentum)
  else:
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZER_NAMES}.")
  if name != "adamw" and float(c["weight_decay"]):
    raise ValueError(
        f"weight_decay={c['weight_decay']} is only applied by 'adamw'; for optimizer {name!r} use "
        "an L2 penalty (config.l2) or choose 'adamw'."
    )
  clip = c["clip_norm"]
  if clip:
    if clip < 0:
      raise ValueError(f"clip_norm must be > 0 (or None to disable); got {clip}.")
    return optax.chain(optax.clip_by_global_norm(float(clip)), rule)
  return rule
