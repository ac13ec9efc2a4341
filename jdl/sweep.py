"""Hyperparameter sweeps: grids and random search over config keys, run one trial after another.

A *space* maps dotted config keys to a list of choices or, for random search, a distribution
(`Uniform`, `LogUniform`, `IntUniform`). A *trial* is a dict `{key: value}`. `run_sweep` returns
one row per trial: `{"trial": i, "params": trial, "status": "ok" | "failed", "error": message,
"seconds": ..., "workdir": ..., **the last evaluation record}`. See docs/sweeps.md; the vmapped
sweep is `jdl.vmap_sweep`.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from jdl import experiment, loop as loop_lib
from jdl.config import ConfigError, apply_overrides

Trial = dict[str, Any]
Row = dict[str, Any]
TrainFn = Callable[[ml_collections.ConfigDict, str], tuple[Any, list[dict[str, float]]]]

MODES = ("max", "min")


# ---------------------------------------------------------------------------------------------
# Spaces and trials.


@dataclasses.dataclass(frozen=True)
class Uniform:
  """A real number drawn uniformly from [low, high]."""

  low: float
  high: float

  def __post_init__(self) -> None:
    _check_bounds(self, self.low, self.high)

  def sample(self, rng: np.random.Generator) -> float:
    return float(np.clip(rng.uniform(self.low, self.high), self.low, self.high))


@dataclasses.dataclass(frozen=True)
class LogUniform:
  """A positive number whose logarithm is uniform on [log low, log high]."""

  low: float
  high: float

  def __post_init__(self) -> None:
    _check_bounds(self, self.low, self.high)
    if self.low <= 0:
      raise ValueError(f"LogUniform needs 0 < low; got low={self.low!r}.")

  def sample(self, rng: np.random.Generator) -> float:
    value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
    return float(min(max(value, self.low), self.high))  # exp(log(x)) may round past a bound


@dataclasses.dataclass(frozen=True)
class IntUniform:
  """An integer drawn uniformly from low..high, both included."""

  low: int
  high: int

  def __post_init__(self) -> None:
    for name in ("low", "high"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"IntUniform needs integer bounds; got {name}={value!r}.")
    if self.low > self.high:
      raise ValueError(f"IntUniform needs low <= high; got low={self.low}, high={self.high}.")

  def sample(self, rng: np.random.Generator) -> int:
    return int(rng.integers(self.low, self.high, endpoint=True))


Distribution = Uniform | LogUniform | IntUniform
_DISTRIBUTIONS = (Uniform, LogUniform, IntUniform)
_JSON_DISTRIBUTIONS = {"uniform": Uniform, "log_uniform": LogUniform, "int_uniform": IntUniform}


def _check_bounds(distribution: Any, low: Any, high: Any) -> None:
  name = type(distribution).__name__
  for label, value in (("low", low), ("high", high)):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
        or not math.isfinite(value):
      raise ValueError(f"{name} needs finite numeric bounds; got {label}={value!r}.")
  if not low < high:
    raise ValueError(f"{name} needs low < high; got low={low!r}, high={high!r}.")


def _check_space(space: Any, *, allow_distributions: bool) -> None:
  if not isinstance(space, Mapping) or not space:
    raise ValueError(
        "a sweep space must be a non-empty mapping from config keys to lists of values, e.g. "
        f"{{'optimizer.learning_rate': [1e-3, 1e-2]}}; got {space!r}.")
  for key, values in space.items():
    if not isinstance(key, str) or not key:
      raise ValueError(f"sweep space keys must be dotted config keys (strings); got {key!r}.")
    if isinstance(values, _DISTRIBUTIONS):
      if not allow_distributions:
        raise ValueError(
            f"grid needs a list of values for {key!r}, but it has the distribution {values!r}; "
            "draw from distributions with random_search (on the command line: --random=N).")
      continue
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
      expected = "a non-empty list of values" + (" or a distribution" if allow_distributions else "")
      raise ValueError(
          f"sweep space key {key!r} needs {expected} (e.g. [1e-3, 1e-2]); got {values!r}.")


def grid(space: Mapping[str, Sequence[Any]]) -> list[Trial]:
  """Every combination of the space's values (the cartesian product), the last key varying fastest.

  Args:
    space: dotted config keys -> lists of values, e.g. `{"optimizer.name": ["adam", "sgd"],
      "model.mlp.hidden": [(64,), (128, 64)]}`.

  Returns:
    `prod(len(values))` trials, each a dict with every key of `space`.
  """
  _check_space(space, allow_distributions=False)
  keys = list(space)
  return [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]


def random_search(space: Mapping[str, Sequence[Any] | Distribution], num_trials: int, *,
                  seed: int) -> list[Trial]:
  """`num_trials` independent draws: a uniform choice from each list, a sample of each distribution.

  Args:
    space: dotted config keys -> lists of choices or `Uniform` / `LogUniform` / `IntUniform`.
    num_trials: how many trials to draw (>= 1).
    seed: seeds the draws (numpy's `default_rng`), keys in the order of `space`.
  """
  _check_space(space, allow_distributions=True)
  if isinstance(num_trials, bool) or not isinstance(num_trials, (int, np.integer)) \
      or num_trials < 1:
    raise ValueError(f"random_search needs num_trials >= 1; got {num_trials!r}.")
  rng = np.random.default_rng(seed)
  trials = []
  for _ in range(num_trials):
    trial = {}
    for key, values in space.items():
      if isinstance(values, _DISTRIBUTIONS):
        trial[key] = values.sample(rng)
      else:
        trial[key] = values[int(rng.integers(len(values)))]
    trials.append(trial)
  return trials


def space_from_json(space: Mapping[str, Any]) -> dict[str, Any]:
  """A space parsed from JSON: lists are choices (inner lists become tuples), and
  `{"log_uniform" | "uniform" | "int_uniform": [lo, hi]}` a distribution."""
  if not isinstance(space, Mapping) or not space:
    raise ValueError(f"the sweep space must be a non-empty JSON object; got {space!r}.")
  parsed: dict[str, Any] = {}
  for key, value in space.items():
    if isinstance(value, Mapping):
      if len(value) != 1 or next(iter(value)) not in _JSON_DISTRIBUTIONS:
        raise ValueError(
            f"sweep space key {key!r}: a distribution is one of "
            f"{[{name: ['low', 'high']} for name in _JSON_DISTRIBUTIONS]}; got {dict(value)!r}.")
      (name, bounds), = value.items()
      if not isinstance(bounds, list) or len(bounds) != 2:
        raise ValueError(f"sweep space key {key!r}: {name} needs [low, high]; got {bounds!r}.")
      parsed[key] = _JSON_DISTRIBUTIONS[name](*bounds)
    elif isinstance(value, list):
      parsed[key] = [_tuples(v) for v in value]
    else:
      raise ValueError(
          f"sweep space key {key!r} needs a list of values or a distribution such as "
          f'{{"log_uniform": [1e-4, 1e-1]}}; got {value!r}.')
  return parsed


def _tuples(value: Any) -> Any:
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


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


def trial_overrides(trial: Mapping[str, Any]) -> list[str]:
  """The `KEY=VALUE` overrides that apply a trial."""
  return [f"{key}={override_text(value)}" for key, value in trial.items()]


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
# Running trials one after another, and reporting them.


def run_sweep(
    base_config: ml_collections.ConfigDict,
    trials: Sequence[Mapping[str, Any]],
    workdir: str,
    *,
    train: TrainFn | None = None,
    metric: str = "test_accuracy",
    mode: str = "max",
    log: Callable[[str], None] | None = print,
) -> list[Row]:
  """Trains every trial, one after another, each in `workdir/trial_<i>` (its values in trial.json).

  Each trial is `base_config` with the trial's values applied as overrides. A trial whose config
  is rejected or whose training raises becomes a failed row and the sweep goes on; `jdl.Preempted`
  stops the sweep. Rerun on the same workdir, finished trials are read back, not retrained.

  Args:
    base_config: the experiment's config (e.g. `experiments.mnist1d.get_config()`).
    trials: dicts of dotted config keys -> values (`grid`, `random_search`).
    workdir: the sweep's folder.
    train: `(config, workdir) -> (state, history)`; defaults to `jdl.train_and_evaluate`.
    metric: the record key that ranks trials, e.g. "test_accuracy" or "test_loss".
    mode: "max" or "min": whether a larger or smaller `metric` is better.
    log: where a line per trial goes (None: nowhere).

  Returns:
    One row per trial, in trial order (see the module docstring).

  Raises:
    ConfigError: a trial names a config key that `base_config` lacks (before anything trains).
    ValueError: `mode` is not "max" or "min"; a trial folder holds another trial's run (before
      anything trains); or a successful trial's record lacks `metric`.
  """
  _check_mode(mode)
  trials = [dict(trial) for trial in trials]
  check_keys(base_config, sorted({key for trial in trials for key in trial}))
  trial_dirs = [os.path.join(workdir, f"trial_{index}") for index in range(len(trials))]
  for trial_dir, trial in zip(trial_dirs, trials):
    _check_trial_dir(trial_dir, trial)
  train = train or experiment.train_and_evaluate
  rows = []
  for index, (trial_dir, trial) in enumerate(zip(trial_dirs, trials)):
    row: Row = {"trial": index, "params": trial, "status": "ok", "error": "",
                "workdir": trial_dir}
    start = time.perf_counter()
    try:
      os.makedirs(trial_dir, exist_ok=True)
      with open(os.path.join(trial_dir, TRIAL_FILE), "w", encoding="utf-8") as f:
        json.dump(_trial_json(trial), f, indent=2)
      config = apply_overrides(base_config, trial_overrides(trial))
      _, history = train(config, trial_dir)
      record = _final_record(history, trial_dir)
    except loop_lib.Preempted:
      raise
    except Exception as error:  # pylint: disable=broad-exception-caught
      row.update(status="failed", error=f"{type(error).__name__}: {error}")
    else:
      if metric not in record:
        raise ValueError(
            f"metric {metric!r} is not in trial {index}'s final record; it has "
            f"{sorted(record)}. Pass one of those as metric.")
      row.update({k: v for k, v in record.items() if k not in _BOOKKEEPING})
    row["seconds"] = time.perf_counter() - start
    rows.append(row)
    if log is not None:
      outcome = (f"{metric} {row[metric]:.4f}" if row["status"] == "ok" else
                 f"failed: {row['error']}")
      log(f"trial {index + 1}/{len(trials)} {_describe(trial)}: {outcome} "
          f"({row['seconds']:.1f}s)")
  return rows


TRIAL_FILE = "trial.json"
"""Each trial's folder records its values here, so a rerun never resumes another trial's run."""


def _trial_json(trial: Mapping[str, Any]) -> dict[str, str]:
  return {key: override_text(value) for key, value in trial.items()}


def _check_trial_dir(trial_dir: str, trial: Mapping[str, Any]) -> None:
  """Refuses a trial folder left by a different trial: resuming its checkpoints would mix runs."""
  path = os.path.join(trial_dir, TRIAL_FILE)
  if not os.path.isfile(path):
    return
  with open(path, encoding="utf-8") as f:
    previous = json.load(f)
  if previous != _trial_json(trial):
    raise ValueError(
        f"{trial_dir} holds the run of another trial ({previous}), not {_trial_json(trial)}; "
        "a sweep resumes its own trials only. Use a new workdir for a different sweep.")


def _final_record(history: Sequence[Mapping[str, Any]], trial_dir: str) -> dict[str, Any]:
  """The last evaluation record: from `history`, else (a finished trial) from metrics.jsonl."""
  if history:
    return {k: _plain(v) for k, v in history[-1].items()}
  if os.path.isfile(os.path.join(trial_dir, "metrics.jsonl")):
    from jdl.writers import read_jsonl  # pylint: disable=import-outside-toplevel

    records = read_jsonl(trial_dir)
    if records:
      return dict(records[-1])
  raise ValueError(f"training returned no evaluation record and {trial_dir} holds none.")


def _describe(trial: Mapping[str, Any]) -> str:
  return " ".join(f"{key}={_format_cell(value)}" for key, value in trial.items())


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES} (is a larger metric better?); got {mode!r}.")


def _score(row: Mapping[str, Any], metric: str, mode: str) -> float | None:
  """The row's metric, or None when the row failed or its metric is missing or not finite."""
  value = row.get(metric)
  if row.get("status") != "ok" or not isinstance(value, (int, float)) or not math.isfinite(value):
    return None
  return float(value) if mode == "max" else -float(value)


