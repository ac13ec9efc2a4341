"""Device-resident training: the whole dataset on the device, many steps per call as one scan.

On a CPU, and for small models on a GPU, a step costs mostly Python and dispatch. When a split
fits in device memory it is copied there once; each epoch's example order is computed on the
device; and `steps_per_call` steps run as one `lax.scan` inside one compiled call, with the
metric sums carried through the scan and returned once per call. Nothing crosses the host/device
boundary per step.

The batches are exactly those of `jdl.data.ArraySource`: the same per-epoch order
(`epoch_order`), the same padding of a last partial batch (zeros, masked out), so a resident run
gives the same parameters as the per-step loop for the same seed (bitwise on CPU).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from jdl import metrics as metrics_lib
from jdl import runtime
from jdl.data.sources import epoch_order
from jdl.state import TrainState

Metrics = metrics_lib.Metrics
Constrain = Callable[[dict[str, jax.Array]], dict[str, jax.Array]]

# Resident data stays under this many bytes unless the caller decides otherwise.
DEFAULT_RESIDENT_LIMIT_BYTES = 2 << 30


@dataclasses.dataclass(frozen=True)
class ResidentData:
  """A split on the device(s), stored `with_padding_row`, and how it is cut into batches."""

  inputs: jax.Array
  labels: jax.Array
  batch_size: int
  shuffle: bool
  seed: int

  @property
  def num_examples(self) -> int:
    return int(self.inputs.shape[0]) - 1  # without the padding row

  @property
  def steps_per_epoch(self) -> int:
    return -(-self.num_examples // self.batch_size)

  def padded_order(self, epoch: int | jax.Array) -> jax.Array:
    """The epoch's order padded with -1 (masked slots) to `steps_per_epoch * batch_size`.
    Traceable: `epoch` may be a traced scalar, as inside `make_train_chunk`'s loop."""
    order = epoch_order(jnp.asarray(self.seed, jnp.uint32), jnp.asarray(epoch, jnp.uint32),
                        num_examples=self.num_examples, shuffle=self.shuffle)
    extra = self.steps_per_epoch * self.batch_size - self.num_examples
    return jnp.pad(order, (0, extra), constant_values=-1) if extra else order

  def initial_order(self) -> EpochOrder:
    """The order carry before any epoch is drawn: `(epoch -1, zeros)`; the first chunk draws
    the order of the epoch it starts in."""
    return EpochOrder(np.int32(-1), np.zeros(self.steps_per_epoch * self.batch_size, np.int32))


class EpochOrder(NamedTuple):
  """The example order of the epoch the last chunk ended in, carried from one chunk to the next
  so that an epoch's order is drawn once, on the device, whichever chunk reaches it first."""

  epoch: jax.Array  # int32 scalar; -1 before the first epoch is drawn
  order: jax.Array  # int32 [steps_per_epoch * batch_size], padded with -1


def loops_are_slow(fn: Callable[..., Any], *args: Any) -> bool:
  """Whether running `fn(*args)` inside a compiled loop would be much slower than alone (`fn`
  may be a `TracedStep`, whose recorded jaxpr is read instead; `args` are then not needed).

  True on the CPU backend when `fn` contains a convolution: XLA's CPU compiler cannot give a
  convolution in a loop body the layouts its fast (library) kernels need and falls back to a
  naive loop nest (jax issue 12868). Measured here, a ResNet-20 step on 32x32 images took 0.9 s
  alone and 15 s inside a one-step `lax.scan`. Tracing `fn` to a jaxpr is cheap and computes
  nothing.
  """
  if jax.default_backend() != "cpu":
    return False
  jaxpr = fn.jaxpr if isinstance(fn, TracedStep) else jax.make_jaxpr(fn)(*args)
  return _has_primitive(jaxpr.jaxpr, "conv_general_dilated")


class TracedStep:
  """`fn` traced once, for arguments shaped like `example_args`; a call replays its jaxpr.

  Tracing a Flax train step runs all of its Python (module construction, scopes, autodiff):
  0.15 s for the MNIST-1D CNN, and the resident engine needs the step's jaxpr three times (the
  loop decision, the metric shapes, the loop body). Replaying the recorded jaxpr binds the same
  operations without running that Python again, so callers trace a `TracedStep` as they would
  the step itself (`jax.eval_shape`, `jit`) at a fraction of the cost. Calls must have the
  example's structure, shapes and dtypes.
  """

  def __init__(self, fn: Callable[..., Any], *example_args: Any) -> None:
    self.jaxpr, self.out_shape = jax.make_jaxpr(fn, return_shape=True)(*example_args)
    self.in_tree = jax.tree.structure(example_args)
    self.out_tree = jax.tree.structure(self.out_shape)
    self._replay = jax.extend.core.jaxpr_as_fun(self.jaxpr)

  def __call__(self, *args: Any) -> Any:
    leaves, tree = jax.tree.flatten(args)
    if tree != self.in_tree:
      raise ValueError(f"a traced step was called with arguments structured as {tree}; it was "
                       f"traced for {self.in_tree}.")
    for leaf, aval in zip(leaves, self.jaxpr.in_avals):
      if (jnp.shape(leaf), jnp.result_type(leaf)) != (aval.shape, aval.dtype):
        raise ValueError(f"a traced step was called with a {jnp.result_type(leaf)}"
                         f"{list(jnp.shape(leaf))} where it was traced for a {aval.dtype}"
                         f"{list(aval.shape)}.")
    return jax.tree.unflatten(self.out_tree, self._replay(*leaves))


