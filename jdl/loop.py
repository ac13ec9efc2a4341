"""The training loop: a plain `for` over steps, evaluation on the full eval split, hooks.

`fit` runs any pure train/eval step pair over batch sources; `train_and_evaluate` builds all the
pieces from an experiment config first. Hooks are plain callables `hook(step, state, record)`,
called after each evaluation with that evaluation's record.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jdl import augment as augment_lib
from jdl import data as data_lib
from jdl import metrics as metrics_lib
from jdl import models, optim, parallel, resident, runs, runtime, step as step_lib, transfer
from jdl.data import augment_tf
from jdl.checkpoint import Checkpointer
from jdl.logging import MetricWriter, truncate_jsonl
from jdl.state import PendingTrainState, TrainState, count_params, create_train_state

Record = dict[str, float]
Hook = Callable[[int, TrainState, Record], None]


def evaluate(
    state: TrainState,
    eval_step: Callable[[TrainState, data_lib.Batch], metrics_lib.Metrics],
    eval_data: data_lib.BatchSource,
    *,
    runner: parallel.Runner | None = None,
) -> dict[str, float]:
  """Means of the eval step's metrics over every example of `eval_data` (padding excluded).

  Args:
    state: the state, placed by `runner` when one is given.
    eval_step: the eval step, already compiled (by `runner.compile` or `jax.jit`).
    eval_data: the evaluation batch source.
    runner: the device layout; None feeds host batches straight to `eval_step`.
  """
  total = metrics_lib.empty_metrics()
  for batch in eval_data.epoch(0):
    if runner is not None:
      batch = runner.place_batch(batch, pad=True)
    total = metrics_lib.merge_metrics(total, eval_step(state, batch))
  if runner is not None and total is not None:
    total = runner.fetch_metrics(total)
  return metrics_lib.compute_metrics(total)


def output_width(state: TrainState) -> int:
  """The width of the model's output for one example (its number of classes)."""
  sample = jax.ShapeDtypeStruct((1, *state.input_shape), state.input_dtype)
  shape = jax.eval_shape(lambda v, x: state.apply_fn(v, x, train=False), state.variables(), sample)
  return int(shape.shape[-1])