def sort_rows(rows: Sequence[Row], metric: str = "test_accuracy", mode: str = "max") -> list[Row]:
  """The rows best first by `metric`; failed rows (or without a finite metric) last, in order."""
  _check_mode(mode)

  def key(item: tuple[int, Row]) -> tuple[bool, float, int]:
    index, row = item
    score = _score(row, metric, mode)
    return (score is None, -(score or 0.0), index)

  return [row for _, row in sorted(enumerate(rows), key=key)]


def best_row(rows: Sequence[Row], metric: str = "test_accuracy", mode: str = "max") -> Row | None:
  """The best successful row by `metric`, or None when every trial failed."""
  ranked = sort_rows(rows, metric, mode)
  return ranked[0] if ranked and _score(ranked[0], metric, mode) is not None else None


def _param_keys(rows: Sequence[Row]) -> list[str]:
  keys: dict[str, None] = {}
  for row in rows:
    keys.update(dict.fromkeys(row.get("params", {})))
  return list(keys)


_BOOKKEEPING = ("trial", "params", "status", "error", "seconds", "workdir")


def _result_keys(rows: Sequence[Row], metric: str) -> list[str]:
  keys: dict[str, None] = {metric: None}
  for row in rows:
    keys.update({k: None for k in row if k not in _BOOKKEEPING})
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
  ranked = sort_rows(rows, metric, mode)
  best = best_row(rows, metric, mode)
  params = _param_keys(rows)
  extras = [k for k in ("train_loss", "step") if k != metric and any(k in r for r in rows)]
  timed = any(isinstance(r.get("seconds"), (int, float)) for r in rows)
  header = ["rank", "trial", *params, metric, *extras, *(["seconds"] if timed else []), "status"]
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
    if timed:
      cells.append(f"{row['seconds']:.1f}" if isinstance(row.get("seconds"), (int, float)) else "")
    cells.append(status)
    lines.append("| " + " | ".join(_markdown_escape(c) for c in cells) + " |")
  return "\n".join(lines)


