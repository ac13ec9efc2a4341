"""The device-resident engine: whole splits on the device, many steps per compiled call.

On a CPU, and for small models on a GPU, a step costs mostly dispatch. A split that fits is copied
to the device once, each epoch's order drawn there, and the steps up to the next evaluation run as
one compiled loop, on exactly the batches of `jdl.data.ArraySource` (the same `epoch_order` and
masked padding). `ResidentEngine` serves `jdl.fit` and, with vmapped steps, `jdl.vmap_sweep`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdl import metrics as metrics_lib
from jdl.data.sources import ArraySource, epoch_order, num_rows

Metrics = metrics_lib.Metrics
State = Any  # a TrainState, or a stack of them under `jax.vmap`
TrainStep = Callable[[State, Any], tuple[State, Metrics]]
EvalStep = Callable[[State, Any], Metrics]
Batch = dict[str, jax.Array]

DEFAULT_RESIDENT_LIMIT_BYTES = 2 << 30  # `jdl.fit` keeps splits of at most this on the device


@dataclasses.dataclass(frozen=True)
class ResidentData:
  """A split on the device(s), stored `with_padding_row`, and how it is cut into batches."""

  inputs: Any  # an array or a pytree of arrays
  labels: Any
  batch_size: int
  shuffle: bool
  seed: int

  @property
  def num_examples(self) -> int:
    return num_rows(self.inputs) - 1  # without the padding row

  @property
  def steps_per_epoch(self) -> int:
    return -(-self.num_examples // self.batch_size)

  def padded_order(self, epoch: int | jax.Array) -> jax.Array:
    """The epoch's order padded with -1 to `steps_per_epoch * batch_size`; `epoch` may be traced."""
    order = epoch_order(jnp.asarray(self.seed, jnp.uint32), jnp.asarray(epoch, jnp.uint32),
                        num_examples=self.num_examples, shuffle=self.shuffle)
    extra = self.steps_per_epoch * self.batch_size - self.num_examples
    return jnp.pad(order, (0, extra), constant_values=-1) if extra else order

  def initial_order(self) -> EpochOrder:
    """The order carried before any epoch is drawn."""
    return EpochOrder(np.int32(-1), np.zeros(self.steps_per_epoch * self.batch_size, np.int32))


class EpochOrder(NamedTuple):
  """The order of the epoch the last call ended in, carried so each epoch's is drawn only once."""

  epoch: jax.Array  # int32 scalar; -1 before the first epoch is drawn
  order: jax.Array  # int32 [steps_per_epoch * batch_size], padded with -1


def loops_are_slow(fn: Callable[..., Any], *args: Any) -> bool:
  """Whether `fn(*args)` would run much slower in a compiled loop: on the CPU with a convolution,
  whose library kernels' layouts XLA cannot give a loop body (jax issue 12868; ten times slower
  for a ResNet). Tracing `fn` to a jaxpr computes nothing."""
  return jax.default_backend() == "cpu" and _has_primitive(jax.make_jaxpr(fn)(*args).jaxpr,
                                                          "conv_general_dilated")


def _has_primitive(jaxpr: Any, name: str) -> bool:
  """Whether `jaxpr` or one nested in it (scan, cond, pjit, custom_vjp...) runs primitive `name`.
  Walked by hand: `jax.extend.core.subjaxprs` carries no compatibility guarantee."""
  for equation in jaxpr.eqns:
    if equation.primitive.name == name:
      return True
    for value in equation.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds its Jaxpr
        if hasattr(inner, "eqns") and _has_primitive(inner, name):
          return True
  return False


def with_padding_row(inputs: Any, labels: Any) -> tuple[Any, Any]:
  """The arrays (or pytrees) with one zero example appended: the row padding slots gather."""
  def pad(value: Any) -> np.ndarray:
    value = np.asarray(value)
    return np.concatenate([value, np.zeros((1, *value.shape[1:]), value.dtype)])

  return jax.tree.map(pad, inputs), jax.tree.map(pad, labels)


