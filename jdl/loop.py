"""The training loop: a plain `for` over steps, evaluation on the full eval split, hooks.

`fit` runs any pure train/eval step pair over batch sources, on the device-resident engine
(`jdl.resident`) where the data fit on the device, else one compiled step per host batch.
`jdl.experiment.train_and_evaluate` builds the pieces from a config and calls it. Hooks are plain
callables `hook(step, state, record)`, called after each evaluation with that evaluation's record.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from jdl import data as data_lib
from jdl import metrics as metrics_lib
from jdl import optim, parallel, resident, step as step_lib, transfer
from jdl.checkpoint import Checkpointer
from jdl.writers import MetricWriter
from jdl.state import TrainState

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
  total = evaluation_sums(state, eval_step, eval_data, runner=runner)
  if runner is not None and total is not None:
    total = runner.fetch_metrics(total)
  return metrics_lib.compute_metrics(total)


def evaluation_sums(state: TrainState, eval_step: Callable[..., metrics_lib.Metrics],
                    eval_data: data_lib.BatchSource, *,
                    runner: parallel.Runner | None = None) -> metrics_lib.Metrics:
  """The eval step's metric sums over every batch of `eval_data`, merged (on the devices)."""
  total = metrics_lib.empty_metrics()
  for batch in eval_data.epoch(0):
    if runner is not None:
      batch = runner.place_batch(batch, pad=True)
    total = metrics_lib.merge_metrics(total, eval_step(state, batch))
  return total


def output_width(state: TrainState) -> int:
  """The width of the model's output for one example (its number of classes)."""
  sample = jax.ShapeDtypeStruct((1, *state.input_shape), state.input_dtype)
  shape = jax.eval_shape(lambda v, x: state.apply_fn(v, x, train=False), state.variables(), sample)
  return int(shape.shape[-1])


