"""Hyperparameter sweeps on Optuna: a study over config keys, its trials trained by jdl.

A *space* maps dotted config keys to Optuna distributions (`space_from_json`). A study lives in a
database (default `sqlite:///WORKDIR/study.db`), so a killed sweep resumes where it stopped and
several workers share it. `run_study` trains a trial at a time, each evaluation reported to the
pruner; `study_rows` gives rows for `markdown_table`, `write_results` and the plots. See
docs/sweeps.md.
"""

from __future__ import annotations

import csv
import difflib
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import optuna
import sqlalchemy
from optuna import distributions as dist

from jdl import experiment, loop as loop_lib
from jdl.analysis.plots import format_value, param_keys
from jdl.config import ConfigError, apply_overrides
from jdl.writers import read_jsonl

Space = dict[str, dist.BaseDistribution]
Row = dict[str, Any]
TrainFn = Callable[[ml_collections.ConfigDict, str, Sequence[loop_lib.Hook]],
                   tuple[Any, list[loop_lib.Record]]]

MODES = {"max": "maximize", "min": "minimize"}
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
HEARTBEAT_SECONDS = 60
"""How often a running trial marks itself alive in the study; a trial silent for twice as long
(its worker was killed) is failed and its parameters are tried again, in its own workdir."""


_JSON_DISTRIBUTIONS = ("log_uniform", "uniform", "int", "int_uniform")


def space_from_json(space: Mapping[str, Any]) -> Space:
  """A space parsed from JSON: a list is a categorical choice, `{"log_uniform": [lo, hi]}`,
  `{"uniform": [lo, hi]}` and `{"int": [lo, hi]}` (both ends included; `int_uniform` is read too)
  are Optuna's float, log-float and int distributions. A choice that is not a number, string, bool
  or None (`[128, 64]`) is kept as its override text, `"(128, 64)"`, which Optuna can store."""
  if not isinstance(space, Mapping) or not space:
    raise ValueError("the sweep space must be a non-empty JSON object mapping config keys to "
                     f'choices, e.g. {{"optimizer.learning_rate": [1e-3, 1e-2]}}; got {space!r}.')
  parsed: Space = {}
  for key, value in space.items():
    if not isinstance(key, str) or not key:
      raise ValueError(f"sweep space keys must be dotted config keys (strings); got {key!r}.")
    if isinstance(value, list):
      if not value:
        raise ValueError(f"sweep space key {key!r} has an empty list of choices.")
      parsed[key] = dist.CategoricalDistribution(
          [v if v is None or isinstance(v, (bool, int, float, str)) else override_text(v)
           for v in value])
    elif isinstance(value, Mapping) and len(value) == 1 \
        and next(iter(value)) in _JSON_DISTRIBUTIONS:
      (name, bounds), = value.items()
      parsed[key] = _distribution(key, name, bounds)
    else:
      raise ValueError(
          f"sweep space key {key!r} needs a list of choices or one of "
          f"{[{name: ['low', 'high']} for name in _JSON_DISTRIBUTIONS[:3]]}; got {value!r}.")
  return parsed


def _distribution(key: str, name: str, bounds: Any) -> dist.BaseDistribution:
  numeric = isinstance(bounds, list) and len(bounds) == 2 and all(
      isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in bounds)
  if not numeric:
    raise ValueError(f"sweep space key {key!r}: {name} needs [low, high] as two finite numbers; "
                     f"got {bounds!r}.")
  low, high = bounds
  if name.startswith("int"):
    if not all(isinstance(b, int) for b in bounds) or low > high:
      raise ValueError(f"sweep space key {key!r}: {name} needs integers low <= high; got {bounds}.")
    return dist.IntDistribution(low, high)
  if not low < high or (name == "log_uniform" and low <= 0):
    positive = "0 < " if name == "log_uniform" else ""
    raise ValueError(f"sweep space key {key!r}: {name} needs {positive}low < high; got {bounds}.")
  return dist.FloatDistribution(float(low), float(high), log=name == "log_uniform")


