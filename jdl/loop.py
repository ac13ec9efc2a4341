"""The training loop: a plain `for` over steps, evaluation on the full eval split, and hooks,
plain callables `hook(step, state, record)` called after each evaluation with its record.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from jdl import data as data_lib
from jdl import flops as flops_lib
from jdl import metrics as metrics_lib
from jdl import optim, parallel, prefetch, resident, step as step_lib, transfer
from jdl.checkpoint import Checkpointer
from jdl.writers import MetricWriter
from jdl import state as state_lib
from jdl.state import TrainState

Record = dict[str, float]
Hook = Callable[[int, TrainState, Record], None]


def evaluate(state: TrainState,
             eval_step: Callable[[TrainState, data_lib.Batch], metrics_lib.Metrics],
             eval_data: data_lib.BatchSource, *,
             runner: parallel.Runner | None = None) -> dict[str, float]:
  """Means of the eval step's metrics over every example of `eval_data` (padding excluded);
  `eval_step` is compiled (`runner.compile` or `jax.jit`) and `state` placed by `runner`."""
  total = evaluation_sums(state, eval_step, eval_data, runner=runner)
  fetched = total if runner is None or total is None else runner.fetch_metrics(total)
  return metrics_lib.compute_metrics(fetched)


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


def output_width(state: TrainState) -> int | None:
  """The width of one example's output (its number of classes); None if not one array (a VAE's)."""
  mode = state_lib.model_mode(state.apply_fn, train=False)
  try:
    shape = jax.eval_shape(lambda v, x: state.apply_fn(v, x, **mode), state.variables(),
                           state.input_specs())
  except flax.errors.InvalidRngError:  # a model that samples in eval mode: not a classifier
    return None
  return int(shape.shape[-1]) if isinstance(shape, jax.ShapeDtypeStruct) and shape.ndim else None


def fit(state: TrainState, train_step: step_lib.TrainStepFn, eval_step: step_lib.EvalStepFn,
        train_data: data_lib.BatchSource,
        eval_data: data_lib.BatchSource | Mapping[str, data_lib.BatchSource] | None = None, *,
        num_epochs: int | None = None, num_steps: int | None = None,
        eval_every_steps: int | Mapping[str, int] | None = None, hooks: Sequence[Hook] = (),
        writer: MetricWriter | None = None, progress: bool = True, eval_name: str = "test",
        runner: parallel.Runner | None = None, device_resident: bool | None = None,
        steps_per_call: int | None = None, checkpointer: Checkpointer | None = None,
        checkpoint_every_steps: int | None = None, checkpoint_min_seconds: float = 0.0,
        handle_signals: bool = True) -> tuple[TrainState, list[Record]]:
  """Trains `state` with `train_step` and evaluates it on the whole of `eval_data`.

  In-memory splits (`ArraySource`) within `resident.DEFAULT_RESIDENT_LIMIT_BYTES` stay on the
  device, and the steps up to the next evaluation, epoch end or save run as one compiled loop (in
  one process, outside pmap); otherwise each host batch goes to one compiled step. Both give the
  same batches and, for one seed, the same parameters up to float rounding.

  Args:
    state: the initial state; training continues from `state.step`. Its buffers are donated: use
      the returned state afterwards.
    train_step: a pure `(state, batch) -> (state, metric sums)` step built with
      `runner.axis_name` (compiled here); `eval_step` likewise, `(state, batch) -> metric sums`.
    eval_data: one evaluation source (its metrics prefixed with `eval_name` in records), several
      as `{name: source}` (prefixed with their names), or None.
    num_epochs: passes over `train_data`, unless `num_steps` (gradient steps) is given.
    eval_every_steps: evaluate every this many steps, or `{name: steps}` per source; None (or a
      name left out): at every epoch end. The last step evaluates every source.
    writer: where records go (JSON lines and TensorBoard); `progress`: a bar and a line each.
    runner: the device layout (`jdl.parallel.make_runner`); None is plain jit on one device.
    device_resident: force (True) or forbid (False) the device-resident engine; None chooses.
    steps_per_call: most steps per call of the resident engine; None: up to the next evaluation,
      or the epoch end with a progress bar or a checkpointer. Any length runs one program.
    checkpointer: saves at every evaluation (ranked by its `best_metric`), at every epoch end,
      every `checkpoint_every_steps` steps (None or 0: none such) and at the end; an epoch-end or
      every-N-steps save less than `checkpoint_min_seconds` after the previous one is skipped.
    handle_signals: with a checkpointer, SIGTERM or SIGINT (to any process of the run) ends the
      current step or chunk on every process, saves and raises `Preempted`.

  Raises NonFiniteError once the loss or a gradient became NaN or infinite (naming the step and
  the parameter; nothing is saved after it), and CheckpointWriteError after a save failed.

  Returns `(state, history)`: the final state (the first replica under pmap) and one record per
  evaluation: `step`, `epoch`, `train_*` means since the previous record, `{eval_name}_*` means,
  `examples_per_second` and `elapsed_seconds`.
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
  if checkpoint_every_steps is not None and checkpoint_every_steps < 0:
    raise ValueError(f"checkpoint_every_steps must be >= 1, or None or 0 for the default; got "
                     f"{checkpoint_every_steps}.")
  plan = _EvaluationPlan.make(eval_data, eval_name, eval_every_steps, steps_per_epoch, num_steps)
  runner = runner or parallel.JitRunner()
  engine = _make_engine(state, train_step, eval_step, train_data, plan.sources, runner=runner,
                        device_resident=device_resident, steps_per_call=steps_per_call)
  speed = _Speed(runner, train_step, state, engine, enabled=progress or writer is not None)
  # Calls of steps also stop at epoch ends (a save, a moving bar) and every N steps (a save).
  stops = [steps_per_epoch] if checkpointer is not None or progress else []
  if checkpointer is not None and checkpoint_every_steps:
    stops.append(checkpoint_every_steps)
  step = int(state.step)
  state = runner.place_state(state)
  history: list[Record] = []
  interval_sums = metrics_lib.empty_metrics()
  start_time = interval_start = last_save = time.perf_counter()
  bar = tqdm.tqdm(total=num_steps, initial=step, unit="step", disable=not progress,
                  dynamic_ncols=True, leave=True, mininterval=0.5)
  last_bar_update = 0.0
  watch = _NonFiniteWatch(state, runner, checkpointer)
  stop = _StopSignals(install=handle_signals and checkpointer is not None)
  try:
    while step < num_steps:
      if checkpointer is not None:
        checkpointer.raise_if_failed()  # a save that failed in the background stops the run now
      next_eval = plan.next_record(step)
      target = min([next_eval] + [(step // every + 1) * every for every in stops])
      state, sums, advanced = engine.advance(state, step, target)
      interval_sums = metrics_lib.merge_metrics(interval_sums, sums)
      step += advanced
      bar.update(advanced)
      if progress and time.perf_counter() - last_bar_update > 0.5:
        running = watch.fetch(interval_sums, step, state)  # waits for the steps so far
        last_bar_update = time.perf_counter()
        bar.set_postfix(_progress_fields(metrics_lib.compute_metrics(running),
                                         last_bar_update - interval_start))
      record: Record | None = None
      if step == next_eval:
        record = _record(step, steps_per_epoch, watch.fetch(interval_sums, step, state),
                         time.perf_counter() - interval_start, state, speed)
        for name in plan.due(step):
          eval_means = metrics_lib.compute_metrics(
              runner.fetch_metrics(engine.evaluate(state, name)))
          record.update({f"{name}_{k}": v for k, v in eval_means.items() if k != "count"})
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
      if checkpointer is None:
        continue
      # Every process must save, or not, at the same steps.
      timely = step == target and time.perf_counter() - last_save >= checkpoint_min_seconds
      stopped_by, timely = stop.agree(timely, due_check=step == target or step % AGREE_EVERY == 0)
      if step == num_steps or record is not None or timely or stopped_by is not None:
        watch.fetch(interval_sums, step, state)
        ranked = record is not None and checkpointer.best_metric in (None, *record)
        checkpointer.save(runner.fetch_state(state), metrics=record if ranked else None)
        last_save = time.perf_counter()
      if stopped_by is not None:
        checkpointer.wait()
        raise Preempted(step, stopped_by, checkpointer.directory)
  finally:
    bar.close()
    engine.close()
    stop.restore()
  return runner.fetch_state(state), history


@dataclasses.dataclass(frozen=True)
class _EvaluationPlan:
  """The evaluation sources by name, when records are written and which sources each evaluates."""

  sources: dict[str, data_lib.BatchSource]
  every: dict[str, int]  # source name ("" without evaluation) -> cadence in steps
  num_steps: int

  @classmethod
  def make(cls, eval_data: Any, eval_name: str, eval_every_steps: int | Mapping[str, int] | None,
           steps_per_epoch: int, num_steps: int) -> _EvaluationPlan:
    if isinstance(eval_data, Mapping):
      for name in eval_data:
        if not isinstance(name, str) or not name or name == "train":
          raise ValueError(
              f"evaluation sources need names other than 'train' and ''; got {name!r}.")
    else:
      eval_data = {} if eval_data is None else {eval_name: eval_data}
    names = list(eval_data) or [""]
    per_source = isinstance(eval_every_steps, Mapping)
    given = dict(eval_every_steps) if per_source else dict.fromkeys(names, eval_every_steps)
    unknown = sorted(set(given) - set(eval_data)) if per_source else []
    if unknown:
      raise ValueError(f"eval_every_steps names {unknown}, which are not evaluation sources "
                       f"({sorted(eval_data)}).")
    every = {}
    for name in names:
      value = given.get(name)
      if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                or value < 0):
        raise ValueError(f"eval_every_steps must be >= 1, or None or 0 for every epoch; got "
                         f"{value!r}{f' for {name!r}' if len(names) > 1 else ''}.")
      every[name] = value or steps_per_epoch
    return cls(dict(eval_data), every, num_steps)

  def next_record(self, step: int) -> int:
    """The first step after `step` that writes a record."""
    return min(min((step // every + 1) * every for every in self.every.values()), self.num_steps)

  def due(self, step: int) -> list[str]:
    """The sources evaluated at `step` (all of them at the last step)."""
    return [name for name, every in self.every.items()
            if name and (step % every == 0 or step == self.num_steps)]


# In a multi-process run, the processes agree on a stop every this many steps (and wherever a call
# of steps ends: an evaluation, epoch end or save), so a signal stops them within that.
AGREE_EVERY = 10


def _record(step: int, steps_per_epoch: int, train_sums: metrics_lib.Metrics, seconds: float,
            state: TrainState, speed: _Speed) -> Record:
  """A record's training part: step, epoch, `train_*` means, speed, MFU and learning rates."""
  train_means = metrics_lib.compute_metrics(train_sums)
  return {"step": step, "epoch": step / steps_per_epoch,
          **{f"train_{k}": v for k, v in train_means.items() if k != "count"},
          "examples_per_second": train_means["count"] / max(seconds, 1e-9),
          **speed.utilisation(step, seconds),
          **{name: float(np.asarray(jax.device_get(rate)).reshape(-1)[0])
             for name, rate in optim.learning_rates(state.opt_state).items()}}


@jax.jit
def _all_finite(params: Any) -> list[jax.Array]:
  return [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(params)]


class _Speed:
  """The model FLOPs utilisation (`jdl.flops`) of each interval between records, from a step's
  FLOPs (XLA's cost analysis, read once); none for the first interval (it compiles), without a
  cost analysis, under pmap (a per-device program) and for runs that log nothing."""

  def __init__(self, runner: parallel.Runner, train_step: Callable[..., Any], state: TrainState,
               engine: resident.ResidentEngine | _HostEngine, enabled: bool) -> None:
    self.flops_per_step: float | None = None
    self.first_step, self.compiled, self.num_devices = int(state.step), False, runner.num_devices
    self.pending = ((train_step, _abstract(state), engine)  # read at the first record
                    if enabled and runner.axis_name is None else None)

  def utilisation(self, step: int, seconds: float) -> dict[str, float]:
    """`{"mfu": ...}` for the steps since the previous call (empty when off)."""
    if self.pending is not None:
      train_step, state, engine = self.pending
      self.pending = None
      try:  # this process's share of the batch: the global step is process_count times it
        self.flops_per_step = jax.process_count() * flops_lib.step_flops(
            train_step, state, engine.batch_spec())
      except Exception:  # pylint: disable=broad-except  # a backend without cost analysis
        self.flops_per_step = None
    steps, self.first_step = step - self.first_step, step
    timed, self.compiled = self.compiled, True
    if not self.flops_per_step or not timed or steps < 1 or seconds <= 0:
      return {}
    return {"mfu": flops_lib.mfu(self.flops_per_step, seconds / steps, self.num_devices)}


def _abstract(tree: Any) -> Any:
  """`jax.ShapeDtypeStruct`s of the arrays of `tree`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _progress_fields(running: Mapping[str, float], seconds: float) -> dict[str, str]:
  fields = {"loss": f"{running['loss']:.4f}"}
  others = [name for name in running if name not in ("loss", "count")
            and not name.endswith(("_max", "_min", "_norm"))]
  if others:  # accuracy, or the task's first other mean (an error, an ELBO term)
    name = "accuracy" if "accuracy" in others else others[0]
    fields["acc" if name == "accuracy" else name] = f"{running[name]:.4f}"
  fields["ex_s"] = f"{running['count'] / max(seconds, 1e-9):,.0f}"
  return fields


def evaluation_state(state: TrainState) -> TrainState:
  """The state to evaluate: `state` itself, or, when its optimizer keeps a moving average of the
  parameters (`optimizer.ema_decay`), `state` with the averaged parameters in their dtypes."""
  ema = optim.ema_parameters(state.opt_state)
  return state if ema is None else state.replace(
      params=jax.tree.map(lambda e, p: e.astype(p.dtype), ema, state.params))


class Preempted(Exception):
  """Training stopped on SIGTERM or SIGINT after saving; the same command again resumes it."""

  def __init__(self, step: int, signal_name: str, directory: str) -> None:
    super().__init__(
        f"stopped by {signal_name} after step {step}; the checkpoint of step {step} is in "
        f"{directory}. Run the same command with the same workdir to resume from it.")
    self.step, self.signal_name, self.directory = step, signal_name, directory


class NonFiniteError(FloatingPointError):
  """The loss or a gradient became NaN or infinite; the message names the step and what."""


class _NonFiniteWatch:
  """Turns the train step's `nonfinite_step` / `nonfinite_what` metrics into a clear error."""

  def __init__(self, state: TrainState, runner: parallel.Runner,
               checkpointer: Checkpointer | None) -> None:
    self.names = transfer.parameter_paths(state.params)  # in `jax.tree.leaves` order
    self.runner, self.checkpointer = runner, checkpointer

  def fetch(self, sums: metrics_lib.Metrics | None, step: int, state: TrainState
            ) -> Mapping[str, Any] | None:
    """`sums` (those up to `step`) on the host, once checked: raises `NonFiniteError` if they
    record a bad step or, from a step without the watch, a non-finite loss."""
    if sums is None:
      return None
    fetched = self.runner.fetch_metrics(sums)
    if "nonfinite_step" not in fetched:  # a step without the watch: the loss sums still tell
      if "loss_sum" in fetched and not np.all(np.isfinite(np.asarray(fetched["loss_sum"]))):
        raise NonFiniteError(
            f"the training loss became NaN or infinite by step {step}; training stopped."
            f"{self._kept()} Build the train step with check_finite=True to name the step "
            "(and with gradient_norms=True the parameter).")
      return fetched
    bad_step = int(fetched["nonfinite_step"])
    if bad_step == metrics_lib.NO_NONFINITE_STEP:
      return fetched
    what = int(fetched["nonfinite_what"])
    culprit = (f"the gradient of parameter {self.names[what - 1]}" if what else "the loss")
    spoilt = ""
    if not what:  # the loss-only watch: say which parameters a bad gradient already reached
      # Checked where the parameters live: a sharded state is never gathered to a host.
      finite = _all_finite(self.runner.fetch_state(state).params)
      broken = [name for name, ok in zip(self.names, finite) if not ok.addressable_data(0)]
      if broken:
        spoilt = (f" Parameters {', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''} are "
                  f"not finite: a gradient of step {bad_step} or before was (gradient_norms=True "
                  "names the first).")
    raise NonFiniteError(
        f"{culprit} became NaN or infinite at step {bad_step}; training stopped.{spoilt}"
        f"{self._kept()} "
        "Try a lower learning rate, gradient clipping (optimizer.clip_norm) or checking the "
        "inputs of that step.")

  def _kept(self) -> str:
    if self.checkpointer is None:
      return ""
    steps = self.checkpointer.steps()
    return (f" The last good checkpoint (step {steps[-1]}) is kept in "
            f"{self.checkpointer.directory}." if steps else " No checkpoint had been saved yet.")


class _StopSignals:
  """Records the first SIGTERM or SIGINT instead of dying, so the loop can save and stop; a
  second SIGINT interrupts at once. Installed (`install`) only in the main thread."""

  def __init__(self, install: bool) -> None:
    self.received: str | None = None
    self.previous: dict[int, Any] = {}
    if install and threading.current_thread() is threading.main_thread():
      for number in (signal.SIGTERM, signal.SIGINT):
        self.previous[number] = signal.signal(number, self._handle)

  def _handle(self, number: int, frame: Any) -> None:
    del frame
    if self.received is not None and number == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signal.Signals(number).name

  def restore(self) -> None:
    for number, handler in self.previous.items():
      signal.signal(number, handler)

  def agree(self, timely: bool, *, due_check: bool) -> tuple[str | None, bool]:
    """`(the signal that stops the run, whether a time-based save is due)`, the same on every
    process (a process that saved or stopped alone would leave the others waiting forever): any
    one's signal stops all, process 0's clock times saves. One all-gather where `due_check`."""
    received = self.received  # one reading: a signal may arrive meanwhile
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


def _make_engine(state: TrainState, train_step, eval_step, train_data, eval_data, *,
                 runner: parallel.Runner, device_resident: bool | None,
                 steps_per_call: int | None) -> resident.ResidentEngine | _HostEngine:
  """The device-resident engine where the data allow it and `device_resident` does not forbid
  it, else the per-step host engine; in-memory splits are checked here, once."""
  num_classes = output_width(state)
  sources = [train_data, *eval_data.values()]
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
    device_resident = possible and sum(
        np.asarray(leaf).nbytes for s in sources for leaf in jax.tree.leaves((s.inputs, s.labels))
    ) <= resident.DEFAULT_RESIDENT_LIMIT_BYTES
  if device_resident:
    def step_in_layout(state: TrainState, batch: Any) -> tuple[TrainState, Any]:
      state, sums = train_step(state, batch)
      return runner.constrain_state(state), sums  # a sharded state keeps its layout in the scan

    return resident.ResidentEngine(
        step_in_layout, eval_step, train_data, eval_data, place=runner.place_replicated,
        constrain=runner.constrain_batch, steps_per_call=steps_per_call,
        eval_state=evaluation_state)
  return _HostEngine(runner, train_step, eval_step, train_data, eval_data, num_classes)


class _HostEngine:
  """`jdl.resident.ResidentEngine`'s interface, one compiled call per host batch; a background
  thread (`jdl.prefetch`) checks and places the next batches while the step runs."""

  def __init__(self, runner, train_step, eval_step, train_data, eval_data, num_classes):
    self.runner, self.eval_data, self.num_classes = runner, eval_data, num_classes
    # In-memory arrays were checked once (`_make_engine`); other sources batch by batch here.
    self.check_each_batch = not isinstance(train_data, data_lib.ArraySource)
    self.train_step, self.eval_step = runner.compile(train_step, eval_step)
    self.batches = prefetch.BatchPrefetcher(train_data, self._prepare, depth=2)
    self.last_batch_spec: Any = None

  def _prepare(self, batch):
    """A batch checked and on the device(s); run by the prefetch thread."""
    if self.last_batch_spec is None:  # once: a batch's shapes, for the FLOPs of a step
      self.last_batch_spec = _abstract(batch)
    if self.check_each_batch:
      data_lib.check_inputs(batch["input"], where="training inputs")
      real = batch.get("mask")
      real_labels = batch["label"] if real is None else jax.tree.map(
          lambda labels: labels[real], batch["label"])
      data_lib.check_labels(real_labels, self.num_classes, where="training labels")
    return self.runner.place_batch(batch)

  def advance(self, state, step, limit):
    del limit  # one step per call
    state, sums = self.train_step(state, self.batches.get(step))
    return state, sums, 1

  def close(self):
    self.batches.close()

  def batch_spec(self):
    return self.last_batch_spec  # set by the first batch prepared, before any record

  def evaluate(self, state, name):
    return evaluation_sums(evaluation_state(state), self.eval_step, self.eval_data[name],
                           runner=self.runner)


def format_record(record: Mapping[str, float]) -> str:
  """One line for a record: `epoch 3.00 step 120 | train loss ... | test loss ... | ex/s`."""
  parts = [f"epoch {record['epoch']:.2f}  step {int(record['step'])}"]
  prefixes = sorted({k.rsplit("_", 1)[0] for k in record if k.endswith("_loss")},
                    key=lambda p: (p != "train", p))
  for prefix in prefixes:
    # The loss first, then the task's other means (accuracy, an ELBO's terms); not the extrema.
    names = [key.removeprefix(f"{prefix}_") for key in record if key.startswith(f"{prefix}_")]
    names = ["loss"] + [name for name in names if name != "loss" and "/" not in name
                        and not name.endswith(("_max", "_min", "_norm"))]
    parts.append(f"{prefix} " + " ".join(f"{name} {record[f'{prefix}_{name}']:.4f}"
                                         for name in names))
  parts.append(f"{record['examples_per_second']:,.0f} ex/s"
               + (f", MFU {100 * record['mfu']:.2g}%" if "mfu" in record else ""))
  return " | ".join(parts)
