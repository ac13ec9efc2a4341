"""Hyperparameter sweeps on Optuna: a study over config keys, its trials trained by jdl.

A *space* maps dotted config keys to Optuna distributions (`space_from_json` reads them from
JSON). A study is kept in a database, by default `sqlite:///WORKDIR/study.db`, so a killed sweep
resumes where it stopped and several worker processes (on one machine or, with a database URL,
many) share one study. `run_study` trains one trial at a time with `jdl.train_and_evaluate`,
reporting every evaluation record to Optuna so its pruner can stop a bad trial early; the vmapped
sweep (`jdl.vmap_sweep.run_vmapped_study`) trains a batch of asked trials as one program.
`study_rows` turns the study into rows for `markdown_table`, `write_results` and `plot_sweep`.
See docs/sweeps.md.
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
from jdl.config import ConfigError, apply_overrides

Space = dict[str, dist.BaseDistribution]
Row = dict[str, Any]
Hook = Callable[[int, Any, Mapping[str, Any]], None]
TrainFn = Callable[[ml_collections.ConfigDict, str, Sequence[Hook]],
                   tuple[Any, list[dict[str, float]]]]

MODES = {"max": "maximize", "min": "minimize"}
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
STUDY_FILE = "study.db"
HEARTBEAT_SECONDS = 60
"""How often a running trial marks itself alive in the study; a trial silent for twice as long
(its worker was killed) is failed and its parameters are tried again, in its own workdir."""


# ---------------------------------------------------------------------------------------------
# Spaces.


_JSON_DISTRIBUTIONS = ("log_uniform", "uniform", "int", "int_uniform")


def space_from_json(space: Mapping[str, Any]) -> Space:
  """A space parsed from JSON: a list is a categorical choice, `{"log_uniform": [lo, hi]}`,
  `{"uniform": [lo, hi]}` and `{"int": [lo, hi]}` (both ends included) are Optuna's float, log-float
  and int distributions.

  Lists inside a choice become tuples; a choice that is not a number, string, bool or None (a
  tuple such as `[128, 64]`) is kept as its override text, `"(128, 64)"`, which Optuna can store
  and `apply_overrides` reads back.
  """
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
      parsed[key] = dist.CategoricalDistribution([_choice(_tuples(v)) for v in value])
    elif isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in _JSON_DISTRIBUTIONS:
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
    raise ValueError(f"sweep space key {key!r}: {name} needs {'0 < ' if name == 'log_uniform' else ''}"
                     f"low < high; got {bounds}.")
  return dist.FloatDistribution(float(low), float(high), log=name == "log_uniform")


def _tuples(value: Any) -> Any:
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _choice(value: Any) -> Any:
  """A categorical choice Optuna can store: None, bool, int, float or str (else override text)."""
  return value if value is None or isinstance(value, (bool, int, float, str)) else override_text(value)


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
  valid = _leaf_keys(config)
  for key in keys:
    if key not in valid:
      close = difflib.get_close_matches(key, valid, n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ConfigError(f"the sweep space names the unknown config key {key!r}.{hint}")


def _leaf_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(_leaf_keys(value, f"{prefix}{key}."))
    else:
      keys.append(f"{prefix}{key}")
  return keys


# ---------------------------------------------------------------------------------------------
# Studies.


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
  """Optuna's median pruner (stop a trial whose metric at an evaluation is worse than the median
  of earlier trials' at the same step), Hyperband, or none.

  Args:
    name: "median", "hyperband" or "none".
    startup_trials: the median pruner prunes nothing until this many trials have finished.
    warmup_steps: nor before a trial reaches this step.
  """
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
  return "sqlite:///" + os.path.abspath(os.path.join(workdir, STUDY_FILE))


def open_study(
    workdir: str,
    space: Mapping[str, dist.BaseDistribution],
    *,
    storage: str | None = None,
    study_name: str = "sweep",
    mode: str = "max",
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    heartbeat_seconds: int | None = HEARTBEAT_SECONDS,
) -> optuna.Study:
  """Creates the study, or loads it when the database already holds it (a resumed sweep, or
  another worker's).

  The space is written into the study, and a study of another space or direction is refused:
  its trials would not be comparable. A trial whose worker stopped sending heartbeats for
  `2 * heartbeat_seconds` is failed and its parameters are queued again.

  Args:
    workdir: the sweep's folder (trial folders, results, the default SQLite file).
    space: dotted config keys -> Optuna distributions.
    storage: a database URL (`postgresql://...`, `mysql://...`, `sqlite:///...`); None:
      `default_storage(workdir)`.
    study_name: the study's name in the database.
    mode: "max" or "min": whether a larger or smaller metric is better.
    sampler: default `make_sampler("tpe", space)`.
    pruner: default `make_pruner("median")`.
    heartbeat_seconds: how often a running trial records that it is alive; None: no heartbeat
      (the vmapped sweep asks and tells, which Optuna's heartbeat does not follow).
  """
  _check_mode(mode)
  os.makedirs(workdir, exist_ok=True)
  url = storage or default_storage(workdir)
  for attempt in range(3):
    try:
      study = _create_study(url, study_name, mode, heartbeat_seconds,
                            sampler or make_sampler("tpe", space), pruner or make_pruner("median"))
      break
    except sqlalchemy.exc.SQLAlchemyError:
      # Workers started together race to create the database's tables and version row ("table
      # ... already exists", a unique constraint); the loser finds them made when it tries again.
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
    raise ConfigError(f"study {study_name!r} in {url} was created to {study.direction.name.lower()} "
                      f"its metric, not to {MODES[mode]} it.")
  return study


def _create_study(url: str, study_name: str, mode: str, heartbeat_seconds: int | None,
                  sampler: optuna.samplers.BaseSampler,
                  pruner: optuna.pruners.BasePruner) -> optuna.Study:
  # Workers share one SQLite file; wait for another's write instead of failing on a lock.
  engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
  with warnings.catch_warnings():
    # Optuna marks its heartbeat and retry callback experimental; they are what resumes a trial
    # whose worker was killed, and the warning would be an error in jdl's tests.
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3) \
        if heartbeat_seconds else None
    storage = optuna.storages.RDBStorage(
        url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_seconds,
        heartbeat_stale_trial_callback=retry)
  return optuna.create_study(storage=storage, study_name=study_name, direction=MODES[mode],
                             sampler=sampler, pruner=pruner, load_if_exists=True)


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
    if isinstance(distribution, dist.FloatDistribution):
      params[key] = trial.suggest_float(key, distribution.low, distribution.high,
                                        log=distribution.log)
    elif isinstance(distribution, dist.IntDistribution):
      params[key] = trial.suggest_int(key, distribution.low, distribution.high,
                                      log=distribution.log)
    else:
      params[key] = trial.suggest_categorical(key, distribution.choices)
  return params


class TrialFailed(Exception):
  """Training a trial raised; the trial is failed and the sweep goes on."""


def trial_workdir(trial: optuna.trial.BaseTrial, workdir: str) -> str:
  """The folder of a trial: `workdir/trial_<number>`, or the folder of the trial it reruns (its
  checkpoints resume)."""
  return trial.user_attrs.get("workdir") or os.path.join(workdir, f"trial_{trial.number}")


def run_study(
    study: optuna.Study,
    base_config: ml_collections.ConfigDict,
    space: Mapping[str, dist.BaseDistribution],
    workdir: str,
    num_trials: int,
    *,
    train: TrainFn | None = None,
    metric: str = "test_accuracy",
    log: Callable[[str], None] | None = print,
) -> None:
  """Trains trials of `study` one after another until it has `num_trials` finished ones.

  Each trial is `base_config` with the sampled values applied as overrides, trained in its
  workdir (`trial_workdir`). Every evaluation record's `metric` is reported to the study, whose
  pruner may stop the trial there. A trial whose config is rejected or whose training raises is
  failed and the sweep goes on. On `jdl.Preempted` the trial is queued again with its workdir, so
  the next run of the sweep resumes it from its checkpoint, and the exception is raised. Several
  processes may run this on one study: each counts the finished trials of all.

  Args:
    study: from `open_study`.
    base_config: the experiment's config (e.g. `experiments.mnist1d.get_config()`).
    space: the study's space.
    workdir: the sweep's folder.
    num_trials: the sweep's budget of finished trials (`finished_trials`).
    train: `(config, workdir, hooks) -> (state, history)`; default `jdl.train_and_evaluate`.
    metric: the record key the study optimises, e.g. "test_accuracy" or "test_loss".
    log: where a line per trial goes (None: nowhere).

  Raises:
    ConfigError: the space names a config key that `base_config` lacks (before anything trains).
  """
  check_keys(base_config, list(space))
  train = train or experiment.train_and_evaluate

  def objective(trial: optuna.Trial) -> float:
    trial_dir = trial_workdir(trial, workdir)
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
    except loop_lib.Preempted:
      trial.set_user_attr("interrupted", True)
      study.enqueue_trial(params, user_attrs={"workdir": trial_dir})
      raise
    except optuna.TrialPruned:
      raise
    except Exception as error:  # pylint: disable=broad-exception-caught
      trial.set_user_attr("error", f"{type(error).__name__}: {error}")
      raise TrialFailed(trial.user_attrs["error"]) from error
    if metric not in record:
      trial.set_user_attr("error", f"metric {metric!r} is not in the final record; it has "
                                   f"{sorted(record)}")
      raise TrialFailed(trial.user_attrs["error"])
    trial.set_user_attr("record", record_json(record))
    return float(record[metric])

  def announce(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    del study
    if log is None:
      return
    outcome = {"COMPLETE": f"{metric} {trial.value:.4f}",
               "PRUNED": f"pruned at step {trial.last_step}",
               "FAIL": f"failed: {trial.user_attrs.get('error', 'interrupted')}"}.get(
                   trial.state.name, trial.state.name.lower())
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    log(f"trial {trial.number} {_describe(trial.params)}: {outcome} ({seconds:.1f}s)")

  while finished_trials(study) < num_trials and not _grid_done(study):
    # One trial per call, so the budget counts the trials other workers finished meanwhile.
    study.optimize(objective, n_trials=1, catch=(TrialFailed,), callbacks=[announce])


def _grid_done(study: optuna.Study) -> bool:
  """Whether a grid study has tried every point (Optuna's grid sampler then repeats points)."""
  sampler = study.sampler
  return isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study)


def record_json(record: Mapping[str, Any]) -> dict[str, Any]:
  """A record with plain Python values (Optuna stores user attributes as JSON)."""
  return {key: _plain(value) for key, value in record.items()}


def _final_record(history: Sequence[Mapping[str, Any]], trial_dir: str) -> dict[str, Any]:
  """The last evaluation record: from `history`, else (a trial finished earlier) from
  metrics.jsonl."""
  if history:
    return record_json(history[-1])
  if os.path.isfile(os.path.join(trial_dir, "metrics.jsonl")):
    from jdl.writers import read_jsonl  # pylint: disable=import-outside-toplevel

    records = read_jsonl(trial_dir)
    if records:
      return dict(records[-1])
  raise ValueError(f"training returned no evaluation record and {trial_dir} holds none.")


def _describe(params: Mapping[str, Any]) -> str:
  return " ".join(f"{key}={_format_cell(value)}" for key, value in params.items())


# ---------------------------------------------------------------------------------------------
# Results.


_STATUS = {"COMPLETE": "ok", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
           "WAITING": "waiting"}
_BOOKKEEPING = ("trial", "params", "status", "error", "seconds", "workdir")


def study_rows(study: optuna.Study, metric: str = "test_accuracy") -> list[Row]:
  """One row per trial of the study, in trial order: `{"trial", "params", "status" ("ok",
  "pruned", "failed", "interrupted", "running", "waiting"), "error", "seconds", "workdir", **the
  last evaluation record}`; `metric` is the trial's value where it has one."""
  rows = []
  for trial in study.get_trials(deepcopy=False):
    status = _STATUS[trial.state.name]
    if status == "failed" and "error" not in trial.user_attrs:
      status = "interrupted"  # preempted or killed: its parameters were queued again
    row: Row = {"trial": trial.number, "params": dict(trial.params), "status": status,
                "error": trial.user_attrs.get("error", ""),
                "seconds": trial.duration.total_seconds() if trial.duration else None,
                "workdir": trial.user_attrs.get("workdir", "")}
    row.update({k: v for k, v in trial.user_attrs.get("record", {}).items()
                if k not in _BOOKKEEPING})
    if trial.value is not None:
      row[metric] = trial.value
    rows.append(row)
  return rows


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"mode must be one of {tuple(MODES)} (is a larger metric better?); got "
                     f"{mode!r}.")


def _score(row: Mapping[str, Any], metric: str, mode: str) -> float | None:
  """The row's metric (negated for "min"), or None when it has no finite one."""
  value = row.get(metric)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    return None
  return float(value) if mode == "max" else -float(value)


def sort_rows(rows: Sequence[Row], metric: str = "test_accuracy", mode: str = "max") -> list[Row]:
  """The rows best first: finished trials by `metric`, then pruned ones by their last value,
  then the rest in trial order."""
  _check_mode(mode)

  def key(item: tuple[int, Row]) -> tuple[int, float, int]:
    index, row = item
    score = _score(row, metric, mode)
    group = {"ok": 0, "pruned": 1}.get(row.get("status"), 2) if score is not None else 2
    return (group, -(score or 0.0), index)

  return [row for _, row in sorted(enumerate(rows), key=key)]


def best_row(rows: Sequence[Row], metric: str = "test_accuracy", mode: str = "max") -> Row | None:
  """The best finished row by `metric`, or None when no trial finished."""
  ranked = sort_rows(rows, metric, mode)
  good = ranked[0] if ranked else None
  return good if good and good.get("status") == "ok" and _score(good, metric, mode) is not None \
      else None


def _param_keys(rows: Sequence[Row]) -> list[str]:
  keys: dict[str, None] = {}
  for row in rows:
    keys.update(dict.fromkeys(row.get("params", {})))
  return list(keys)


def _format_cell(value: Any) -> str:
  value = _plain(value)
  if isinstance(value, float):
    return f"{value:.4g}"
  if isinstance(value, tuple):
    return "(" + ", ".join(_format_cell(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def markdown_table(rows: Sequence[Row], metric: str = "test_accuracy", mode: str = "max") -> str:
  """A Markdown table of the rows, best first; the best row's status says `best`."""
  ranked, best, params = sort_rows(rows, metric, mode), best_row(rows, metric, mode), _param_keys(rows)
  extras = [k for k in ("train_loss", "step") if k != metric and any(k in r for r in rows)]
  header = ["rank", "trial", *params, metric, *extras, "seconds", "status"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for rank, row in enumerate(ranked, start=1):
    status = "best" if row is best else row.get("status", "")
    if row.get("error"):
      status = f"{status}: {row['error']}"
    cells = [str(rank), str(row.get("trial", ""))]
    cells += [_format_cell(row["params"][k]) if k in row.get("params", {}) else "" for k in params]
    cells.append(f"{row[metric]:.4f}" if _score(row, metric, mode) is not None else "")
    for key in extras:
      value = row.get(key)
      cells.append("" if value is None else
                   f"{value:.4f}" if key == "train_loss" else _format_cell(value))
    seconds = row.get("seconds")
    cells.append(f"{seconds:.1f}" if isinstance(seconds, (int, float)) else "")
    cells.append(status)
    lines.append("| " + " | ".join(_markdown_escape(c) for c in cells) + " |")
  return "\n".join(lines)


def _markdown_escape(text: str) -> str:
  text = " ".join(text.split())
  if len(text) > 120:  # long error messages: the CSV keeps them whole
    text = text[:117] + "..."
  return text.replace("|", "\\|")


def write_results(rows: Sequence[Row], workdir: str, *, metric: str = "test_accuracy",
                  mode: str = "max") -> tuple[str, str]:
  """Writes the rows, best first, to `workdir/results.csv` and `workdir/results.md`; swept values
  are written as override text (pastable as `--config.KEY=VALUE`).

  Returns:
    `(csv_path, markdown_path)`.
  """
  os.makedirs(workdir, exist_ok=True)
  ranked, best, params = sort_rows(rows, metric, mode), best_row(rows, metric, mode), _param_keys(rows)
  results: dict[str, None] = {metric: None}
  for row in rows:
    results.update({k: None for k in row if k not in _BOOKKEEPING and k not in params})
  columns = ["rank", "best", "trial", *params, *results, "seconds", "status", "error", "workdir"]
  csv_path = os.path.join(workdir, "results.csv")
  with open(csv_path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for rank, row in enumerate(ranked, start=1):
      line = {"rank": rank, "best": row is best, "trial": row.get("trial")}
      line.update({k: override_text(v) for k, v in row.get("params", {}).items()})
      line.update({k: row.get(k, "") for k in (*results, "seconds", "status", "error", "workdir")})
      writer.writerow(line)
  markdown_path = os.path.join(workdir, "results.md")
  with open(markdown_path, "w", encoding="utf-8") as f:
    f.write(markdown_table(rows, metric, mode) + "\n")
  return csv_path, markdown_path


def plot_sweep(rows: Sequence[Row], path: str, *, x: str, metric: str = "test_accuracy",
               log_x: bool | None = None) -> str:
  """Plots `metric` against the swept key `x` as a PNG: finished trials as dots, pruned ones
  (at their last value) as crosses.

  Args:
    rows: from `study_rows`.
    path: the PNG file to write.
    x: the swept key on the horizontal axis; non-numbers get one tick each.
    metric: the record key on the vertical axis.
    log_x: a logarithmic x axis; None: for positive values spanning 100x or more.

  Returns:
    `path`.
  """
  params = _param_keys(rows)
  if x not in params:
    raise ValueError(f"plot_sweep: x={x!r} is not a swept key; the rows sweep {params}.")
  shown = [r for r in rows if r.get("status") in ("ok", "pruned")
           and _score(r, metric, "max") is not None and x in r["params"]]
  values = [_plain(r["params"][x]) for r in shown]
  numeric = bool(values) and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
  categories = list(dict.fromkeys(_format_cell(v) for v in values)) if not numeric else []
  if log_x is None:
    log_x = numeric and min(values) > 0 and max(values) / min(values) >= 100
  figure, axes = _figure()
  for status, marker, label in (("ok", "o", "finished"), ("pruned", "x", "pruned (last value)")):
    points = [(v if numeric else categories.index(_format_cell(v)), float(r[metric]))
              for r, v in zip(shown, values) if r["status"] == status]
    if points:
      axes.scatter(*zip(*points), marker=marker, label=label)
  if log_x:
    axes.set_xscale("log")
  if not numeric:
    axes.set_xticks(range(len(categories)), categories)
  axes.set_xlabel(x)
  axes.set_ylabel(metric)
  axes.set_title(f"{metric} vs {x}, {len(shown)} of {len(rows)} trials")
  axes.grid(True, alpha=0.3)
  if shown:
    axes.legend(fontsize="small")
  return _save(figure, path)


def plot_history(study: optuna.Study, path: str, *, metric: str = "test_accuracy") -> str:
  """Plots every trial's reported `metric` against the step as a PNG (pruned trials dashed): how
  the pruner cut the sweep.

  Returns:
    `path`.
  """
  figure, axes = _figure()
  for trial in study.get_trials(deepcopy=False):
    if trial.intermediate_values:
      steps = sorted(trial.intermediate_values)
      pruned = trial.state == optuna.trial.TrialState.PRUNED
      axes.plot(steps, [trial.intermediate_values[s] for s in steps], marker=".",
                linestyle="--" if pruned else "-", alpha=0.8, label=f"trial {trial.number}"
                + (" (pruned)" if pruned else ""))
  axes.set_xlabel("step")
  axes.set_ylabel(metric)
  axes.set_title(f"{metric} at each evaluation")
  axes.grid(True, alpha=0.3)
  if axes.lines and len(axes.lines) <= 12:
    axes.legend(fontsize="small")
  return _save(figure, path)


def _figure() -> tuple[Any, Any]:
  """A matplotlib Figure (never pyplot: no display, no global state) and its axes."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  figure = Figure(figsize=(6.4, 4.4))
  FigureCanvasAgg(figure)
  return figure, figure.add_subplot()


def _save(figure: Any, path: str) -> str:
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path, dpi=120)
  return path