def fit(
    state: TrainState,
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

  Two engines give the same batches and, for the same seed, the same parameters up to float
  rounding:
    * device-resident (`jdl.resident.ResidentEngine`): in-memory splits (`ArraySource`) are
      copied to the device once and the steps up to the next evaluation (or epoch end, or save)
      run as one compiled loop, with each epoch's order drawn on the device; metrics come back
      once per call. Used by default when the data fit (`jdl.resident.DEFAULT_RESIDENT_LIMIT_BYTES`),
      in a single-process run, outside pmap.
    * per-step: one compiled call per batch, batches fed from the host (streaming sources, pmap,
      multi-process runs).

  Args:
    state: the initial state; training continues from `state.step`. Its buffers are donated to
      the first step (the memory is reused), so use the returned state afterwards, not this one.
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
      between calls). Every call length runs the same compiled program.
    checkpointer: saves the state at every evaluation, at the end of every epoch, every
      `checkpoint_every_steps` steps and at the end (`jdl.checkpoint.Checkpointer`); evaluation
      records rank checkpoints for its `best_metric`.
    checkpoint_every_steps: save this often too (None or 0: evaluations and epoch ends only).
    checkpoint_min_seconds: skip an epoch-end or every-N-steps save that would come less than
      this many seconds after the previous save (saves at evaluations, at the end and on a
      signal always happen). Bounds the cost of checkpointing when epochs take milliseconds
      while a crash still loses at most about this much work.
    handle_signals: with a checkpointer, SIGTERM or SIGINT ends the current step (or scan chunk),
      saves and raises `Preempted`, whose message says how to resume. In a multi-process run a
      signal to any one process stops every process after the same step.

  Raises:
    NonFiniteError: the loss or a gradient became NaN or infinite; the message names the step and
      the parameter, and no checkpoint is saved after it. The run stops at the next point where
      metrics reach the host (a progress update, an evaluation or a checkpoint).
    Preempted: a signal stopped the run after saving (see `handle_signals`).
    CheckpointWriteError: a checkpoint could not be written; raised at the next call of steps
      after the failed save (the checkpoints before it are intact).

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
  for name, value in (("eval_every_steps", eval_every_steps),
                      ("checkpoint_every_steps", checkpoint_every_steps)):
    if value is not None and value < 0:
      raise ValueError(f"{name} must be >= 1, or None or 0 for the default; got {value}.")
  eval_every = eval_every_steps or steps_per_epoch
  runner = runner or parallel.JitRunner()
  engine = _make_engine(state, train_step, eval_step, train_data, eval_data, runner=runner,
                        device_resident=device_resident, steps_per_call=steps_per_call)
  step = int(state.step)

  def call_bounds(step: int) -> tuple[int, int]:
    """`(next evaluation, where the next call stops)`."""
    next_eval = min((step // eval_every + 1) * eval_every, num_steps)
    target = next_eval
    if checkpointer is not None or progress:  # epoch ends: a save, a moving progress bar
      target = min(target, (step // steps_per_epoch + 1) * steps_per_epoch)
    if checkpointer is not None and checkpoint_every_steps:  # and every N steps
      target = min(target, (step // checkpoint_every_steps + 1) * checkpoint_every_steps)
    return next_eval, target

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
      if checkpointer is not None:
        checkpointer.raise_if_failed()  # a save that failed in the background stops the run now
      next_eval, target = call_bounds(step)
      state, sums, advanced = engine.advance(state, step, target)
      interval_sums = metrics_lib.merge_metrics(interval_sums, sums)
      step += advanced
      bar.update(advanced)
      if progress and time.perf_counter() - last_bar_update > 0.5:
        running = runner.fetch_metrics(interval_sums)  # waits for the steps so far
        watch.check(running)
        last_bar_update = time.perf_counter()
        bar.set_postfix(_progress_fields(metrics_lib.compute_metrics(running),
                                         last_bar_update - interval_start))
      record: Record | None = None
      if step == next_eval:
        fetched = runner.fetch_metrics(interval_sums)
        watch.check(fetched)
        record = _record(step, steps_per_epoch, fetched, time.perf_counter() - interval_start,
                         state)
        if eval_data is not None:
          eval_means = metrics_lib.compute_metrics(runner.fetch_metrics(engine.evaluate(state)))
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
      timely = step == target and time.perf_counter() - last_save >= checkpoint_min_seconds
      stopped_by = None
      if checkpointer is not None:  # every process must save, or not, at the same steps
        check = step == target or step % AGREE_EVERY == 0
        stopped_by, timely = _agree(stop, timely, due_check=check)
      interrupted = stopped_by is not None
      due = step == num_steps or record is not None or timely
      if checkpointer is not None and (due or interrupted):
        if interval_sums is not None:
          watch.check(runner.fetch_metrics(interval_sums))
        checkpointer.save(runner.fetch_state(state), metrics=record)
        last_save = time.perf_counter()
      if interrupted:
        checkpointer.wait()
        raise Preempted(step, stopped_by, checkpointer.directory)
  finally:
    bar.close()
    if stop is not None:
      stop.restore()
  return runner.fetch_state(state), history


AGREE_EVERY = 10
"""In a multi-process run, the processes agree on a stop every this many steps (and wherever a
call of steps ends at an evaluation, epoch end or save), so a signal stops them within that."""


def _agree(stop: _StopSignals | None, timely: bool, *,
           due_check: bool) -> tuple[str | None, bool]:
  """`(the signal that stops the run, whether a time-based save is due)`, the same on every
  process. In a multi-process run a signal to any one process stops them all at the same step,
  and process 0's clock decides the time-based saves: every process takes part in a save, so one
  that saved or stopped alone would leave the others waiting for it forever. One all-gather of
  two numbers where `due_check` (the same steps on every process); a single process just reads
  its own signal."""
  received = stop.received if stop is not None else None
  if jax.process_count() == 1:
    return received, timely
  if not due_check:
    return None, False
  number = signal.Signals[received].value if received else 0
  gathered = multihost_utils.process_allgather(np.array([number, timely], np.int32))
  rows = np.asarray(gathered).reshape(-1, 2)  # one row per process
  timely = bool(rows[0, 1])
  signalled = [index for index, row in enumerate(rows) if row[0]]
  if not signalled:
    return None, timely
  name = signal.Signals(int(rows[signalled[0], 0])).name
  return (name if received == name else f"{name} (to process {signalled[0]})"), timely


def _record(step: int, steps_per_epoch: int, train_sums: metrics_lib.Metrics, seconds: float,
            state: TrainState) -> Record:
  """An evaluation record's training part: step, epoch, `train_*` means, speed, learning rates."""
  train_means = metrics_lib.compute_metrics(train_sums)
  record = {"step": step, "epoch": step / steps_per_epoch}
  record.update({f"train_{k}": v for k, v in train_means.items() if k != "count"})
  record["examples_per_second"] = train_means["count"] / max(seconds, 1e-9)
  record.update(_learning_rates(state))
  return record


def _progress_fields(running: Mapping[str, float], seconds: float) -> dict[str, str]:
  return {"loss": f"{running['loss']:.4f}", "acc": f"{running.get('accuracy', 0):.4f}",
          "ex_s": f"{running['count'] / max(seconds, 1e-9):,.0f}"}


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


def _make_engine(state: TrainState, train_step, eval_step, train_data, eval_data, *,
                 runner: parallel.Runner, device_resident: bool | None,
                 steps_per_call: int | None) -> _Engine:
  """The device-resident engine where the data allow it (and `device_resident` does not forbid
  it), else the per-step host engine. In-memory splits are checked here, once."""
  num_classes = output_width(state)
  sources = [train_data] + ([eval_data] if eval_data is not None else [])
  for source in sources:
    if isinstance(source, data_lib.ArraySource):
      data_lib.check_inputs(source.inputs)
      data_lib.check_labels(source.labels, num_classes)
  possible = (runner.supports_resident and jax.process_count() == 1
              and all(isinstance(s, data_lib.ArraySource) for s in sources))
  if device_resident and not possible:
    raise ValueError(
        "device_resident=True needs in-memory sources (ArraySource), a single process and a "
        f"layout other than pmap; got {type(train_data).__name__} with layout {runner.layout!r} "
        f"in {jax.process_count()} process(es).")
  if device_resident is None:
    size = sum(resident.nbytes(s.inputs, s.labels) for s in sources) if possible else 0
    device_resident = possible and size <= resident.DEFAULT_RESIDENT_LIMIT_BYTES
  if device_resident:
    return resident.ResidentEngine(
        train_step, eval_step, train_data, eval_data, place=runner.place_replicated,
        constrain=runner.constrain_batch, steps_per_call=steps_per_call,
        eval_state=evaluation_state)
  return _HostEngine(runner, train_step, eval_step, train_data, eval_data, num_classes)


class _Engine(Protocol):
  def advance(self, state: TrainState, step: int, limit: int) -> tuple[TrainState, Any, int]:
    """Trains from `step` towards `limit`; returns the state, metric sums and steps taken."""
    ...

  def evaluate(self, state: TrainState) -> metrics_lib.Metrics:
    """The metric sums over the whole evaluation split."""
    ...


class _HostEngine:
  """One compiled call per batch; batches come from the host, checked there, and the next batch
  is made (and, on several devices, laid out on them) while the current step runs (dispatch is
  asynchronous)."""

  def __init__(self, runner, train_step, eval_step, train_data, eval_data, num_classes):
    self.runner, self.train_data, self.eval_data = runner, train_data, eval_data
    self.num_classes = num_classes
    # In-memory arrays were checked once (`_make_engine`); other sources batch by batch here.
    self.check_each_batch = not isinstance(train_data, data_lib.ArraySource)
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
    return evaluation_sums(evaluation_state(state), self.eval_step, self.eval_data,
                           runner=self.runner)


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
