"""One optimizer factory: an Optax chain built from a config mapping (keys: `OPTIMIZER_DEFAULTS`).

A *train step* is one call of `update` (what `TrainState.step` and `total_steps` count); an
*applied update*, every `accumulate_steps`-th train step, changes the parameters and advances the
schedule, moments and EMA, so accumulating k micro-batches of size b trains like batches of k * b.
An incomplete last accumulation is never applied.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdl import losses as losses_lib

Params = Any  # a pytree of arrays

OPTIMIZER_DEFAULTS: dict[str, Any] = {
    "name": "adam",  # "sgd" | "adam" | "adamw" | "rmsprop"
    "learning_rate": 1e-3,  # peak learning rate (> 0)
    "momentum": 0.0,  # SGD / RMSProp momentum; 0 gives plain SGD
    "nesterov": False,  # Nesterov momentum for SGD
    "b1": 0.9,  # Adam / AdamW moments and epsilon (RMSProp uses `eps`, and b2 as its `decay`)
    "b2": 0.999,
    "eps": 1e-7,
    # >= 0, "adamw" and "sgd" only: AdamW's is decoupled (`w -= lr * wd * w`); SGD's adds `wd * w`
    # to the gradient before momentum (PyTorch's).
    "weight_decay": 0.0,
    "schedule": "constant",  # "constant" | "step" | "warmup_cosine"
    "warmup_steps": 0,  # linear warm-up from 0 ("warmup_cosine"), in applied updates
    "decay_every": 0,  # applied updates between decays ("step")
    "decay_factor": 0.1,  # learning-rate multiplier at each decay ("step")
    "end_fraction": 0.0,  # final learning rate as a fraction of the peak ("warmup_cosine")
    "clip_norm": None,  # clip gradients to this global norm first; None or 0 disables
    # "kernels" (rank >= 2 leaves, `jdl.losses.kernels_only_mask`) or "all"
    "weight_decay_mask": "kernels",
    # Average the gradients of this many train steps into one update (`optax.MultiSteps`).
    "accumulate_steps": 1,
    # Keep `ema = d * ema + (1 - d) * params` for evaluation (`ema_parameters`); in [0, 1), 0: off.
    "ema_decay": 0.0,
}
"""Every key of an optimizer config, with its default; an unknown key or a bad value is an error."""

OPTIMIZER_NAMES = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULE_NAMES = ("constant", "step", "warmup_cosine")
WEIGHT_DECAY_MASKS = ("kernels", "all")


def _resolve(config: Mapping[str, Any]) -> dict[str, Any]:
  """`config` with defaults filled in; its keys, `accumulate_steps` and `ema_decay` checked."""
  if unknown := sorted(set(config) - set(OPTIMIZER_DEFAULTS)):
    raise ValueError(f"unknown optimizer config keys {unknown}; valid keys: "
                     f"{sorted(OPTIMIZER_DEFAULTS)}.")
  c = {**OPTIMIZER_DEFAULTS, **dict(config)}
  steps = c["accumulate_steps"]
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"accumulate_steps must be an integer >= 1 (1: no accumulation); got "
                     f"{steps!r}.")
  if not _in_unit_interval(c["ema_decay"]):
    raise ValueError(f"ema_decay must be a number in [0, 1) (0: no EMA); got {c['ema_decay']!r}.")
  return c


def make_schedule(config: Mapping[str, Any], *, total_steps: int | None = None) -> optax.Schedule:
  """`schedule(n)`, the learning rate of applied update n (from 0), of an optimizer config;
  "warmup_cosine" decays over `total_steps` train steps (`// accumulate_steps` applied updates)."""
  c = _resolve(config)
  accumulate = int(c["accumulate_steps"])
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
        staircase=True)
  if kind == "warmup_cosine":
    if not total_steps or total_steps <= 0:
      raise ValueError(f"schedule 'warmup_cosine' needs total_steps > 0; got {total_steps}.")
    updates = int(total_steps) // accumulate
    if updates < 1:
      raise ValueError(
          f"total_steps={total_steps} train steps with accumulate_steps={accumulate} apply no "
          "update; schedule 'warmup_cosine' needs total_steps >= accumulate_steps.")
    warmup = int(c["warmup_steps"])
    if not 0 <= warmup < updates:
      bound = (f"total_steps={updates}" if accumulate == 1 else
               f"total_steps // accumulate_steps = {total_steps} // {accumulate} = {updates}")
      raise ValueError(f"warmup_steps must be in [0, {bound}); got {warmup}.")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=updates,
        end_value=peak * float(c["end_fraction"]))
  raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULE_NAMES}.")


def _in_unit_interval(value: Any) -> bool:
  real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
  return real and 0 <= value < 1


def make_optimizer(config: Mapping[str, Any], *,
                   total_steps: int | None = None) -> optax.GradientTransformation:
  """The Optax optimizer an optimizer config describes (`total_steps` as in `make_schedule`):
  outermost first, `optax.MultiSteps`, `with_parameter_ema` (so it sees applied updates only) and
  `optax.inject_hyperparams` (so the state records the learning rate) around `chain(clip, weight
  decay, rule)`. Its `update` needs `params` with weight decay or the EMA on."""
  c = _resolve(config)
  accumulate, ema_decay = int(c["accumulate_steps"]), float(c["ema_decay"])
  schedule = make_schedule(c, total_steps=total_steps)
  name = c["name"]
  if name not in OPTIMIZER_NAMES:
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZER_NAMES}.")
  weight_decay = float(c["weight_decay"])
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0 (0: none); got {c['weight_decay']}.")
  if weight_decay and name not in ("adamw", "sgd"):
    raise ValueError(
        f"weight_decay={c['weight_decay']} is only applied by 'adamw' and 'sgd'; for optimizer "
        f"{name!r} use an L2 penalty (config.l2) or choose 'adamw'.")
  if c["weight_decay_mask"] not in WEIGHT_DECAY_MASKS:
    raise ValueError(f"unknown weight_decay_mask {c['weight_decay_mask']!r}; expected one of "
                     f"{WEIGHT_DECAY_MASKS}.")
  decay_mask = losses_lib.kernels_only_mask if c["weight_decay_mask"] == "kernels" else None
  clip = c["clip_norm"]
  if clip and clip < 0:
    raise ValueError(f"clip_norm must be > 0 (or None to disable); got {clip}.")
  momentum = float(c["momentum"]) or None

  def rule(learning_rate: Any) -> optax.GradientTransformation:
    if name == "sgd":
      core = optax.sgd(learning_rate, momentum=momentum, nesterov=bool(c["nesterov"]))
      if weight_decay:
        core = optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask), core)
    elif name == "adam":
      core = optax.adam(learning_rate, b1=c["b1"], b2=c["b2"], eps=c["eps"])
    elif name == "adamw":
      core = optax.adamw(learning_rate, b1=c["b1"], b2=c["b2"], eps=c["eps"],
                         weight_decay=weight_decay, mask=decay_mask)
    else:
      core = optax.rmsprop(learning_rate, decay=c["b2"], eps=c["eps"], momentum=momentum)
    return optax.chain(optax.clip_by_global_norm(float(clip)), core) if clip else core

  tx = optax.inject_hyperparams(rule)(learning_rate=schedule)
  if ema_decay:
    tx = with_parameter_ema(tx, ema_decay)
  if accumulate > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accumulate).gradient_transformation()
  return tx


class ParameterEmaState(NamedTuple):
  """State of `with_parameter_ema`: updates averaged so far (int32), the average (like the params,
  in at least float32), and the wrapped transformation's state."""

  count: jax.Array
  ema: Params
  inner_state: optax.OptState


