"""Adversarial examples (`fgsm`, `pgd`), robust accuracy and adversarial training.

An adversarial example is an input moved within an epsilon ball around the clean input, and
inside the valid input range, in the direction that most increases the model's loss: "linf"
bounds every element's change, "l2" each example's Euclidean norm. `value_range=(lo, hi)` is the
valid input range (pixels in [0, 1] by default; standardised data: its own minimum and maximum;
None: unbounded), which clean inputs must lie in. `apply_fn(variables, inputs, train=False)` must
return `[batch, num_classes]` logits; the attacked loss is the softmax cross-entropy
("cross_entropy") or any per-example `loss(outputs, labels) -> [batch]`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdl import losses as losses_lib

ApplyFn = Callable[..., jax.Array]
Variables = Any
Batch = Mapping[str, jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]
AdversaryFn = Callable[[ApplyFn, Variables, jax.Array, Batch], Batch]

NORMS = ("linf", "l2")
ATTACKS = ("fgsm", "pgd")
LOSSES: dict[str, LossFn] = {"cross_entropy": losses_lib.softmax_cross_entropy}


def fgsm(apply_fn: ApplyFn, variables: Variables, inputs: jax.Array, labels: jax.Array, *,
         epsilon: float, norm: str = "linf", value_range: tuple[float, float] | None = (0.0, 1.0),
         loss: str | LossFn = "cross_entropy") -> jax.Array:
  """The fast gradient method (Goodfellow et al., 2015): one step of length `epsilon` (the ball's
  radius, >= 0) up the loss gradient of `[B, ...]` floating clean inputs with `[B]` integer labels,
  L-inf `x + epsilon * sign(grad)` or L2 `x + epsilon * grad / ||grad||`, clipped to `value_range`.
  """
  loss_fn, value_range = _check_attack(inputs, labels, epsilon=epsilon, norm=norm,
                                       value_range=value_range, loss=loss)
  return _pgd_jit(apply_fn, variables, jnp.asarray(inputs), jnp.asarray(labels),
                  jnp.float32(epsilon), jnp.float32(epsilon), jax.random.PRNGKey(0), 1, norm,
                  value_range, False, loss_fn)


def pgd(apply_fn: ApplyFn, variables: Variables, inputs: jax.Array, labels: jax.Array, *,
        epsilon: float, step_size: float | None = None, num_steps: int = 10, norm: str = "linf",
        value_range: tuple[float, float] | None = (0.0, 1.0), random_start: bool = True,
        key: jax.Array | None = None, loss: str | LossFn = "cross_entropy") -> jax.Array:
  """Projected gradient ascent on the loss inside the epsilon ball and the input range (Madry et
  al., 2018): from a random point of the ball (`key` required) or the clean input, `num_steps`
  times, a `step_size` step along the gradient's sign (L-inf) or normalised gradient (L2), then
  projection onto the ball and `value_range`. The default step size, `2.5 * epsilon /
  num_steps` (Madry et al.), lets the iterate cross the ball from any start."""
  loss_fn, value_range = _check_attack(inputs, labels, epsilon=epsilon, norm=norm,
                                       value_range=value_range, loss=loss)
  step_size, _, _ = _attack_steps("pgd", epsilon, step_size, num_steps, random_start,
                                  has_key=key is not None)
  key = jax.random.PRNGKey(0) if key is None else key  # unused without a random start
  return _pgd_jit(apply_fn, variables, jnp.asarray(inputs), jnp.asarray(labels),
                  jnp.float32(epsilon), jnp.float32(step_size), key, num_steps, norm,
                  value_range, random_start, loss_fn)


def robust_accuracy(apply_fn: ApplyFn, variables: Variables, inputs: np.ndarray | jax.Array,
                    labels: np.ndarray | jax.Array, *, attack: str = "pgd", epsilon: float,
                    norm: str = "linf", value_range: tuple[float, float] | None = (0.0, 1.0),
                    batch_size: int = 500, key: jax.Array | None = None,
                    **attack_kwargs: Any) -> float:
  """The fraction of `[N, ...]` inputs the model still classifies correctly after `attack`,
  "fgsm" or "pgd" (`attack_kwargs` its further options; batch i's random start uses
  `fold_in(key, i)`); epsilon 0 gives the clean accuracy. The last batch is padded."""
  _check_count(batch_size, "batch_size")
  inputs, labels = np.asarray(inputs), np.asarray(labels)
  if inputs.size == 0:
    raise ValueError(f"inputs of shape {inputs.shape} hold no examples; nothing to attack.")
  loss_fn, value_range = _check_attack(inputs, labels, epsilon=epsilon, norm=norm,
                                       value_range=value_range,
                                       loss=attack_kwargs.get("loss", "cross_entropy"))
  step_size, num_steps, random_start = _attack_steps(
      attack, epsilon, attack_kwargs.get("step_size"), attack_kwargs.get("num_steps", 10),
      attack_kwargs.get("random_start", True), has_key=key is not None)
  allowed = {"fgsm": {"loss"}, "pgd": {"step_size", "num_steps", "random_start", "loss"}}[attack]
  if unknown := sorted(set(attack_kwargs) - allowed):
    raise ValueError(f"{attack} takes no options {unknown}; its options are {sorted(allowed)}.")
  num_examples = inputs.shape[0]
  key = jax.random.PRNGKey(0) if key is None else key
  batch_size = min(int(batch_size), num_examples)
  correct = 0
  for index, begin in enumerate(range(0, num_examples, batch_size)):
    # The last batch is padded with copies of the last example, which are not counted.
    rows = np.minimum(np.arange(begin, begin + batch_size), num_examples - 1)
    correct += int(_count_correct_under_attack(
        apply_fn, variables, jnp.asarray(inputs[rows]), jnp.asarray(labels[rows]),
        jnp.float32(epsilon), jnp.float32(step_size), jax.random.fold_in(key, index),
        num_examples - begin, num_steps=num_steps, norm=norm, value_range=value_range,
        random_start=random_start, loss_fn=loss_fn))
  return correct / num_examples


def robust_accuracy_curve(apply_fn: ApplyFn, variables: Variables,
                          inputs: np.ndarray | jax.Array, labels: np.ndarray | jax.Array,
                          epsilons: Sequence[float], *, attack: str = "fgsm", norm: str = "linf",
                          value_range: tuple[float, float] | None = (0.0, 1.0),
                          **attack_kwargs: Any) -> list[float]:
  """`robust_accuracy` at each of `epsilons` (one compilation: epsilon is traced), with the same
  `attack_kwargs` (and so the same PGD key) at every epsilon."""
  epsilons = list(epsilons)
  if not epsilons:
    raise ValueError("epsilons must hold at least one value.")
  return [robust_accuracy(apply_fn, variables, inputs, labels, attack=attack, epsilon=epsilon,
                          norm=norm, value_range=value_range, **attack_kwargs)
          for epsilon in epsilons]


def make_adversary(epsilon: float, *, attack: str = "pgd", norm: str = "linf",
                   value_range: tuple[float, float] | None = (0.0, 1.0), num_steps: int = 7,
                   step_size: float | None = None, random_start: bool = True,
                   fraction: float = 1.0, loss: str | LossFn = "cross_entropy") -> AdversaryFn:
  """Returns `adversary(apply_fn, variables, key, batch) -> batch` for adversarial training.

  Pass it as `jdl.make_train_step(..., adversary=...)`: the step takes the loss at the returned
  inputs and does not differentiate through the attack (Madry et al.: the gradient of the max is
  the gradient at the maximiser), which runs the model with `train=False` and replaces
  `batch["input"]`, or a random `fraction` of it each step. `attack="fgsm"` ignores PGD's
  options; `attack="pgd", num_steps=1, step_size=1.25 * epsilon` is FGSM from a random start, the
  "fast" adversarial training of Wong et al., 2020."""
  loss_fn, value_range = _check_attack(epsilon=epsilon, norm=norm, value_range=value_range,
                                       loss=loss)
  step_size, num_steps, random_start = _attack_steps(  # the train step hands the adversary a key
      attack, epsilon, step_size, num_steps, random_start, has_key=True)
  if isinstance(fraction, bool) or not 0.0 <= float(fraction) <= 1.0:
    raise ValueError(f"fraction must be in [0, 1] (the share of each batch that is attacked); "
                     f"got {fraction!r}.")

  def adversary(apply_fn: ApplyFn, variables: Variables, key: jax.Array, batch: Batch) -> Batch:
    inputs, labels = batch["input"], batch["label"]
    if not jnp.issubdtype(inputs.dtype, jnp.floating):
      raise ValueError(f"adversarial training needs floating inputs; the batch's 'input' has "
                       f"dtype {inputs.dtype}.")
    attack_key, choice_key = jax.random.split(key)
    adversarial = _pgd_jit(apply_fn, variables, inputs, labels, jnp.float32(epsilon),
                           jnp.float32(step_size), attack_key, num_steps, norm, value_range,
                           random_start, loss_fn)
    num_attacked = int(round(float(fraction) * inputs.shape[0]))
    if num_attacked < inputs.shape[0]:  # the examples ranked first by a random permutation
      chosen = jax.random.permutation(choice_key, inputs.shape[0]) < num_attacked
      adversarial = jnp.where(chosen.reshape((-1,) + (1,) * (inputs.ndim - 1)), adversarial, inputs)
    return {**batch, "input": adversarial}

  return adversary


def _per_example_l2(x: jax.Array) -> jax.Array:
  """`[B, 1, ...]` Euclidean norm of each example over all its non-batch axes."""
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)), keepdims=True))


def _ascent_direction(gradient: jax.Array, norm: str) -> jax.Array:
  """The unit step (in `norm`) that raises the loss most to first order; 0 for a zero gradient."""
  gradient = gradient.astype(jnp.float32)
  if norm == "linf":
    return jnp.sign(gradient)
  length = _per_example_l2(gradient)
  return jnp.where(length > 0, gradient / jnp.where(length > 0, length, 1.0), 0.0)


def _project(candidate: jax.Array, clean: jax.Array, epsilon: jax.Array, norm: str,
             value_range: tuple[float, float] | None) -> jax.Array:
  """`candidate` moved into the epsilon ball around `clean`, then clipped to the input range."""
  delta = candidate - clean
  if norm == "linf":
    delta = jnp.clip(delta, -epsilon, epsilon)
  else:
    length = _per_example_l2(delta)
    delta = delta * jnp.where(length > epsilon, epsilon / jnp.where(length > 0, length, 1.0), 1.0)
  return clean + delta if value_range is None else jnp.clip(clean + delta, *value_range)


def _random_start(key: jax.Array, clean: jax.Array, epsilon: jax.Array, norm: str) -> jax.Array:
  """A uniformly random point of the epsilon ball around each example."""
  if norm == "linf":
    return clean + jax.random.uniform(key, clean.shape, jnp.float32, -1.0, 1.0) * epsilon
  direction_key, radius_key = jax.random.split(key)
  direction = _ascent_direction(jax.random.normal(direction_key, clean.shape, jnp.float32), "l2")
  radius = jax.random.uniform(radius_key, (clean.shape[0],) + (1,) * (clean.ndim - 1),
                              jnp.float32) ** (1.0 / np.prod(clean.shape[1:]))  # uniform in volume
  return clean + direction * radius * epsilon


@functools.partial(jax.jit, static_argnames=("apply_fn", "num_steps", "norm", "value_range",
                                             "random_start", "loss_fn"))
def _pgd_jit(apply_fn, variables, inputs, labels, epsilon, step_size, key, num_steps, norm,
             value_range, random_start, loss_fn):
  clean = inputs.astype(jnp.float32)
  start = clean
  if random_start:
    start = _project(_random_start(key, clean, epsilon, norm), clean, epsilon, norm, value_range)

  def loss_sum(x: jax.Array) -> jax.Array:  # examples do not interact: its gradient is theirs
    return jnp.sum(loss_fn(apply_fn(variables, x, train=False), labels))

  def ascend(_, current: jax.Array) -> jax.Array:
    gradient = jax.grad(loss_sum)(current.astype(inputs.dtype))
    stepped = current + step_size * _ascent_direction(gradient, norm)
    return _project(stepped, clean, epsilon, norm, value_range)

  return jax.lax.fori_loop(0, num_steps, ascend, start).astype(inputs.dtype)


@functools.partial(jax.jit, static_argnames=("apply_fn", "num_steps", "norm", "value_range",
                                             "random_start", "loss_fn"))
def _count_correct_under_attack(apply_fn, variables, inputs, labels, epsilon, step_size, key,
                                num_real, *, num_steps, norm, value_range, random_start, loss_fn):
  """How many of the first `num_real` examples the model still classifies correctly after attack."""
  adversarial = _pgd_jit(apply_fn, variables, inputs, labels, epsilon, step_size, key,
                         num_steps, norm, value_range, random_start, loss_fn)
  predictions = jnp.argmax(apply_fn(variables, adversarial, train=False), axis=-1)
  real = jnp.arange(inputs.shape[0]) < num_real
  return jnp.sum((predictions == labels) & real)


def _check_number(value: Any, name: str, *, positive: bool, meaning: str) -> float:
  """`value` as a float, if it is a finite real scalar >= 0 (> 0 where `positive`)."""
  try:
    number = math.nan if isinstance(value, bool) or np.ndim(value) else float(value)
  except (TypeError, ValueError):
    number = math.nan
  if not math.isfinite(number) or number < 0 or (positive and number == 0):
    raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0 ({meaning}); "
                     f"got {value!r}.")
  return number


def _check_count(value: Any, name: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")


def _check_attack(inputs: Any = None, labels: Any = None, *, epsilon: Any, norm: Any,
                  value_range: Any, loss: Any) -> tuple[LossFn, tuple[float, float] | None]:
  """Checks the options every attack shares, and the inputs and labels if given: `(loss, range)`."""
  _check_number(epsilon, "epsilon", positive=False, meaning="the radius of the perturbation ball")
  if norm not in NORMS:
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}.")
  if value_range is not None:
    try:
      lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
      lo = hi = math.nan
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
      raise ValueError(f"value_range must be None or finite (lo, hi) with lo < hi; got "
                       f"{value_range!r}.")
    value_range = (lo, hi)
  if not callable(loss) and loss not in LOSSES:
    raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(LOSSES)} or a per-example "
                     "callable loss(outputs, labels) -> [batch].")
  loss_fn = loss if callable(loss) else LOSSES[loss]
  if inputs is None:
    return loss_fn, value_range
  if (not hasattr(inputs, "dtype") or not jnp.issubdtype(inputs.dtype, jnp.floating)
      or inputs.ndim < 2):
    raise ValueError(f"inputs must be a floating batch [batch, ...] (token ids cannot be "
                     f"perturbed by gradients); got {getattr(inputs, 'dtype', type(inputs))} "
                     f"with shape {getattr(inputs, 'shape', None)}.")
  labels_shape = getattr(labels, "shape", None)
  if labels_shape != inputs.shape[:1] or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be [batch] = {inputs.shape[:1]} integer class indices; got "
                     f"shape {labels_shape} and dtype {getattr(labels, 'dtype', None)}.")
  if value_range is not None:
    try:
      low, high = float(np.min(inputs)), float(np.max(inputs))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
      low, high = value_range  # traced: the caller vouches for the range
    if low < value_range[0] or high > value_range[1]:
      raise ValueError(f"inputs range over [{low}, {high}], outside value_range {value_range}; an "
                       "attack clips to value_range, which would move such inputs out of their "
                       "epsilon ball. Pass the data's own range (value_range=(inputs.min(), "
                       "inputs.max())) or None for unbounded inputs.")
  return loss_fn, value_range


def _attack_steps(attack: str, epsilon: float, step_size: Any, num_steps: Any, random_start: Any,
                  *, has_key: bool) -> tuple[float, int, bool]:
  """`(step_size, num_steps, random_start)` of the PGD that runs `attack`, checked, with PGD's
  default step size filled in. FGSM is one step of length epsilon from the clean input."""
  if attack not in ATTACKS:
    raise ValueError(f"unknown attack {attack!r}; expected one of {ATTACKS}.")
  if attack == "fgsm":
    return float(epsilon), 1, False
  _check_count(num_steps, "num_steps")
  if not isinstance(random_start, bool):
    raise ValueError(f"random_start must be True or False; got {random_start!r}.")
  if random_start and not has_key:
    raise ValueError("pgd with random_start=True needs a PRNG key (key=jax.random.PRNGKey(...)); "
                     "or pass random_start=False.")
  if step_size is None:
    return 2.5 * float(epsilon) / int(num_steps), num_steps, random_start
  step_size = _check_number(step_size, "step_size", positive=True,
                            meaning="or None for 2.5 * epsilon / num_steps")
  return step_size, num_steps, random_start
