"""All at once: N small models, differing in seed and learning rate, trained together on one
device with `jax.vmap` over a stacked `TrainState`, every member fed the same batches.

optax recomputes an injected learning rate from the schedule at every update, so the members'
optimizer (`make_member_optimizer`) scales a learning-rate-1 chain by a rate held in its state.
`run_vmapped_study` trains an Optuna study's trials a batch at a time. See docs/sweeps.md.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import optuna

from jdl import data as data_lib, loop as loop_lib, metrics as metrics_lib, sweep as sweep_lib
from jdl import experiment, models, optim, resident, runs, step as step_lib, tasks
from jdl.config import ConfigError
from jdl.state import TrainState, create_train_state


class MemberLearningRateState(NamedTuple):
  """State of `scale_by_member_learning_rate`: the member's learning rate (float32 scalar)."""

  learning_rate: jax.Array


def scale_by_member_learning_rate(learning_rate: float) -> optax.GradientTransformation:
  """Multiplies updates by a learning rate kept in the optimizer state (`set_member_learning_rate`),
  so members sharing one static optimizer each have their own."""

  def init(params: Any) -> MemberLearningRateState:
    del params
    return MemberLearningRateState(jnp.asarray(learning_rate, jnp.float32))

  def update(updates: Any, state: MemberLearningRateState,
             params: Any = None) -> tuple[Any, MemberLearningRateState]:
    del params
    return jax.tree.map(lambda u: u * state.learning_rate.astype(u.dtype), updates), state

  return optax.GradientTransformation(init, update)


def make_member_optimizer(optimizer_config: Mapping[str, Any], *,
                          total_steps: int | None = None) -> optax.GradientTransformation:
  """`jdl.optim.make_optimizer(optimizer_config)` with its peak learning rate in its state: its
  chain at learning rate 1, then `scale_by_member_learning_rate`, inside the same parameter EMA and
  gradient accumulation. Updates are proportional to the learning rate, so equal up to rounding."""
  config = {**optim.OPTIMIZER_DEFAULTS, **dict(optimizer_config)}
  optim.make_optimizer(config, total_steps=total_steps)  # the same checks and error messages
  accumulate, ema_decay = int(config["accumulate_steps"]), float(config["ema_decay"])
  unit = {**config, "learning_rate": 1.0, "accumulate_steps": 1, "ema_decay": 0.0}
  unit_steps = None if total_steps is None else int(total_steps) // accumulate
  tx: optax.GradientTransformation = optax.chain(
      optim.make_optimizer(unit, total_steps=unit_steps),
      scale_by_member_learning_rate(float(config["learning_rate"])))
  if ema_decay:
    tx = optim.with_parameter_ema(tx, ema_decay)
  if accumulate > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accumulate).gradient_transformation()
  return tx


def set_member_learning_rate(opt_state: optax.OptState, learning_rate: Any) -> optax.OptState:
  """`opt_state` (of a `make_member_optimizer`) with its member learning rate replaced."""
  def is_member(node: Any) -> bool:
    return isinstance(node, MemberLearningRateState)

  found = sum(map(is_member, jax.tree.leaves(opt_state, is_leaf=is_member)))
  if found != 1:
    raise ValueError(f"set_member_learning_rate needs an optimizer state with one member learning "
                     f"rate (from jdl.vmap_sweep.make_member_optimizer); found {found}.")
  new = MemberLearningRateState(jnp.asarray(learning_rate, jnp.float32))
  return jax.tree.map(lambda node: new if is_member(node) else node, opt_state, is_leaf=is_member)


def stack_states(states: Sequence[TrainState]) -> TrainState:
  """One `TrainState` with a leading member axis on every leaf, from states of one structure."""
  if not states:
    raise ValueError("stack_states needs at least one state.")
  if len({jax.tree.structure(s) for s in states}) != 1:
    raise ValueError("stack_states needs states of one structure: the same model, optimizer and "
                     "input shape (build them with the same objects).")
  # Stacked on the host and copied over once: jnp.stack would compile one program per leaf shape.
  return jax.device_put(jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]),
                                    *states))