def _has_primitive(jaxpr: Any, name: str) -> bool:
  for equation in jaxpr.eqns:
    if equation.primitive.name == name:
      return True
    for value in equation.params.values():  # sub-jaxprs of scan, cond, pjit, custom_vjp...
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds its Jaxpr
        if hasattr(inner, "eqns") and _has_primitive(inner, name):
          return True
  return False


def nbytes(*arrays: np.ndarray) -> int:
  return int(sum(np.asarray(a).nbytes for a in arrays))


def with_padding_row(inputs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The arrays with one zero example appended: the row that padding slots gather."""
  inputs, labels = np.asarray(inputs), np.asarray(labels)
  return (np.concatenate([inputs, np.zeros((1, *inputs.shape[1:]), inputs.dtype)]),
          np.concatenate([labels, np.zeros((1, *labels.shape[1:]), labels.dtype)]))


def gather_batch(inputs: jax.Array, labels: jax.Array, indices: jax.Array) -> dict[str, jax.Array]:
  """Rows `indices` of a split stored `with_padding_row`; index -1 is padding: it gathers the zero
  row (as the host path pads with zeros) and is masked out. Gathering the zero row costs nothing,
  where zeroing padded rows with `where` cost a fifth of a small model's step. Rows are gathered
  from the inputs seen as a matrix `[examples, features]` (a free reshape): XLA's CPU gather of
  32 Fashion-MNIST rows took 19 us that way and 25 us from `[examples, 28, 28, 1]`."""
  mask = indices >= 0
  rows = jnp.where(mask, indices, inputs.shape[0] - 1)
  flat = inputs.reshape(inputs.shape[0], math.prod(inputs.shape[1:]))[rows]
  return {"input": flat.reshape(rows.shape + inputs.shape[1:]), "label": labels[rows],
          "mask": mask}


def make_train_chunk(
    train_step: Callable[[TrainState, Any], tuple[TrainState, Metrics]],
    data: ResidentData,
    constrain: Constrain,
) -> Callable[..., tuple[TrainState, Metrics, EpochOrder]]:
  """`chunk(state, inputs, labels, order, first_step, length=K) -> (state, metric sums, order)`:
  the K train steps `first_step .. first_step + K - 1` (global step numbers) on `data`'s batches,
  in one program; jit it with `length` static and the state and order donated.

  A chunk may cross epoch boundaries. It loops over the epochs it touches and, within each, over
  its steps: the outer loop draws the epoch's order (`ResidentData.padded_order`) unless the
  carried one is already that epoch's, so the order is drawn once per epoch and never copied per
  step (carrying it through a `lax.cond` in the step loop copied all of it every step: 25 us of
  a 350 us step for 60,000 examples). The order it ends with is returned for the next chunk
  (start from `data.initial_order()`), so a run of many short epochs costs one call per
  evaluation, not one per epoch plus a shuffle call. `length=1` is the step alone, with no loop
  around it (see `loops_are_slow`). Only the layout of `data` (batch size, number of examples,
  shuffle and seed) is used; its arrays are arguments.
  """
  batch_size, steps_per_epoch = data.batch_size, data.steps_per_epoch

  def order_for(carried: EpochOrder, epoch: jax.Array) -> EpochOrder:
    if not data.shuffle:  # a constant order: nothing to draw or carry
      return EpochOrder(epoch, data.padded_order(0))
    return jax.lax.cond(carried.epoch == epoch, lambda: carried,
                        lambda: EpochOrder(epoch, data.padded_order(epoch)))

  def train_one(state, sums, order, inputs, labels, step):
    start = (step % steps_per_epoch) * batch_size
    indices = jax.lax.dynamic_slice_in_dim(order, start, batch_size)
    state, batch_sums = train_step(state, constrain(gather_batch(inputs, labels, indices)))
    return state, metrics_lib.merge_metrics(sums, batch_sums)

  def chunk(state, inputs, labels, order, first_step, *, length):
    order = EpochOrder(jnp.asarray(order[0], jnp.int32), order[1])
    first_step = jnp.asarray(first_step, jnp.int32)
    zero_sums = metrics_lib.zero_metrics(jax.eval_shape(lambda st: train_step(st, constrain(
        gather_batch(inputs, labels, order.order[:batch_size])))[1], state))
    if length == 1:  # no loop at all: see `loops_are_slow`
      order = order_for(order, first_step // steps_per_epoch)
      state, sums = train_one(state, zero_sums, order.order, inputs, labels, first_step)
      return state, sums, order
    end = first_step + length

    def epoch_body(carry):
      state, sums, order, step = carry
      epoch = step // steps_per_epoch
      order = order_for(order, epoch)
      stop = jnp.minimum(end, (epoch + 1) * steps_per_epoch)
      state, sums = jax.lax.fori_loop(
          step, stop, lambda s, c: train_one(*c, order.order, inputs, labels, s), (state, sums))
      return state, sums, order, stop

    state, sums, order, _ = jax.lax.while_loop(
        lambda carry: carry[3] < end, epoch_body, (state, zero_sums, order, first_step))
    return state, sums, order

  return chunk


def all_finite(tree: Any) -> jax.Array:
  """Whether every floating-point value in `tree` is finite: one boolean scalar (integer leaves
  and PRNG keys are skipped)."""
  leaves = [leaf for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves] or [jnp.bool_(True)]))


def checking_loss_only(
    train_step: Callable[[TrainState, Any], tuple[TrainState, Metrics]],
) -> Callable[[TrainState, Any], tuple[TrainState, Metrics]]:
  """`train_step` (one with a non-finite watch and a `loss_sum`) whose watch reads only its loss.

  `nonfinite_step` / `nonfinite_what` are recomputed from `loss_sum` (0, the loss, for what went
  bad), so the step's own checks of its gradients feed nothing and XLA drops them from the
  compiled program: the pass over every gradient, 12-16% of a small MLP's step on a CPU, is gone
  where `with_nonfinite_probe` guards the chunk.
  """

  def step(state, batch):
    new_state, metrics = train_step(state, batch)
    # The watch of a step without gradients: the loss alone.
    return new_state, {**metrics, **metrics_lib.nonfinite_metrics(
        jnp.asarray(state.step), metrics["loss_sum"], grads=())}

  return step


def with_nonfinite_probe(
    chunk: Callable[..., tuple[TrainState, Metrics, EpochOrder]],
) -> Callable[..., tuple[TrainState, Metrics, EpochOrder, jax.Array]]:
  """`chunk` (from `make_train_chunk`) that also returns `suspect`: whether a step in it flagged
  something non-finite (`nonfinite_step`) or a parameter it ends with is NaN or infinite.

  Built on a step `checking_loss_only`, this is the fast first try of a chunk: each step checks
  its loss, the parameters are read once at the end. A non-finite gradient makes the parameters
  non-finite in the update it feeds (NaN and infinity go through Adam, SGD, momentum, clipping by
  the global norm and weight decay into the update, and a parameter once NaN or infinite stays
  so), so a chunk with one is suspect; the caller then runs the chunk again from its start with
  the full per-step check, which names the step and the parameter exactly as it would have.
  Only an optimizer that discards non-finite updates (`optax.apply_if_finite`) can hide a bad
  gradient from the probe, and then training goes on as that optimizer intends.
  """

  def probed(state, inputs, labels, order, first_step, *, length):
    state, sums, order = chunk(state, inputs, labels, order, first_step, length=length)
    flagged = sums["nonfinite_step"] != metrics_lib.NO_NONFINITE_STEP
    return state, sums, order, flagged | ~all_finite(state.params)

  return probed


def make_eval_all(
    eval_step: Callable[[TrainState, Any], Metrics],
    batch_size: int,
    num_examples: int,
    constrain: Constrain,
    *,
    loop: bool = True,
) -> Callable[[TrainState, jax.Array, jax.Array], Metrics]:
  """`eval_all(state, inputs, labels) -> metric sums` over the whole split (stored
  `with_padding_row`), compiled: one call with a scan over the batches, or with `loop=False` one
  call per batch (see `loops_are_slow`); the data stays on the device either way."""
  steps = -(-num_examples // batch_size)
  order = np.pad(np.arange(num_examples, dtype=np.int32), (0, steps * batch_size - num_examples),
                 constant_values=-1)  # NumPy: a constant of the program, no eager dispatch

  def eval_batch(state, inputs, labels, batch_index):
    indices = jax.lax.dynamic_slice_in_dim(order, batch_index * batch_size, batch_size)
    return eval_step(state, constrain(gather_batch(inputs, labels, indices)))

  if not loop:
    compiled = jax.jit(eval_batch, compiler_options=runtime.program_compiler_options())

    def eval_all_unlooped(state, inputs, labels):
      sums = None
      for batch_index in range(steps):
        batch_sums = compiled(state, inputs, labels, np.int32(batch_index))
        sums = metrics_lib.merge_metrics(sums, batch_sums)
      return sums

    return eval_all_unlooped

  def eval_all(state, inputs, labels):
    def body(sums, batch_index):
      return metrics_lib.merge_metrics(sums, eval_batch(state, inputs, labels, batch_index)), None

    zero_sums = metrics_lib.zero_metrics(jax.eval_shape(eval_batch, state, inputs, labels, 0))
    sums, _ = jax.lax.scan(body, zero_sums, jnp.arange(steps))
    return sums

  return jax.jit(eval_all, compiler_options=runtime.program_compiler_options())