def _markdown_escape(text: str) -> str:
  text = " ".join(text.split())
  if len(text) > 120:  # long error messages: the CSV keeps them whole
    text = text[:117] + "..."
  return text.replace("|", "\\|")


def _csv_value(value: Any) -> str:
  """A swept value as override text (pastable as `--config.KEY=VALUE`), else its plain text."""
  try:
    return override_text(value)
  except TypeError:
    return str(value)


def write_results(rows: Sequence[Row], workdir: str, *, metric: str = "test_accuracy",
                  mode: str = "max") -> tuple[str, str]:
  """Writes the rows, best first, to `workdir/results.csv` and `workdir/results.md`.

  Returns:
    `(csv_path, markdown_path)`.
  """
  os.makedirs(workdir, exist_ok=True)
  ranked = sort_rows(rows, metric, mode)
  best = best_row(rows, metric, mode)
  params = _param_keys(rows)
  results = [k for k in _result_keys(rows, metric) if k not in params]
  columns = ["rank", "best", "trial", *params, *results, "seconds", "status", "error", "workdir"]
  csv_path = os.path.join(workdir, "results.csv")
  with open(csv_path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for rank, row in enumerate(ranked, start=1):
      line = {"rank": rank, "best": row is best, "trial": row.get("trial")}
      line.update({k: _csv_value(v) for k, v in row.get("params", {}).items()})
      line.update({k: row.get(k, "") for k in (*results, "seconds", "status", "error", "workdir")})
      writer.writerow(line)
  markdown_path = os.path.join(workdir, "results.md")
  with open(markdown_path, "w", encoding="utf-8") as f:
    f.write(markdown_table(rows, metric, mode) + "\n")
  return csv_path, markdown_path


def plot_sweep(
    rows: Sequence[Row],
    path: str,
    *,
    x: str,
    metric: str = "test_accuracy",
    group_by: Sequence[str] | None = None,
    log_x: bool | None = None,
) -> str:
  """Plots `metric` against the swept key `x` as a PNG, one line per setting of `group_by`.

  Args:
    rows: rows of `run_sweep` (or `VmappedRun.rows`).
    path: the PNG file to write.
    x: the swept key on the horizontal axis; non-numbers get one tick each.
    metric: the record key on the vertical axis.
    group_by: the keys whose settings make separate lines (None: the other swept keys).
    log_x: a logarithmic x axis; None: for learning rates and positive values spanning >= 100x.

  Returns:
    `path`.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  params = _param_keys(rows)
  if x not in params:
    raise ValueError(f"plot_sweep: x={x!r} is not a swept key; the rows sweep {params}.")
  group_by = [k for k in params if k != x] if group_by is None else list(group_by)
  unknown = [k for k in group_by if k not in params]
  if unknown:
    raise ValueError(f"plot_sweep: group_by keys {unknown} are not swept; the rows sweep {params}.")
  good = [r for r in rows if _score(r, metric, "max") is not None and x in r["params"]]
  values = [_plain(r["params"][x]) for r in good]
  numeric = bool(values) and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
  if log_x is None:
    positive = numeric and min(values) > 0
    log_x = positive and (x.endswith("learning_rate") or max(values) / min(values) >= 100)
  categories: list[Any] = []
  if not numeric:
    for value in values:
      if value not in categories:
        categories.append(value)

  figure = Figure(figsize=(6.4, 4.4))
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  groups: dict[tuple[Any, ...], list[tuple[float, float]]] = {}
  for row, value in zip(good, values):
    group = tuple(_plain(row["params"].get(k)) for k in group_by)
    position = value if numeric else categories.index(value)
    groups.setdefault(group, []).append((float(position), float(row[metric])))
  for group, points in groups.items():
    points.sort()
    label = ", ".join(f"{k.rsplit('.', 1)[-1]}={_format_cell(v)}" for k, v in zip(group_by, group))
    axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label or None)
  if log_x:
    axes.set_xscale("log")
  if not numeric:
    axes.set_xticks(range(len(categories)), [_format_cell(c) for c in categories])
  axes.set_xlabel(x)
  axes.set_ylabel(metric)
  failed = len(rows) - len(good)
  axes.set_title(f"{metric} vs {x}" + (
      f" ({failed} failed trial{'s' if failed > 1 else ''} not shown)" if failed else ""))
  axes.grid(True, alpha=0.3)
  if any(group for group in groups) and len(groups) > 1:
    axes.legend(fontsize="small")
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path, dpi=120)
  return path