@dataclasses.dataclass
class VmappedRun:
  """The outcome of `train_vmapped`: N members trained together. `history` holds one record per
  evaluation, like `jdl.fit`'s, with `[N]` arrays per metric and scalars `step`, `epoch`."""

  learning_rates: np.ndarray  # [N] each member's peak learning rate
  seeds: np.ndarray  # [N] each member's seed (initialisation and dropout keys)
  state: TrainState  # the final states, stacked: a leading axis of N on every leaf
  history: list[dict[str, Any]]
  nonfinite_step: np.ndarray  # [N] the first step (1-based) with a non-finite loss or gradient; 0
  compile_seconds: float  # compiling the vmapped train and eval calls
  train_seconds: float  # training and evaluating, compilation excluded
  eval_name: str = "test"  # prefix of the eval metrics

  @property
  def num_members(self) -> int:
    return int(self.learning_rates.shape[0])

  @property
  def params(self) -> Any:
    """The final parameters, stacked (leading axis N)."""
    return self.state.params

  def member_state(self, index: int) -> TrainState:
    """Member `index` as an ordinary `TrainState` (sliced on the host)."""
    return jax.device_put(jax.tree.map(lambda leaf: np.asarray(leaf)[index], self.state))


def train_vmapped(
    model: Any, optimizer_config: Mapping[str, Any], train_data: data_lib.ArraySource,
    eval_data: data_lib.ArraySource | None = None, *, num_steps: int,
    learning_rates: Sequence[float] | None = None, seeds: Sequence[int] | None = None,
    train_step: step_lib.TrainStepFn | None = None, eval_step: step_lib.EvalStepFn | None = None,
    eval_every_steps: int | None = None, eval_name: str = "test",
    log: Callable[[str], None] | None = None, sample_input: Any = None) -> VmappedRun:
  """Trains N copies of `model` at once on one device: `jax.vmap` over a stacked `TrainState`.

  Every member sees the same batches, in `train_data`'s order, on the device-resident engine
  `jdl.fit` uses; member i ends where `jdl.fit` with peak learning rate `learning_rates[i]` (> 0;
  None: the config's) and `PRNGKey(seeds[i])` (initialisation and dropout; None: 0) ends, up to
  float rounding. A single rate or seed applies to every member. The steps default to
  `jdl.make_train_step(check_finite=True)` and `make_eval_step()`. Evaluations come every
  `eval_every_steps` (None: every epoch) and at the last step, with a line each to `log`.
  `sample_input` initialises the model (None: the first training example); give what the model
  takes where the steps' task prepares the inputs (float32 for uint8 pixels)."""
  for name, source in (("train_data", train_data), ("eval_data", eval_data)):
    if source is not None and not isinstance(source, data_lib.ArraySource):
      raise ValueError(f"train_vmapped keeps the data on the device, so {name} must be an "
                       f"in-memory jdl.data.ArraySource; got {type(source).__name__}.")
    if source is not None and source.process_count != 1:
      raise ValueError(f"train_vmapped runs in one process; {name} is split over "
                       f"{source.process_count} processes.")
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps must be an integer >= 1; got {num_steps!r}.")
  config = {**optim.OPTIMIZER_DEFAULTS, **dict(optimizer_config)}
  rates = [float(r) for r in ([config["learning_rate"]] if learning_rates is None
                               else learning_rates)]
  member_seeds = [int(seed) for seed in ([0] if seeds is None else seeds)]
  num_members = max(len(rates), len(member_seeds))
  for name, values in (("learning_rates", rates), ("seeds", member_seeds)):
    if not values:
      raise ValueError(f"{name} is empty; give at least one value.")
    if len(values) not in (1, num_members):
      raise ValueError(f"{name} has {len(values)} values but the sweep has {num_members} "
                       "members; give one value per member, or a single value for all.")
  rates *= num_members // len(rates)  # a single value: every member's
  member_seeds *= num_members // len(member_seeds)
  for rate in rates:
    if not (math.isfinite(rate) and rate > 0):
      raise ValueError(f"learning rates must be finite and > 0; got {rate!r} in {rates}.")

  tx = make_member_optimizer(config, total_steps=num_steps)
  sample = (jax.tree.map(lambda x: np.asarray(x[:1]), train_data.inputs) if sample_input is None
            else sample_input)
  states = []
  for rate, seed in zip(rates, member_seeds):
    state = create_train_state(model, tx, sample, jax.random.PRNGKey(seed))
    states.append(state.replace(opt_state=set_member_learning_rate(state.opt_state, rate)))
  num_classes = loop_lib.output_width(states[0])
  state = stack_states(states)
  for name, source in (("training", train_data), ("eval", eval_data)):
    if source is not None:
      data_lib.check_inputs(source.inputs, where=f"{name} inputs")
      data_lib.check_labels(source.labels, num_classes, where=f"{name} labels")
  # The resident engine over vmapped steps, compiled ahead so compilation is timed apart.
  engine = resident.ResidentEngine(
      jax.vmap(train_step or step_lib.make_train_step(check_finite=True), in_axes=(0, None)),
      jax.vmap(eval_step or step_lib.make_eval_step(), in_axes=(0, None)),
      train_data, eval_data, eval_state=loop_lib.evaluation_state)
  start = time.perf_counter()
  engine.compile(state)
  merge = jax.jit(metrics_lib.merge_metrics)  # sums stay on the device between evaluations
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  eval_every = eval_every_steps or train_data.steps_per_epoch
  history, nonfinite_step = [], np.zeros(len(rates), np.int64)
  step, sums = 0, None
  while step < num_steps:
    next_eval = min((step // eval_every + 1) * eval_every, int(num_steps))
    state, chunk_sums, advanced = engine.advance(state, step, next_eval)
    sums = chunk_sums if sums is None else merge(sums, chunk_sums)
    step += advanced
    if step == next_eval:
      fetched = jax.device_get(sums)
      record: dict[str, Any] = {"step": step, "epoch": step / train_data.steps_per_epoch}
      record.update({f"train_{k}": v for k, v in _member_means(fetched).items()})
      bad = fetched.get("nonfinite_step")
      if bad is not None:
        newly = (nonfinite_step == 0) & (bad != metrics_lib.NO_NONFINITE_STEP)
        nonfinite_step = np.where(newly, bad, nonfinite_step)
      if eval_data is not None:
        eval_sums = jax.device_get(engine.evaluate(state))
        record.update({f"{eval_name}_{k}": v for k, v in _member_means(eval_sums).items()})
      history.append(record)
      if log is not None:
        log(_format_member_record(record, eval_name))
      sums = None
  jax.block_until_ready(state)
  return VmappedRun(np.asarray(rates, np.float64), np.asarray(member_seeds, np.int64), state,
                    history, nonfinite_step, compile_seconds, time.perf_counter() - start,
                    eval_name)


def _member_means(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Per-member values from per-member metric states (`jdl.metrics.metric_values`)."""
  return {key: value for key, value in metrics_lib.metric_values(sums).items()
          if key != "count" and np.ndim(value) == 1}


def _format_member_record(record: Mapping[str, Any], eval_name: str) -> str:
  parts = [f"step {record['step']}"]
  for key in ("train_loss", f"{eval_name}_accuracy"):
    if (values := record.get(key)) is not None:
      parts.append(f"{key} min {np.nanmin(values):.4f} median {np.nanmedian(values):.4f} "
                   f"max {np.nanmax(values):.4f}")
  return " | ".join(parts)


VMAP_KEYS = ("optimizer.learning_rate", "seed")  # the keys a vmapped sweep can vary


def vmap_sweep(config: ml_collections.ConfigDict, trials: Sequence[Mapping[str, Any]], *,
               log: Callable[[str], None] | None = None) -> VmappedRun:
  """Trains all `trials` of an experiment config at once (`train_vmapped`), one member each.
  Trials may set only `VMAP_KEYS` (else ConfigError); everything else, the data order included,
  comes from `config`, which must be an in-memory classification config (else ValueError)."""
  trials = [dict(t) for t in trials]
  if not trials:
    raise ValueError("vmap_sweep needs at least one trial.")
  if others := sorted({k for t in trials for k in t} - set(VMAP_KEYS)):
    raise ConfigError(f"a vmapped sweep varies only {list(VMAP_KEYS)} (one model and optimizer "
                      f"for every member); the trials also set {others}. Sweep them with "
                      "jdl.sweep.run_study.")
  if config.task != "classification" or not config.in_memory:
    raise ValueError(f"vmap_sweep needs an in-memory classification config; got task "
                     f"{config.task!r} with in_memory={config.in_memory}.")
  device_augment, _ = experiment.make_augmentations(config.augment, in_memory=True)
  train_data, eval_data, meta, _ = runs.load_task_data(config)
  model = models.build_model(config.model, num_classes=meta.num_classes)
  task = tasks.classification(config.loss, label_smoothing=config.label_smoothing,
                              top_k=tuple(config.top_k), pixels=meta.pixels)
  train_step, eval_step = step_lib.make_steps(
      task, l1=config.l1, l2=config.l2, augment=device_augment,
      compute_dtype=config.compute_dtype, check_finite=True)
  num_steps = config.num_steps or config.num_epochs * train_data.steps_per_epoch
  return train_vmapped(
      model, config.optimizer, train_data, eval_data, num_steps=num_steps,
      learning_rates=[float(t.get("optimizer.learning_rate", config.optimizer.learning_rate))
                      for t in trials],
      seeds=[int(t.get("seed", config.seed)) for t in trials],
      train_step=train_step, eval_step=eval_step, eval_every_steps=config.eval_every_steps or None,
      eval_name=runs.eval_name(config), log=log,
      sample_input=np.zeros((1, *meta.input_shape), meta.input_dtype))


def run_vmapped_study(
    study: optuna.Study, config: ml_collections.ConfigDict,
    space: Mapping[str, optuna.distributions.BaseDistribution], num_trials: int, *, members: int,
    metric: str = "test_accuracy", log: Callable[[str], None] | None = print) -> list[VmappedRun]:
  """Asks `study` for `members` trials at a time, trains each batch at once (`vmap_sweep`) and
  tells the study every member's evaluation records, until it has `num_trials` finished trials.

  A batch runs in one program to the end, so the pruner stops none of its members (their values
  still inform later batches' samplers); one whose loss or gradient became NaN or infinite is
  failed. If training a batch raises, its trials are failed and the exception raised. Returns one
  `VmappedRun` per batch; a space that varies a key outside `VMAP_KEYS` is a ConfigError."""
  if others := sorted(set(space) - set(VMAP_KEYS)):
    raise ConfigError(f"a vmapped sweep varies only {list(VMAP_KEYS)} (one model and optimizer "
                      f"for every member); the space also sets {others}. Sweep it without --vmap.")
  if isinstance(members, bool) or not isinstance(members, int) or members < 1:
    raise ValueError(f"members must be an integer >= 1; got {members!r}.")
  sweep_lib.check_keys(config, list(space))
  batches = []
  while (remaining := num_trials - sweep_lib.finished_trials(study)) > 0:
    trials = [study.ask() for _ in range(min(members, remaining))]
    params = [sweep_lib.suggest(trial, space) for trial in trials]
    try:
      run = vmap_sweep(config, params)
      if not run.history or metric not in run.history[-1]:
        raise ValueError(f"metric {metric!r} is not in the vmapped run's records; they have "
                         f"{sorted(run.history[-1]) if run.history else []}.")
    except BaseException:
      for trial in trials:
        trial.set_user_attr("error", "the vmapped batch raised")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
      raise
    batches.append(run)
    for index, trial in enumerate(trials):
      record = {key: (float(np.asarray(value)[index]) if np.ndim(value) else value)
                for key, value in run.history[-1].items()}
      for step_record in run.history:
        trial.report(float(np.asarray(step_record[metric])[index]), int(step_record["step"]))
      trial.set_user_attr("record", sweep_lib.record_json(record))
      if run.nonfinite_step[index]:
        trial.set_user_attr("error", f"the loss or a gradient became NaN or infinite at step "
                                     f"{int(run.nonfinite_step[index])}")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
      else:
        study.tell(trial, record[metric])
    if log is not None:
      log(f"{len(trials)} trials in one program: {run.train_seconds:.1f}s "
          f"(+{run.compile_seconds:.1f}s compiling); {metric} "
          + ", ".join(f"{value:.4f}" for value in np.asarray(run.history[-1][metric], float)))
  return batches