def grid_of(space: Mapping[str, dist.BaseDistribution]) -> dict[str, list[Any]]:
  """The lists of choices of a space made of categorical choices only (for Optuna's GridSampler)."""
  grid = {}
  for key, distribution in space.items():
    if not isinstance(distribution, dist.CategoricalDistribution):
      raise ValueError(f"a grid needs a list of values for {key!r}, but it has {distribution!r}; "
                       "sample distributions with the tpe or random sampler.")
    grid[key] = list(distribution.choices)
  return grid


def grid_size(space: Mapping[str, dist.BaseDistribution]) -> int:
  """How many points the grid of `space` has."""
  return math.prod(len(choices) for choices in grid_of(space).values())


def override_text(value: Any) -> str:
  """The command-line text of a value, as `jdl.config.apply_overrides` parses it."""
  value = _plain(value)
  if isinstance(value, bool):
    return "true" if value else "false"
  if value is None or isinstance(value, (int, float, tuple)):
    return repr(value)
  if isinstance(value, str):
    return value
  raise TypeError(f"cannot write {value!r} (a {type(value).__name__}) as a config override; "
                  "expected a number, string, bool, None or tuple.")


def _plain(value: Any) -> Any:
  """Numpy scalars as Python scalars and lists as tuples, recursively."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def trial_overrides(params: Mapping[str, Any]) -> list[str]:
  """The `KEY=VALUE` overrides that apply a trial's parameters."""
  return [f"{key}={override_text(value)}" for key, value in params.items()]


def check_keys(config: ml_collections.ConfigDict, keys: Sequence[str]) -> None:
  """Raises `ConfigError` for the first key that `config` lacks, naming the closest valid key."""
  valid = list(experiment.flat_config(config))
  for key in keys:
    if key not in valid:
      close = difflib.get_close_matches(key, valid, n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ConfigError(f"the sweep space names the unknown config key {key!r}.{hint}")


def make_sampler(name: str, space: Mapping[str, dist.BaseDistribution], *,
                 seed: int | None = None) -> optuna.samplers.BaseSampler:
  """Optuna's TPE (the default: it models which values did well), random or grid sampler."""
  if name == "tpe":
    return optuna.samplers.TPESampler(seed=seed)
  if name == "random":
    return optuna.samplers.RandomSampler(seed=seed)
  if name == "grid":
    return optuna.samplers.GridSampler(grid_of(space), seed=seed)
  raise ValueError(f"sampler must be one of {SAMPLERS}; got {name!r}.")


def make_pruner(name: str, *, startup_trials: int = 5,
                warmup_steps: int = 0) -> optuna.pruners.BasePruner:
  """Optuna's "median" (stops a trial worse than the median of earlier ones at an evaluation, from
  `startup_trials` finished trials and `warmup_steps` on), "hyperband" or "none" pruner."""
  if name == "median":
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials,
                                       n_warmup_steps=warmup_steps)
  if name == "hyperband":
    return optuna.pruners.HyperbandPruner()
  if name == "none":
    return optuna.pruners.NopPruner()
  raise ValueError(f"pruner must be one of {PRUNERS}; got {name!r}.")


def default_storage(workdir: str) -> str:
  """`sqlite:///WORKDIR/study.db`, the study's database when no URL is given."""
  return "sqlite:///" + os.path.abspath(os.path.join(workdir, "study.db"))