def with_parameter_ema(inner: optax.GradientTransformation,
                       decay: float) -> optax.GradientTransformationExtraArgs:
  """`inner`, its state also keeping `ema = decay * ema + (1 - decay) * (params + updates)` after
  each `update` (which needs `params`; put `optax.MultiSteps` outside to count applied updates
  only), from the initial params, not debiased. Read it with `ema_parameters(opt_state)`."""
  if not _in_unit_interval(decay):
    raise ValueError(f"with_parameter_ema needs decay in [0, 1); got {decay!r}.")
  decay = float(decay)
  inner = optax.with_extra_args_support(inner)

  def init(params: Params) -> ParameterEmaState:
    # In at least float32, so that small `(1 - decay)` steps are not lost to bfloat16 rounding; a
    # copy, never the params' own buffer, which a donated compiled step could not alias.
    ema = jax.tree.map(
        lambda p: jnp.array(p, jnp.promote_types(jnp.asarray(p).dtype, jnp.float32), copy=True),
        params)
    return ParameterEmaState(jnp.zeros((), jnp.int32), ema, inner.init(params))

  def update(updates: optax.Updates, state: ParameterEmaState, params: Params | None = None,
             **extra_args: Any) -> tuple[optax.Updates, ParameterEmaState]:
    if params is None:
      raise ValueError(
          "with_parameter_ema averages the parameters, so update needs them: call "
          "tx.update(grads, opt_state, params), not tx.update(grads, opt_state).")
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    new_params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), state.ema,
                       new_params)
    return updates, ParameterEmaState(count=optax.safe_increment(state.count), ema=ema,
                                      inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init, update)