def gather_batch(inputs: Any, labels: Any, indices: jax.Array) -> Batch:
  """Rows `indices` of a split stored `with_padding_row`; index -1 is padding: it gathers the zero
  row (as the host path pads with zeros) and is masked out."""
  mask = indices >= 0
  rows = jnp.where(mask, indices, num_rows(inputs) - 1)

  def take(values: jax.Array) -> jax.Array:
    # Rows of [examples, features] (a free reshape): one contiguous copy each, not per dimension.
    flat = values.reshape(values.shape[0], math.prod(values.shape[1:]))[rows]
    return flat.reshape(rows.shape + values.shape[1:])

  return {"input": jax.tree.map(take, inputs), "label": jax.tree.map(take, labels), "mask": mask}


def _identity(batch: Batch) -> Batch:
  return batch


def make_train_chunk(train_step: TrainStep, data: ResidentData,
                     constrain: Callable[[Batch], Batch] = _identity, *, loop: bool = True
                     ) -> Callable[..., tuple[State, Metrics, EpochOrder]]:
  """`chunk(state, inputs, labels, order, first_step, length) -> (state, metric sums, order)`:
  train steps `first_step .. first_step + length - 1` on `data`'s arrays as one program (traced
  bounds: one program for every length), each epoch's order drawn unless it is the carried one.
  With `loop=False` it is one step and no loop (`length` 1; see `loops_are_slow`)."""
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

  def chunk(state, inputs, labels, order, first_step, length):
    order = EpochOrder(jnp.asarray(order[0], jnp.int32), order[1])
    first_step = jnp.asarray(first_step, jnp.int32)
    zero_sums = metrics_lib.zero_metrics(jax.eval_shape(lambda st: train_step(st, constrain(
        gather_batch(inputs, labels, order.order[:batch_size])))[1], state))
    if not loop:
      order = order_for(order, first_step // steps_per_epoch)
      state, sums = train_one(state, zero_sums, order.order, inputs, labels, first_step)
      return state, sums, order
    end = first_step + jnp.asarray(length, jnp.int32)

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


def make_eval_all(eval_step: EvalStep, batch_size: int, num_examples: int,
                  constrain: Callable[[Batch], Batch] = _identity, *, loop: bool = True
                  ) -> Callable[[State, jax.Array, jax.Array], Metrics]:
  """`eval_all(state, inputs, labels) -> metric sums` over the whole split (stored
  `with_padding_row`), compiled: one scan over the batches, or with `loop=False` a call each."""
  steps = -(-num_examples // batch_size)
  order = np.pad(np.arange(num_examples, dtype=np.int32), (0, steps * batch_size - num_examples),
                 constant_values=-1)

  def eval_batch(state, inputs, labels, batch_index):
    indices = jax.lax.dynamic_slice_in_dim(order, batch_index * batch_size, batch_size)
    return eval_step(state, constrain(gather_batch(inputs, labels, indices)))

  if not loop:
    compiled = jax.jit(eval_batch)
    return lambda state, inputs, labels: functools.reduce(metrics_lib.merge_metrics, (
        compiled(state, inputs, labels, np.int32(index)) for index in range(steps)), None)

  def eval_all(state, inputs, labels):
    def body(sums, batch_index):
      return metrics_lib.merge_metrics(sums, eval_batch(state, inputs, labels, batch_index)), None

    zero_sums = metrics_lib.zero_metrics(jax.eval_shape(eval_batch, state, inputs, labels, 0))
    sums, _ = jax.lax.scan(body, zero_sums, jnp.arange(steps))
    return sums

  return jax.jit(eval_all)


class ResidentEngine:
  """Trains and evaluates on splits kept on the device, its programs built on the first call (or
  by `compile(state)`, ahead of time). `train_step` may be vmapped over a stacked state (a sweep);
  `eval_data` is one split, `{name: split}` or None; `place` and `constrain` are the runner's
  `place_replicated` and `constrain_batch`; `eval_state` maps the trained state to the evaluated
  one (the parameter EMA). Where loops are slow each call runs one step, unless `steps_per_call`."""

  def __init__(self, train_step: TrainStep, eval_step: EvalStep | None, train_data: ArraySource,
               eval_data: ArraySource | Mapping[str, ArraySource] | None = None, *,
               place: Callable[[Any], Any] = jax.device_put,
               constrain: Callable[[Batch], Batch] = _identity,
               steps_per_call: int | None = None,
               eval_state: Callable[[State], State] = lambda state: state) -> None:
    self.train_step, self.eval_step = train_step, eval_step
    self.constrain, self.steps_per_call, self.eval_state = constrain, steps_per_call, eval_state
    self.train = ResidentData(*place(with_padding_row(train_data.inputs, train_data.labels)),
                              batch_size=train_data.batch_size, shuffle=train_data.shuffle,
                              seed=train_data.seed)
    self.order = place(self.train.initial_order())
    if not isinstance(eval_data, Mapping):  # one split is the only one: `evaluate(state)`
      eval_data = {} if eval_data is None else {None: eval_data}
    self.eval_data = dict(eval_data)
    self.eval_arrays = {name: place(with_padding_row(split.inputs, split.labels))
                        for name, split in self.eval_data.items()}
    self.loop: bool | None = None  # decided on the first call, from the traced step
    self._chunk: Any = None
    self._eval_all: dict[Any, Any] = {}

  def _build(self, state: State) -> None:
    if self._chunk is not None:
      return
    self.loop = not loops_are_slow(self.train_step, state, self.batch_spec())
    if self.steps_per_call is None and not self.loop:
      self.steps_per_call = 1
    looped = self.loop or (self.steps_per_call or 1) > 1
    self._chunk = jax.jit(make_train_chunk(self.train_step, self.train, self.constrain,
                                           loop=looped), donate_argnums=(0, 3))
    if self.eval_step is not None:
      self._eval_all = {name: make_eval_all(self.eval_step, split.batch_size, split.num_examples,
                                            self.constrain, loop=self.loop)
                        for name, split in self.eval_data.items()}

  def compile(self, state: State) -> None:
    """Builds and compiles the train and eval programs for `state`'s shapes (no computation)."""
    self._build(state)
    self._chunk.lower(state, self.train.inputs, self.train.labels, self.order, np.int32(0),
                      np.int32(1)).compile()
    for name, eval_all in self._eval_all.items():
      if hasattr(eval_all, "lower"):
        eval_all.lower(jax.eval_shape(self.eval_state, state), *self.eval_arrays[name]).compile()

  def advance(self, state: State, step: int, limit: int) -> tuple[State, Metrics, int]:
    """One compiled call from `step` towards `limit`, donating the state: `(state, sums, steps)`."""
    self._build(state)
    length = limit - step
    if self.steps_per_call is not None:
      length = min(length, self.steps_per_call)
    state, sums, self.order = self._chunk(state, self.train.inputs, self.train.labels,
                                          self.order, np.int32(step), np.int32(length))
    return state, sums, length

  def close(self) -> None:
    """Nothing to release: the splits on the device go with the engine."""

  def batch_spec(self) -> Batch:
    """The shapes and dtypes of a training batch."""
    indices = jax.ShapeDtypeStruct((self.train.batch_size,), jnp.int32)
    return jax.eval_shape(gather_batch, self.train.inputs, self.train.labels, indices)

  def evaluate(self, state: State, name: str | None = None) -> Metrics:
    """The eval step's metric states over evaluation split `name` (None: the only one)."""
    if name not in self.eval_data or self.eval_step is None:
      raise ValueError(f"this engine has no evaluation split {name!r} (it has "
                       f"{sorted(map(str, self.eval_data))}) or no eval step.")
    self._build(state)
    return self._eval_all[name](self.eval_state(state), *self.eval_arrays[name])