def open_study(
    workdir: str, space: Mapping[str, dist.BaseDistribution], *, storage: str | None = None,
    study_name: str = "sweep", mode: str = "max",
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    heartbeat_seconds: int | None = HEARTBEAT_SECONDS) -> optuna.Study:
  """Creates the study in `storage` (default `default_storage(workdir)`), or loads it (a resumed
  sweep, another worker's); one of another space or direction (`mode`) is refused. Sampler and
  pruner default to "tpe" and "median". `heartbeat_seconds=None` turns the heartbeat off (the
  vmapped sweep asks and tells, which Optuna's heartbeat does not follow)."""
  _check_mode(mode)
  os.makedirs(workdir, exist_ok=True)
  url = storage or default_storage(workdir)
  # Workers share one SQLite file; wait for another's write instead of failing on a lock.
  engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
  for attempt in range(3):
    try:
      with warnings.catch_warnings():
        # Optuna calls the heartbeat and retry callback experimental; jdl's tests fail on that.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3) \
            if heartbeat_seconds else None
        rdb = optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_seconds,
            heartbeat_stale_trial_callback=retry)
      study = optuna.create_study(
          storage=rdb, study_name=study_name, direction=MODES[mode],
          sampler=sampler or make_sampler("tpe", space), pruner=pruner or make_pruner("median"),
          load_if_exists=True)
      break
    except sqlalchemy.exc.SQLAlchemyError:
      # Workers started together race to create the tables; the loser finds them made next time.
      if attempt == 2:
        raise
      time.sleep(1.0)
  written = {key: dist.distribution_to_json(value) for key, value in space.items()}
  previous = study.user_attrs.get("space")
  if previous is None:
    study.set_user_attr("space", written)
  elif previous != written:
    raise ConfigError(f"study {study_name!r} in {url} sweeps another space ({previous}), not "
                      f"{written}; use a new workdir or study name for a different sweep.")
  if study.direction != optuna.study.StudyDirection[MODES[mode].upper()]:
    raise ConfigError(f"study {study_name!r} in {url} was created to "
                      f"{study.direction.name.lower()} its metric, not to {MODES[mode]} it.")
  return study


def finished_trials(study: optuna.Study) -> int:
  """Trials that count against a sweep's budget: complete, pruned, or failed in training (a trial
  interrupted or killed is run again, so it does not count)."""
  states = optuna.trial.TrialState
  return sum(1 for trial in study.get_trials(deepcopy=False)
             if trial.state in (states.COMPLETE, states.PRUNED)
             or (trial.state == states.FAIL and "error" in trial.user_attrs))


def suggest(trial: optuna.Trial, space: Mapping[str, dist.BaseDistribution]) -> dict[str, Any]:
  """The trial's value of every key of `space`, sampled (or fixed, for a queued trial)."""
  params = {}
  for key, distribution in space.items():
    if isinstance(distribution, dist.CategoricalDistribution):
      params[key] = trial.suggest_categorical(key, distribution.choices)
    else:
      suggest_number = (trial.suggest_int if isinstance(distribution, dist.IntDistribution)
                        else trial.suggest_float)
      params[key] = suggest_number(key, distribution.low, distribution.high, log=distribution.log)
  return params


class TrialFailed(Exception):
  """Training a trial raised; the trial is failed and the sweep goes on."""