def current_learning_rate(opt_state: optax.OptState,
                          schedule: optax.Schedule | None = None) -> jax.Array:
  """The learning rate of the most recent applied update, a float32 scalar (works under jit), as
  a `make_optimizer` (or any `optax.inject_hyperparams`) state records it. One built on a schedule
  directly (`optax.adamw(schedule)`) keeps only a step count: pass the same `schedule` and the
  rate is `schedule(count - 1)` (`schedule(0)` before any update)."""
  found = _learning_rates(opt_state)
  if schedule is None and len(found) == 1:
    return found[0]
  if schedule is not None:
    counts = _find(opt_state, lambda node: isinstance(node, optax.ScaleByScheduleState))
    if len(counts) == 1:
      return jnp.asarray(schedule(jnp.maximum(counts[0].count - 1, 0)), jnp.float32)
    raise ValueError(
        f"current_learning_rate was given a schedule, but the optimizer state holds "
        f"{len(counts)} schedule step counts (optax.scale_by_schedule), not one.")
  raise ValueError(
      f"current_learning_rate needs an optimizer state holding one injected learning rate (from "
      f"jdl.optim.make_optimizer or optax.inject_hyperparams); found {len(found)} in a state of "
      f"type {type(opt_state).__name__}. For an optimizer built on a schedule directly "
      "(optax.adamw(schedule)) pass the schedule: current_learning_rate(opt_state, schedule).")


def learning_rates(opt_state: optax.OptState) -> dict[str, jax.Array]:
  """Every learning rate an optimizer state records, for logging: `{"learning_rate": r}` for one,
  `{"learning_rate/<group>": r}` per group of a `jdl.transfer.per_group_optimizer`, or `{}`."""
  groups = _find(opt_state, lambda node: isinstance(node, optax.MultiTransformState))
  if len(groups) == 1:
    rates = {f"learning_rate/{name}": found[0] for name, inner in groups[0].inner_states.items()
             if len(found := _learning_rates(inner)) == 1}
    return {"learning_rate": next(iter(rates.values()))} if len(rates) == 1 else rates
  found = _learning_rates(opt_state)
  return {"learning_rate": found[0]} if len(found) == 1 else {}


def ema_parameters(opt_state: optax.OptState) -> Params | None:
  """The parameter average of a `with_parameter_ema` anywhere in `opt_state`, or None."""
  found = _find(opt_state, lambda node: isinstance(node, ParameterEmaState))
  if len(found) > 1:
    raise ValueError(f"ema_parameters found {len(found)} parameter EMAs in the optimizer state; "
                     "expected at most one with_parameter_ema wrapper.")
  return found[0].ema if found else None


def _learning_rates(tree: Any) -> list[jax.Array]:
  """The learning rates the outermost `optax.inject_hyperparams` states in `tree` record."""
  states = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
  found = _find(tree, lambda node: isinstance(node, states) and "learning_rate" in node.hyperparams)
  return [jnp.asarray(node.hyperparams["learning_rate"], jnp.float32) for node in found]


def _find(tree: Any, predicate: Callable[[Any], bool]) -> list[Any]:
  """The outermost nodes of `tree` (tuples, named tuples, dicts, lists) that satisfy `predicate`."""
  return [leaf for leaf in jax.tree.leaves(tree, is_leaf=predicate) if predicate(leaf)]