def fit(
    state: TrainState | PendingTrainState,
    train_step: step_lib.TrainStepFn,
    eval_step: step_lib.EvalStepFn,
    train_data: data_lib.BatchSource,
    eval_data: data_lib.BatchSource | None = None,
    *,
    num_epochs: int | None = None,
    num_steps: int | None = None,
    eval_every_steps: int | None = None,
    hooks: Sequence[Hook] = (),
    writer: MetricWriter | None = None,
    progress: bool = True,
    eval_name: str = "test",
    runner: parallel.Runner | None = None,
    device_resident: bool | None = None,
    steps_per_call: int | None = None,
    checkpointer: Checkpointer | None = None,
    checkpoint_every_steps: int | None = None,
    checkpoint_min_seconds: float = 0.0,
    handle_signals: bool = True,
) -> tuple[TrainState, list[Record]]:
  """Trains `state` with `train_step` and evaluates it on the whole of `eval_data`.

  Two engines give the same batches and, for the same seed, the same parameters:
    * device-resident: in-memory splits (`ArraySource`) are copied to the device once and up to
      `steps_per_call` steps run per compiled call as one compiled loop, with each epoch's order
      drawn on the device inside it; metrics come back once per call. Used by default when the
      data fit (`jdl.resident.DEFAULT_RESIDENT_LIMIT_BYTES`), in a single-process run, outside
      pmap.
      A step with convolutions on the CPU runs one step per call instead, without a loop
      (`jdl.resident.loops_are_slow`), unless `steps_per_call` is given.
    * per-step: one compiled call per batch, batches fed from the host (streaming sources, pmap,
      multi-process runs).

  Args:
    state: the initial state; training continues from `state.step`. Its buffers are donated to
      the first step (the memory is reused), so use the returned state afterwards, not this one.
      A `PendingTrainState` (`jdl.start_train_state`) starts at step 0; the device-resident
      engine on one device compiles its first call from the state's shapes while the state is
      still being initialised.
    train_step: a pure `(state, batch) -> (state, metric sums)` step (compiled here).
    eval_step: a pure `(state, batch) -> metric sums` step (compiled here).
    train_data: the training batch source.
    eval_data: the evaluation batch source, or None to skip evaluation.
    num_epochs: train for this many passes over `train_data`...
    num_steps: ...or for this many gradient steps (wins over `num_epochs`).
    eval_every_steps: evaluate every this many steps; None means at the end of every epoch. The
      last step is always evaluated.
    hooks: callables `hook(step, state, record)` run after each evaluation.
    writer: where records go (JSON lines and TensorBoard), if anywhere.
    progress: show a progress bar and a summary line per evaluation.
    eval_name: prefix of the eval metrics in records (`test_accuracy`, ...).
    runner: the device layout (`jdl.parallel.make_runner`); None is plain jit on one device.
      The steps must be built with `runner.axis_name`.
    device_resident: force (True) or forbid (False) the device-resident engine; None chooses.
    steps_per_call: most steps per compiled call of the resident engine. None runs up to the next
      evaluation in one call, across epoch boundaries (fastest), or, when a progress bar or a
      checkpointer is on, at most to the end of the epoch (the bar moves, and a save happens,
      between calls). Each distinct call length compiles once.
    checkpointer: saves the state at every evaluation, at the end of every epoch, every
      `checkpoint_every_steps` steps and at the end (`jdl.checkpoint.Checkpointer`); evaluation
      records rank checkpoints for its `best_metric`.
    checkpoint_every_steps: save this often too (None or 0: evaluations and epoch ends only).
    checkpoint_min_seconds: skip an epoch-end or every-N-steps save that would come less than
      this many seconds after the previous save (saves at evaluations, at the end and on a
      signal always happen). Bounds the cost of checkpointing when epochs take milliseconds
      while a crash still loses at most about this much work.
    handle_signals: with a checkpointer, SIGTERM or SIGINT ends the current step (or scan chunk),
      saves and raises `Preempted`, whose message says how to resume.

  Raises:
    NonFiniteError: the loss or a gradient became NaN or infinite; the message names the step and
      the parameter, and no checkpoint is saved after it. The run stops at the next point where
      metrics reach the host (a progress update, an evaluation or a checkpoint).
    Preempted: a signal stopped the run after saving (see `handle_signals`).

  Returns:
    `(state, history)`: the final state (on one device: the first replica under pmap) and one
    record per evaluation, each with `step`, `epoch`, `train_*` means since the previous
    record, `{eval_name}_*` means over the eval split, `examples_per_second` and
    `elapsed_seconds`.
  """
  steps_per_epoch = train_data.steps_per_epoch
  if num_steps is None:
    if num_epochs is None:
      raise ValueError("fit needs num_epochs or num_steps.")
    num_steps = num_epochs * steps_per_epoch
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1; got {num_steps}.")
  if steps_per_call is not None and steps_per_call < 1:
    raise ValueError(f"steps_per_call must be >= 1; got {steps_per_call}.")
  eval_every = eval_every_steps or steps_per_epoch
  pending = state if isinstance(state, PendingTrainState) else None
  known = state.abstract if pending is not None else state  # shapes and static fields
  num_classes = output_width(known)
  runner = runner or parallel.JitRunner()
  resident = _use_resident(device_resident, runner, train_data, eval_data)
  step = 0 if pending is not None else int(state.step)  # a pending state is a fresh one

  def call_bounds(step: int) -> tuple[int, int]:
    """`(next evaluation, where the next call stops)`."""
    next_eval = min((step // eval_every + 1) * eval_every, num_steps)
    target = next_eval
    if checkpointer is not None or progress:  # epoch ends: a save, a moving progress bar
      target = min(target, (step // steps_per_epoch + 1) * steps_per_epoch)
    if checkpointer is not None and checkpoint_every_steps:  # and every N steps
      target = min(target, (step // checkpoint_every_steps + 1) * checkpoint_every_steps)
    return next_eval, target

  if resident:
    engine: _Engine = _ResidentEngine(runner, train_step, eval_step, train_data, eval_data,
                                      num_classes, steps_per_call)
  else:
    engine = _HostEngine(runner, train_step, eval_step, train_data, eval_data, num_classes)
  if pending is not None:
    engine.prepare(known, step, call_bounds(step)[1])  # compiles while the state initialises
    state = pending.result()
  state = runner.place_state(state)

  history: list[Record] = []
  interval_sums = metrics_lib.empty_metrics()
  start_time = interval_start = time.perf_counter()
  bar = tqdm.tqdm(total=num_steps, initial=step, unit="step", disable=not progress,
                  dynamic_ncols=True, leave=True, mininterval=0.5)
  last_bar_update = 0.0
  last_save = time.perf_counter()
  watch = _NonFiniteWatch(state, checkpointer)
  stop = _StopSignals() if handle_signals and checkpointer is not None else None
  try:
    while step < num_steps:
      next_eval, target = call_bounds(step)
      state, sums, advanced = engine.advance(state, step, target)
      interval_sums = metrics_lib.merge_metrics(interval_sums, sums)
      step += advanced
      bar.update(advanced)
      interrupted = stop is not None and stop.received is not None
      if progress and time.perf_counter() - last_bar_update > 0.5:
        running = runner.fetch_metrics(interval_sums)  # waits for the steps so far
        watch.check(running)
        running = metrics_lib.compute_metrics(running)
        last_bar_update = time.perf_counter()
        bar.set_postfix(loss=f"{running['loss']:.4f}", acc=f"{running.get('accuracy', 0):.4f}",
                        ex_s=f"{running['count'] / max(last_bar_update - interval_start, 1e-9):,.0f}")
      record: Record | None = None
      if step == next_eval:
        fetched = runner.fetch_metrics(interval_sums)
        watch.check(fetched)
        train_means = metrics_lib.compute_metrics(fetched)
        seconds = time.perf_counter() - interval_start
        record = {"step": step, "epoch": step / steps_per_epoch}
        record.update({f"train_{k}": v for k, v in train_means.items() if k != "count"})
        record["examples_per_second"] = train_means["count"] / max(seconds, 1e-9)
        record.update(_learning_rates(state))
        if eval_data is not None:
          eval_means = engine.evaluate(evaluation_state(state))
          record.update({f"{eval_name}_{k}": v for k, v in eval_means.items() if k != "count"})
        record["elapsed_seconds"] = time.perf_counter() - start_time
        history.append(record)
        if writer is not None:
          writer.write(step, {k: v for k, v in record.items() if k != "step"})
        if progress:
          bar.write(format_record(record))
        for hook in hooks:
          hook(step, runner.fetch_state(state), record)
        interval_sums = metrics_lib.empty_metrics()
        interval_start = time.perf_counter()
        interrupted = interrupted or (stop is not None and stop.received is not None)
      due = step == num_steps or record is not None or (
          step == target and time.perf_counter() - last_save >= checkpoint_min_seconds)
      if checkpointer is not None and (due or interrupted):
        if interval_sums is not None:
          watch.check(runner.fetch_metrics(interval_sums))
        checkpointer.save(runner.fetch_state(state), metrics=record)
        watch.saved_step = step
        last_save = time.perf_counter()
      if interrupted:
        checkpointer.wait()
        raise Preempted(step, stop.received, checkpointer.directory)
  finally:
    bar.close()
    if stop is not None:
      stop.restore()
  return runner.fetch_state(state), history


def evaluation_state(state: TrainState) -> TrainState:
  """The state to evaluate: `state` itself, or, when its optimizer keeps a moving average of the
  parameters (`optimizer.ema_decay`), `state` with the averaged parameters in their dtypes."""
  ema = optim.ema_parameters(state.opt_state)
  if ema is None:
    return state
  return state.replace(params=jax.tree.map(lambda e, p: e.astype(p.dtype), ema, state.params))


def _learning_rates(state: TrainState) -> dict[str, float]:
  """The learning rates of the latest update, as the optimizer records them (`jdl.optim`)."""
  # Under pmap the state holds one copy per device: read the first.
  return {name: float(np.asarray(jax.device_get(rate)).reshape(-1)[0])
          for name, rate in optim.learning_rates(state.opt_state).items()}


class Preempted(Exception):
  """Training stopped on SIGTERM or SIGINT after saving a checkpoint; running the same command
  again (same workdir) resumes from it."""

  def __init__(self, step: int, signal_name: str, directory: str) -> None:
    super().__init__(
        f"stopped by {signal_name} after step {step}; the checkpoint of step {step} is in "
        f"{directory}. Run the same command with the same workdir to resume from it.")
    self.step, self.signal_name, self.directory = step, signal_name, directory


class NonFiniteError(FloatingPointError):
  """The loss or a gradient became NaN or infinite; the message names the step and what."""


class _NonFiniteWatch:
  """Turns the train step's `nonfinite_step` / `nonfinite_what` metrics into a clear error."""

  def __init__(self, state: TrainState, checkpointer: Checkpointer | None) -> None:
    self.names = transfer.parameter_paths(state.params)  # in `jax.tree.leaves` order
    self.checkpointer = checkpointer
    self.saved_step: int | None = None

  def check(self, fetched: Mapping[str, Any] | None) -> None:
    if not fetched or "nonfinite_step" not in fetched:
      return
    bad_step = int(fetched["nonfinite_step"])
    if bad_step == metrics_lib.NO_NONFINITE_STEP:
      return
    what = int(fetched["nonfinite_what"])
    culprit = "the loss" if what == 0 else f"the gradient of parameter {self.names[what - 1]}"
    kept = ""
    if self.checkpointer is not None:
      steps = self.checkpointer.steps()
      kept = (f" The last good checkpoint (step {steps[-1]}) is kept in "
              f"{self.checkpointer.directory}." if steps else " No checkpoint had been saved yet.")
    raise NonFiniteError(
        f"{culprit} became NaN or infinite at step {bad_step}; training stopped.{kept} "
        "Try a lower learning rate, gradient clipping (optimizer.clip_norm) or checking the "
        "inputs of that step.")


class _StopSignals:
  """Records the first SIGTERM or SIGINT instead of dying, so the loop can save and stop; a
  second SIGINT interrupts at once. Installed only in the main thread."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self) -> None:
    self.received: str | None = None
    self.previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
      return
    for number in self.SIGNALS:
      self.previous[number] = signal.signal(number, self._handle)

  def _handle(self, number: int, frame: Any) -> None:
    del frame
    if self.received is not None and number == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signal.Signals(number).name

  def restore(self) -> None:
    for number, handler in self.previous.items():
      signal.signal(number, handler)


def _use_resident(requested: bool | None, runner: parallel.Runner, train_data: Any,
                  eval_data: Any) -> bool:
  sources = [train_data] + ([eval_data] if eval_data is not None else [])
  possible = (runner.supports_resident and jax.process_count() == 1
              and all(isinstance(s, data_lib.ArraySource) for s in sources))
  if requested and not possible:
    raise ValueError(
        "device_resident=True needs in-memory sources (ArraySource), a single process and a "
        f"layout other than pmap; got {type(train_data).__name__} with layout {runner.layout!r} "
        f"in {jax.process_count()} process(es)."
    )
  if requested is not None:
    return requested
  size = sum(resident.nbytes(s.inputs, s.labels) for s in sources) if possible else 0
  return possible and size <= resident.DEFAULT_RESIDENT_LIMIT_BYTES


class _Engine(Protocol):
  def prepare(self, abstract_state: TrainState, step: int, limit: int) -> None:
    """Gets `advance(state, step, limit)` ready from the state's shapes alone, where it can."""
    ...

  def advance(self, state: TrainState, step: int, limit: int) -> tuple[TrainState, Any, int]:
    """Trains from `step` towards `limit`; returns the state, metric sums and steps taken."""
    ...

  def evaluate(self, state: TrainState) -> dict[str, float]:
    ...


class _HostEngine:
  """One compiled call per batch; batches come from the host, checked there, and the next batch
  is made (and, on several devices, laid out on them) while the current step runs (dispatch is
  asynchronous)."""

  def __init__(self, runner, train_step, eval_step, train_data, eval_data, num_classes):
    self.runner, self.train_data, self.eval_data = runner, train_data, eval_data
    self.num_classes = num_classes
    # In-memory arrays are checked once, here; other sources batch by batch on the host.
    self.check_each_batch = not isinstance(train_data, data_lib.ArraySource)
    if not self.check_each_batch:
      data_lib.check_labels(train_data.labels, num_classes, where="training labels")
    self.train_step, self.eval_step = runner.compile(train_step, eval_step)
    self.batches: Any = None
    self.position = -1  # the step that `self.ready` trains
    self.ready: Any = None  # the next batch, already on the device

  def _next_placed(self, step: int):
    """The batch of `step`, checked and on the device (None when its epoch has no more)."""
    if self.position != step:
      epoch, skip = divmod(step, self.train_data.steps_per_epoch)
      self.batches = itertools.islice(self.train_data.epoch(epoch), skip, None)
    batch = next(self.batches, None)
    if batch is None:
      return None
    if self.check_each_batch:
      data_lib.check_inputs(batch["input"], where="training inputs")
      real_labels = batch["label"] if "mask" not in batch else batch["label"][batch["mask"]]
      data_lib.check_labels(real_labels, self.num_classes, where="training labels")
    return self.runner.place_batch(batch)

  def prepare(self, abstract_state, step, limit):
    del abstract_state, step, limit  # the step compiles on its first call

  def advance(self, state, step, limit):
    del limit  # one step per call
    batch = self.ready if self.position == step else self._next_placed(step)
    state, sums = self.train_step(state, batch)
    # While the step runs, fetch and place the next batch of this epoch.
    self.position = step + 1
    self.ready = self._next_placed(step + 1)
    if self.ready is None:
      self.position = -1
    return state, sums, 1

  def evaluate(self, state):
    return evaluate(state, self.eval_step, self.eval_data, runner=self.runner)


_BACKGROUND = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jdl-compile")

MIN_PROBED_STEPS = 16
"""Device-resident calls of at least this many steps check finiteness the fast way (see
`resident.with_nonfinite_probe`): its one read of a scalar per call costs a shorter call more
than the gradient checks it saves."""


class _ResidentEngine:
  """Whole splits on the device; `lax.scan` over up to `steps_per_call` steps per call."""

  def __init__(self, runner, train_step, eval_step, train_data, eval_data, num_classes,
               steps_per_call):
    for source in (train_data, eval_data):
      if source is not None:
        data_lib.check_inputs(source.inputs)
        data_lib.check_labels(source.labels, num_classes)
    self.runner, self.steps_per_call = runner, steps_per_call
    self.train = resident.ResidentData(
        *runner.place_replicated(resident.with_padding_row(train_data.inputs, train_data.labels)),
        batch_size=train_data.batch_size, shuffle=train_data.shuffle, seed=train_data.seed)
    self.train_step, self.eval_step = train_step, eval_step
    self.chunk = None  # built with the loop decision, from the traced step
    self.probed_chunk = None  # the fast first try of a long chunk, when the step checks finiteness
    self.order = runner.place_replicated(self.train.initial_order())
    self.eval_data, self.eval_all = eval_data, None
    self.eval_compiled: concurrent.futures.Future | None = None  # see `_compile_eval_while_training`
    if eval_data is not None:
      self.eval_arrays = runner.place_replicated(
          resident.with_padding_row(eval_data.inputs, eval_data.labels))
    self.loop = None  # decided on the first call, from the traced step (`resident.loops_are_slow`)

  def _decide_loop(self, state):
    """Steps run in a scan unless a loop would slow them down (convolutions on the CPU): then one
    compiled step per call, still on device-resident data, unless `steps_per_call` says more."""
    batch = jax.eval_shape(resident.gather_batch, self.train.inputs, self.train.labels,
                           jax.ShapeDtypeStruct((self.train.batch_size,), jnp.int32))
    train_step = resident.TracedStep(self.train_step, state, batch)  # traced once, used thrice
    self.loop = not resident.loops_are_slow(train_step)
    chunk = resident.make_train_chunk(train_step, self.train, self.runner.constrain_batch)
    options = runtime.program_compiler_options()  # `jdl.runtime.set_cpu_dot_library`
    self.chunk = jax.jit(chunk, static_argnames=("length",), donate_argnums=(0, 3),
                         compiler_options=options)
    watched = {"nonfinite_step", "nonfinite_what", "loss_sum"} <= train_step.out_shape[1].keys()
    if self.loop and watched:
      # Not donated: the state it starts from is kept until its probe says it is not needed.
      self.probed_chunk = jax.jit(resident.with_nonfinite_probe(resident.make_train_chunk(
          resident.checking_loss_only(train_step), self.train, self.runner.constrain_batch)),
          static_argnames=("length",), compiler_options=options)
    if self.steps_per_call is None and not self.loop:
      self.steps_per_call = 1
    if self.eval_data is not None:
      eval_batch = jax.eval_shape(resident.gather_batch, *self.eval_arrays,
                                  jax.ShapeDtypeStruct((self.eval_data.batch_size,), jnp.int32))
      eval_step = resident.TracedStep(self.eval_step, evaluation_state(state), eval_batch)
      self.eval_all = resident.make_eval_all(
          eval_step, self.eval_data.batch_size, self.eval_data.num_examples,
          self.runner.constrain_batch, loop=self.loop)

  def prepare(self, abstract_state, step, limit):
    """Traces the steps and compiles the program of the first call from the state's shapes (on
    one device; elsewhere the placed state's layout is part of the program), so that it compiles
    while a pending state initialises; the call then finds it in jit's cache."""
    self._decide_loop(abstract_state)
    if self.runner.layout != "none":
      return
    program, length = self._program(step, limit)
    program.lower(abstract_state, self.train.inputs, self.train.labels, self.order,
                  np.int32(step), length=length).compile()

  def _program(self, step, limit):
    """`(compiled loop, number of steps)` of the call from `step` towards `limit`: the probed
    loop for a long enough call of a step that checks finiteness, else the plain one."""
    length = limit - step
    if self.steps_per_call is not None:
      length = min(length, self.steps_per_call)
    probed = self.probed_chunk is not None and length >= MIN_PROBED_STEPS
    return (self.probed_chunk if probed else self.chunk), length

  def advance(self, state, step, limit):
    if self.loop is None:
      self._decide_loop(state)
    program, length = self._program(step, limit)
    args = (self.train.inputs, self.train.labels)
    if program is self.probed_chunk:
      # Steps that check only their loss, then the parameters once; where that finds something
      # NaN or infinite (one scalar read per call), the same steps again from the same start with
      # every gradient checked, so the watch names the step and parameter as it always would.
      start, start_order = state, self.order
      state, sums, order, suspect = self.probed_chunk(state, *args, start_order, np.int32(step),
                                                      length=length)
      self._compile_eval_while_training(state)
      if bool(suspect):
        state, sums, order = self.chunk(start, *args, start_order, np.int32(step), length=length)
      self.order = order
      return state, sums, length
    state, sums, self.order = self.chunk(state, *args, self.order, np.int32(step), length=length)
    return state, sums, length

  def _compile_eval_while_training(self, state):
    """Once, on one device: starts compiling the evaluation program in a thread of its own while
    the steps just dispatched run. XLA compiles with Python's lock released, and on a CPU with
    `cpu_threads=1` the steps leave a core free (the MNIST-1D CNN's evaluation program took 0.3 s
    of compiling in a 4 s run)."""
    if self.eval_all is None or self.eval_compiled is not None or self.runner.layout != "none":
      return
    specs = jax.eval_shape(evaluation_state, state)  # shapes, dtypes and weak types
    eval_all, arrays = self.eval_all, self.eval_arrays
    self.eval_compiled = _BACKGROUND.submit(lambda: eval_all.lower(specs, *arrays).compile())

  def evaluate(self, state):
    if self.loop is None:
      self._decide_loop(state)
    eval_all = self.eval_all
    if self.eval_compiled is not None and self.eval_compiled.exception() is None:
      eval_all = self.eval_compiled.result()  # for the same shapes, on the same device
    sums = eval_all(state, *self.eval_arrays)
    return metrics_lib.compute_metrics(self.runner.fetch_metrics(sums))


def format_record(record: Mapping[str, float]) -> str:
  """One line for a record: `epoch 3.00 step 120 | train loss ... | test loss ... | ex/s`."""
  parts = [f"epoch {record['epoch']:.2f}  step {int(record['step'])}"]
  prefixes = sorted({k.rsplit("_", 1)[0] for k in record if k.endswith("_loss")},
                   key=lambda p: (p != "train", p))
  for prefix in prefixes:
    fields = [f"loss {record[f'{prefix}_loss']:.4f}"]
    if f"{prefix}_accuracy" in record:
      fields.append(f"accuracy {record[f'{prefix}_accuracy']:.4f}")
    parts.append(f"{prefix} " + " ".join(fields))
  parts.append(f"{record['examples_per_second']:,.0f} ex/s")
  return " | ".join(parts)


def train_and_evaluate(config: Any, workdir: str,
                       hooks: Sequence[Hook] = ()) -> tuple[TrainState, list[Record]]:
  """Runs a classification experiment described by `config`, writing logs to `workdir`.

  The config keys are those of `jdl.config.classification_config()`. Joins a multi-process run
  when the environment asks for it (`config.distributed`), picks the device layout
  (`config.layout`), and prints a progress bar, one line per evaluation and a final line with the
  eval split's accuracy; in a multi-process run only process 0 prints and writes.

  With `config.checkpoint`, checkpoints go to `workdir/checkpoints`, and a workdir that holds
  some resumes from the latest good one (`config.resume`): the data order, dropout and
  augmentation are functions of the step, so the resumed run ends exactly where an uninterrupted
  one would. `metrics.jsonl` keeps only the records up to the resumed step, so no step appears
  twice.

  Args:
    config: the experiment config.
    workdir: where logs and checkpoints go.
    hooks: callables `hook(step, state, record)` run after each evaluation (see `fit`).

  Returns:
    `(state, history)` as `fit` returns them (history: this invocation's records).
  """
  runtime.apply_cpu_threads(config.get("cpu_threads", 0))  # like the next: before JAX starts
  with runtime.using_cpu_dot_library(config.get("cpu_dot_library", "default")):
    return _train_and_evaluate(config, workdir, hooks)


def _train_and_evaluate(config: Any, workdir: str,
                        hooks: Sequence[Hook]) -> tuple[TrainState, list[Record]]:
  """The run `train_and_evaluate` describes, once its process-wide settings are made."""
  parallel.initialize_distributed(config.distributed)
  _check_loss_matches_output(config)
  device_augment, pipeline_augment = make_augmentations(config.augment, in_memory=config.in_memory)
  runner = parallel.make_runner(config.layout, num_devices=config.num_devices or None,
                                batch_size=config.batch_size)
  main = parallel.is_main_process()
  log = print if main else (lambda message: None)
  eval_name = config.eval_split.split("[")[0]
  checkpointer = None
  if config.checkpoint:
    best = f"{eval_name}_{config.best_metric}" if config.best_metric else None
    checkpointer = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), keep=config.keep_checkpoints,
                                best_metric=best)
    if checkpointer.steps() and not config.resume:
      raise ValueError(
          f"{checkpointer.directory} already holds checkpoints (steps {checkpointer.steps()}) and "
          "config.resume is false; use a new workdir, or resume=true to continue that run.")
    if checkpointer.steps():
      check_resumable(workdir, config)
  train_data, eval_data, meta, vocabulary = runs.load_task_data(
      config, pipeline_augment=pipeline_augment)
  model = models.build_model(config.model, num_classes=meta.num_classes, axis_name=runner.axis_name)
  num_steps = config.num_steps or config.num_epochs * train_data.steps_per_epoch
  tx = optim.make_optimizer(config.optimizer, total_steps=num_steps)
  sample = np.zeros((1, *meta.input_shape), meta.input_dtype)
  state = create_train_state(model, tx, sample, jax.random.PRNGKey(config.seed))
  state = transfer.apply_transfer_config(state, config.get("transfer"), log=log)
  if checkpointer is not None and config.resume:
    restored = checkpointer.restore_latest(state, log=log)
    if restored is not None:
      state = restored
      log(f"resuming from the checkpoint of step {int(state.step)} in {checkpointer.directory}.")
      if main:
        truncate_jsonl(workdir, int(state.step))
  train_step, eval_step = step_lib.make_classification_steps(
      config.loss, l1=config.l1, l2=config.l2, top_k=tuple(config.top_k),
      axis_name=runner.axis_name, augment=device_augment,
      label_smoothing=config.label_smoothing, compute_dtype=config.compute_dtype,
      adversary=make_adversary(config.adversarial), check_finite=config.check_finite,
  )
  if config.progress:
    log(f"{meta.name}: {train_data.num_examples} train / {eval_data.num_examples} "
        f"{config.eval_split} examples, input {meta.input_shape}, {meta.num_classes} classes; "
        f"model {config.model.name} with {count_params(state.params):,} parameters; "
        f"{num_steps} steps of batch {config.batch_size} on {runner.num_devices} "
        f"{jax.devices()[0].platform} device(s), layout {runner.layout!r}.")
  writer = MetricWriter(workdir) if main else None
  try:
    if writer is not None:
      writer.write_config(config)
      runs.write_run_metadata(workdir, meta, vocabulary)
    if int(state.step) >= num_steps:
      log(f"the checkpoint is already at step {int(state.step)} of {num_steps}: nothing to train.")
      return state, []
    state, history = fit(
        state, train_step, eval_step, train_data, eval_data,
        num_steps=num_steps,
        eval_every_steps=config.eval_every_steps or None,
        hooks=hooks,
        writer=writer,
        progress=config.progress and main,
        eval_name=eval_name,
        runner=runner,
        checkpointer=checkpointer,
        checkpoint_every_steps=config.checkpoint_every_steps or None,
        checkpoint_min_seconds=config.checkpoint_min_seconds,
    )
  finally:
    if writer is not None:
      writer.close()
    if checkpointer is not None:
      checkpointer.close()
  final = history[-1]
  if config.task == "language_model":
    log(f"final {eval_name} loss: {final[f'{eval_name}_loss']:.4f} nats per character "
        f"(next-character accuracy {final[f'{eval_name}_accuracy']:.4f}) after "
        f"{int(final['step'])} steps, {final['elapsed_seconds']:.1f}s, "
        f"{history[-1]['examples_per_second']:,.0f} tokens/s")
  else:
    log(f"final {eval_name} accuracy: {final[f'{eval_name}_accuracy']:.4f} "
        f"(loss {final[f'{eval_name}_loss']:.4f}) after {int(final['step'])} steps, "
        f"{final['elapsed_seconds']:.1f}s")
  return state, history


CHECKPOINT_DIR = runs.CHECKPOINT_DIR


RESUMABLE_CHANGES = frozenset({
    "num_steps", "num_epochs", "eval_every_steps", "eval_batch_size", "progress", "resume",
    "checkpoint", "checkpoint_every_steps", "checkpoint_min_seconds", "keep_checkpoints",
    "best_metric", "check_finite", "data_dir", "manual_dir", "download", "distributed",
    "num_devices", "layout", "cpu_threads", "cpu_dot_library"})
"""Config keys a resumed run may change: how long, how often to evaluate or save, where the data
is, on which devices. Every other key shapes the trajectory (seed, model, optimizer, data...)."""


def check_resumable(workdir: str, config: Any) -> None:
  """Raises ValueError if `workdir` holds a run whose saved config differs from `config` in a
  key outside `RESUMABLE_CHANGES`: resuming would silently continue that run with other
  settings (another seed, say). A workdir without `config.json` is not checked."""
  try:
    saved = runs.read_config(workdir).to_dict()
  except FileNotFoundError:
    return
  saved = _flat(saved)
  now = _flat(config.to_dict() if hasattr(config, "to_dict") else dict(config))
  # Keys only one side has (a config written before a key existed) are not compared.
  differing = [key for key in sorted(set(saved) & set(now))
               if key.split(".")[0] not in RESUMABLE_CHANGES and saved[key] != now[key]]
  if differing:
    changes = "; ".join(f"{key}: {saved[key]!r} there, {now[key]!r} now" for key in differing[:5])
    raise ValueError(
        f"{workdir} holds checkpoints of a run with another config ({changes}"
        f"{'; ...' if len(differing) > 5 else ''}). Resuming would continue that run with these "
        "settings; use a new workdir for the new run, or the saved config to resume the old one.")


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Dotted keys -> values, normalised as `config.json` stores them (lists, strings)."""
  flat: dict[str, Any] = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = json.loads(json.dumps(value, default=str))
  return flat


def make_adversary(adversarial_config: Mapping[str, Any]) -> step_lib.AdversaryFn | None:
  """The train step's adversary `config.adversarial` asks for (None while its epsilon is 0)."""
  settings = dict(adversarial_config)
  epsilon = settings.pop("epsilon")
  if not epsilon:
    return None
  from jdl.analysis import adversarial  # pylint: disable=import-outside-toplevel

  value_range = settings.pop("value_range")
  return adversarial.make_adversary(
      epsilon, value_range=None if value_range is None else tuple(value_range), **settings)


AUGMENT_PLACES = ("device", "pipeline")


def make_augmentations(
    augment_config: Mapping[str, Any], *, in_memory: bool
) -> tuple[step_lib.AugmentFn | None, data_lib.PipelineAugmentFn | None]:
  """The `(device, pipeline)` augmentations `config.augment` asks for; at most one is not None.

  "device" runs jax ops inside the train step (either data path, every layout; the key comes from
  the step), "pipeline" runs tf.data ops on the host (streaming data only). The spec is checked
  here, before any data is loaded.
  """
  spec = {key: value for key, value in dict(augment_config).items() if key != "where"}
  where = augment_config.get("where", "device")
  if where not in AUGMENT_PLACES:
    raise ValueError(f"unknown config.augment.where {where!r}; expected one of {AUGMENT_PLACES}.")
  if where == "device":
    return augment_lib.make_augment(spec), None
  pipeline = augment_tf.make_tf_augment(spec)
  if pipeline is not None and in_memory:
    raise ValueError(
        "config.augment.where='pipeline' augments in tf.data, which needs in_memory=False; "
        "set --config.in_memory=false, or augment on the device with where='device'."
    )
  return None, pipeline


def _check_loss_matches_output(config: Any) -> None:
  """A softmax output needs the probability loss and logits need the logit loss: mixing them
  trains on a silently wrong objective."""
  model_attributes = config.model.get(config.model.name) or {}
  output = model_attributes.get("output", "logits")
  expected = {"logits": "softmax_cross_entropy", "softmax": "cross_entropy_from_probabilities"}
  if output in expected and config.loss != expected[output]:
    raise ValueError(
        f"model output {output!r} needs loss {expected[output]!r}, but config.loss is "
        f"{config.loss!r}."
    )