def run_study(
    study: optuna.Study, base_config: ml_collections.ConfigDict,
    space: Mapping[str, dist.BaseDistribution], workdir: str, num_trials: int, *,
    train: TrainFn | None = None, metric: str = "test_accuracy",
    log: Callable[[str], None] | None = print) -> None:
  """Trains trials of `study` one after another until it has `num_trials` finished ones (counted
  over every process running this on the study), a line each to `log`.

  Each trial is `base_config` with the sampled values as overrides, trained by `train` (default
  `jdl.train_and_evaluate`) in `workdir/trial_<number>`. Every evaluation's `metric` is reported
  to the pruner, which may stop the trial there. A trial whose config is rejected or whose
  training raises is failed and the sweep goes on. On `jdl.Preempted` the trial is queued again
  with its workdir, to resume from its checkpoint, and the exception is raised. Raises
  ConfigError, before anything trains, if the space names a key `base_config` lacks."""
  check_keys(base_config, list(space))
  train = train or experiment.train_and_evaluate

  def objective(trial: optuna.Trial) -> float:
    # A rerun trial (queued again after a preemption) resumes in the folder of the first attempt.
    trial_dir = trial.user_attrs.get("workdir") or os.path.join(workdir, f"trial_{trial.number}")
    trial.set_user_attr("workdir", trial_dir)
    params = suggest(trial, space)

    def report(step: int, state: Any, record: Mapping[str, Any]) -> None:
      del state
      if metric not in record:
        raise ValueError(f"metric {metric!r} is not in the evaluation record; it has "
                         f"{sorted(record)}. Pass one of those as metric.")
      trial.report(float(record[metric]), step)
      trial.set_user_attr("record", record_json(record))
      if trial.should_prune():
        raise optuna.TrialPruned(f"{metric} {float(record[metric]):.4g} at step {step}")

    try:
      config = apply_overrides(base_config, trial_overrides(params))
      os.makedirs(trial_dir, exist_ok=True)
      _, history = train(config, trial_dir, [report])
      record = _final_record(history, trial_dir)
      trial.set_user_attr("record", record_json(record))
      return float(record[metric])
    except loop_lib.Preempted:
      study.enqueue_trial(params, user_attrs={"workdir": trial_dir})
      raise
    except optuna.TrialPruned:
      raise
    except Exception as error:  # pylint: disable=broad-exception-caught
      trial.set_user_attr("error", f"{type(error).__name__}: {error}")
      raise TrialFailed(trial.user_attrs["error"]) from error

  def announce(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    del study
    if trial.state == optuna.trial.TrialState.COMPLETE:
      outcome = f"{metric} {trial.value:.4f}"
    elif trial.state == optuna.trial.TrialState.PRUNED:
      outcome = f"pruned at step {trial.last_step}"
    else:
      outcome = f"failed: {trial.user_attrs.get('error', 'interrupted')}"
    params = " ".join(f"{key}={format_value(value)}" for key, value in trial.params.items())
    log(f"trial {trial.number} {params}: {outcome}")

  # Optuna's grid sampler repeats points once it has tried them all.
  grid = isinstance(study.sampler, optuna.samplers.GridSampler)
  while finished_trials(study) < num_trials and not (grid and study.sampler.is_exhausted(study)):
    # One trial per call, so the budget counts the trials other workers finished meanwhile.
    study.optimize(objective, n_trials=1, catch=(TrialFailed,),
                   callbacks=[announce] if log is not None else [])


def record_json(record: Mapping[str, Any]) -> dict[str, Any]:
  """A record with plain Python values (Optuna stores user attributes as JSON)."""
  return {key: _plain(value) for key, value in record.items()}


def _final_record(history: Sequence[Mapping[str, Any]], trial_dir: str) -> dict[str, Any]:
  """The last evaluation record: from `history`, else (a trial that finished earlier) the file's."""
  if history:
    return record_json(history[-1])
  if os.path.isfile(os.path.join(trial_dir, "metrics.jsonl")) and (rows := read_jsonl(trial_dir)):
    return dict(rows[-1])
  raise ValueError(f"training returned no evaluation record and {trial_dir} holds none.")


_STATUS = {"COMPLETE": "ok", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
           "WAITING": "waiting"}
_BOOKKEEPING = ("trial", "params", "curve", "status", "error", "seconds", "workdir")


def study_rows(study: optuna.Study, metric: str = "test_accuracy") -> list[Row]:
  """One row per trial of the study, in trial order: `{"trial", "params", "curve" ({step: the
  metric reported there}), "status" ("ok", "pruned", "failed", "interrupted", "running",
  "waiting"), "error", "seconds", "workdir", **the last evaluation record}`; `metric` is the
  trial's value where it has one."""
  rows = []
  for trial in study.get_trials(deepcopy=False):
    status = _STATUS[trial.state.name]
    if status == "failed" and "error" not in trial.user_attrs:
      status = "interrupted"  # preempted or killed: its parameters were queued again
    row: Row = {k: v for k, v in trial.user_attrs.get("record", {}).items()
                if k not in _BOOKKEEPING}
    row.update(trial=trial.number, params=dict(trial.params),
               curve=dict(sorted(trial.intermediate_values.items())), status=status,
               error=trial.user_attrs.get("error", ""), workdir=trial.user_attrs.get("workdir", ""),
               seconds=trial.duration.total_seconds() if trial.duration else None)
    if trial.value is not None:
      row[metric] = trial.value
    rows.append(row)
  return rows


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"mode must be one of {tuple(MODES)} (is a larger metric better?); got "
                     f"{mode!r}.")


def sort_rows(rows: Sequence[Row], metric: str = "test_accuracy", mode: str = "max") -> list[Row]:
  """The rows best first: finished by `metric`, pruned by their last value, then the rest."""
  _check_mode(mode)

  def key(row: Row) -> tuple[int, float]:
    value = row.get(metric)
    if row["status"] not in ("ok", "pruned") or not isinstance(value, (int, float)) \
        or not math.isfinite(value):
      return (2, 0.0)
    return (0 if row["status"] == "ok" else 1, -value if mode == "max" else value)

  return sorted(rows, key=key)  # stable: ties and the rest keep trial order


def best_row(rows: Sequence[Row], metric: str = "test_accuracy", mode: str = "max") -> Row | None:
  """The best finished row by `metric`, or None when no trial finished."""
  ranked = sort_rows(rows, metric, mode)
  return ranked[0] if ranked and ranked[0]["status"] == "ok" and metric in ranked[0] else None


def markdown_table(rows: Sequence[Row], metric: str = "test_accuracy", mode: str = "max") -> str:
  """A Markdown table of the rows, best first; the best row's status says `best`."""
  best, params = best_row(rows, metric, mode), param_keys(rows)
  header = ["rank", "trial", *params, metric, "step", "seconds", "status"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for rank, row in enumerate(sort_rows(rows, metric, mode), start=1):
    status = "best" if row is best else row["status"]
    value, seconds = row.get(metric), row.get("seconds")
    cells = [str(rank), str(row["trial"]),
             *[format_value(row["params"][k]) if k in row["params"] else "" for k in params],
             f"{value:.4f}" if isinstance(value, (int, float)) else "", str(row.get("step", "")),
             f"{seconds:.1f}" if seconds is not None else "",
             f"{status}: {row['error']}" if row["error"] else status]
    # Long error messages are cut here; the CSV keeps them whole.
    lines.append("| " + " | ".join(" ".join(c.split())[:120].replace("|", "\\|") for c in cells)
                 + " |")
  return "\n".join(lines)


def write_results(rows: Sequence[Row], workdir: str, *, metric: str = "test_accuracy",
                  mode: str = "max") -> tuple[str, str]:
  """Writes the rows, best first, to `workdir/results.csv` (every record key; swept values as
  `--config.KEY=VALUE` text) and `workdir/results.md`; returns `(csv_path, markdown_path)`."""
  os.makedirs(workdir, exist_ok=True)
  best, params = best_row(rows, metric, mode), param_keys(rows)
  results = list(dict.fromkeys([metric, *(k for row in rows for k in row
                                          if k not in _BOOKKEEPING and k not in params)]))
  csv_path = os.path.join(workdir, "results.csv")
  with open(csv_path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=["rank", "best", "trial", *params, *results,
                                           *_BOOKKEEPING[3:]], extrasaction="ignore")
    writer.writeheader()
    for rank, row in enumerate(sort_rows(rows, metric, mode), start=1):
      writer.writerow({**row, **{k: override_text(v) for k, v in row["params"].items()},
                       "rank": rank, "best": row is best})
  markdown_path = os.path.join(workdir, "results.md")
  with open(markdown_path, "w", encoding="utf-8") as f:
    f.write(markdown_table(rows, metric, mode) + "\n")
  return csv_path, markdown_path
