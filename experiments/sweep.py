"""Sweep an experiment's hyperparameters with Optuna: TPE by default, random or grid on request.

Every trial is the base experiment's `get_config()` (plus `--config.` overrides) with the sampled
values applied, trained in `WORKDIR/trial_<n>`; each evaluation record is reported to the study,
whose pruner stops bad trials early. The study lives in `WORKDIR/study.db` (SQLite) or the
database `--storage` names: the same command again resumes a killed sweep, and the same command
run in two processes splits the trials between them. At the end it prints a Markdown table best
first and writes `results.csv`, `results.md`, `sweep.png` (the metric against the first swept
key, or `--plot_x`) and `history.png` (each trial's metric at every evaluation).

  python -m experiments.sweep --base=experiments.mnist1d --workdir=runs/sweep --trials=20 \\
      --config.model.name=mlp \\
      --space='{"optimizer.learning_rate": {"log_uniform": [1e-4, 1e-1]}, "model.mlp.hidden": [[64], [128, 64]]}'
  python -m experiments.sweep --sampler=grid \\
      --space='{"optimizer.learning_rate": [1e-3, 3e-3, 1e-2], "optimizer.name": ["adam", "sgd"]}'
  python -m experiments.sweep --vmap=4 --trials=12 --config.model.name=mlp \\
      --space='{"optimizer.learning_rate": {"log_uniform": [1e-4, 1e-1]}}'

The space is JSON (inline, or a .json file): each key a dotted config key, each value a list of choices (lists inside
become tuples) or a distribution `{"log_uniform": [lo, hi]}`, `{"uniform": [lo, hi]}` or
`{"int": [lo, hi]}`. `--vmap=K` asks the study for K trials at a time and trains them as one
program with `jax.vmap` (`jdl.vmap_sweep`); it sweeps `optimizer.learning_rate` and `seed` only.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import optuna

from jdl import config as config_lib
from jdl import experiment, sweep, vmap_sweep
from jdl.analysis import plots


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.sweep", description=__doc__, allow_abbrev=False,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Any other argument must be --config.KEY=VALUE, an override of the base config.")
  parser.add_argument("--base", default="experiments.mnist1d",
                      help="the experiment module whose get_config() every trial starts from")
  parser.add_argument("--space", required=True,
                      help="the sweep space as a JSON object, or the path of a .json file")
  parser.add_argument("--trials", type=int, default=0,
                      help="finished trials the sweep runs to (default: the grid's size for "
                           "--sampler=grid, else 20)")
  parser.add_argument("--sampler", default="tpe", choices=sweep.SAMPLERS,
                      help="how trials are chosen: Optuna's TPE, random or grid sampler")
  parser.add_argument("--pruner", default="median", choices=sweep.PRUNERS,
                      help="what stops bad trials early, from their evaluation records")
  parser.add_argument("--startup_trials", type=int, default=5,
                      help="the median pruner stops no trial before this many have finished")
  parser.add_argument("--seed", type=int, default=None, help="seeds the sampler")
  parser.add_argument("--workdir", default=os.path.join("runs", "sweep"),
                      help="where the trials' folders, the study's SQLite file and the results go")
  parser.add_argument("--storage", default=None,
                      help="the study's database URL (default sqlite:///WORKDIR/study.db)")
  parser.add_argument("--study_name", default="sweep", help="the study's name in the database")
  parser.add_argument("--metric", default="test_accuracy",
                      help="the record key the study optimises")
  parser.add_argument("--mode", default="max", choices=tuple(sweep.MODES),
                      help="whether a larger (max) or smaller (min) metric is better")
  parser.add_argument("--plot_x", default=None,
                      help="the swept key on the plot's x axis (default: the first key)")
  parser.add_argument("--vmap", type=int, default=0,
                      help="train this many trials at once with jax.vmap (learning rates and "
                           "seeds only); 0: one trial at a time")
  return parser


def load_base_config(module_name: str):
  """`get_config()` of the experiment module `module_name`, e.g. "experiments.mnist1d"."""
  try:
    module = importlib.import_module(module_name)
  except ImportError as error:
    raise config_lib.ConfigError(
        f"--base={module_name}: cannot import it ({error}); expected an experiment module such "
        "as experiments.mnist1d.") from None
  if not callable(getattr(module, "get_config", None)):
    raise config_lib.ConfigError(f"--base={module_name} has no get_config(); expected an "
                                 "experiment module such as experiments.mnist1d.")
  return module.get_config()


def parse_space(text: str) -> sweep.Space:
  """The `--space` JSON (or the .json file it names) as a sweep space (see
  `jdl.sweep.space_from_json`)."""
  if text.endswith(".json"):
    try:
      with open(text, encoding="utf-8") as f:
        text = f.read()
    except OSError as error:
      raise config_lib.ConfigError(f"--space={text}: cannot read it ({error}).") from None
  try:
    raw = json.loads(text)
  except json.JSONDecodeError as error:
    raise config_lib.ConfigError(
        f"--space is not valid JSON ({error}); expected an object such as "
        '\'{"optimizer.learning_rate": [1e-3, 1e-2]}\' (quote keys and strings with ").') from None
  try:
    return sweep.space_from_json(raw)
  except ValueError as error:
    raise config_lib.ConfigError(f"--space: {error}") from None


def run(argv: Sequence[str], *, train: sweep.TrainFn | None = None) -> list[dict[str, Any]]:
  """Parses the command line, runs (or resumes) the sweep, prints the table, writes the results.

  Args:
    argv: command-line arguments, without the program name.
    train: `(config, workdir, hooks) -> (state, history)` for every trial; defaults to
      `jdl.train_and_evaluate` (tests pass a fake).

  Returns:
    The study's rows (`jdl.sweep.study_rows`), in trial order.

  Raises:
    ConfigError: a bad argument, space or config key; nothing has trained yet.
  """
  args, rest = _parser().parse_known_args(argv)
  bad = [arg for arg in rest if not arg.startswith("--config.")]
  if bad:
    raise config_lib.ConfigError(
        f"unexpected argument {bad[0]!r}; expected the options of --help or --config.KEY=VALUE.")
  config = config_lib.apply_overrides(load_base_config(args.base),
                                      [arg[len("--config."):] for arg in rest])
  space = parse_space(args.space)
  sweep.check_keys(config, list(space))
  # As an experiment's main does: trials of a small model share compiled programs through the
  # persistent cache, and run on the experiment's CPU threads.
  experiment.configure_process(config)
  for name in ("trials", "vmap"):
    if getattr(args, name) < 0:
      raise config_lib.ConfigError(f"--{name}={getattr(args, name)} must be >= 0.")
  plot_x = args.plot_x or next(iter(space))
  if plot_x not in space:
    raise config_lib.ConfigError(f"--plot_x={plot_x} is not a key of the space {list(space)}.")
  try:
    sampler = sweep.make_sampler(args.sampler, space, seed=args.seed)
    num_trials = args.trials or (sweep.grid_size(space) if args.sampler == "grid" else 20)
  except ValueError as error:
    raise config_lib.ConfigError(f"--space: {error}") from None
  study = sweep.open_study(
      args.workdir, space, storage=args.storage, study_name=args.study_name, mode=args.mode,
      sampler=sampler, pruner=sweep.make_pruner(args.pruner, startup_trials=args.startup_trials),
      heartbeat_seconds=None if args.vmap else sweep.HEARTBEAT_SECONDS)
  done = sweep.finished_trials(study)
  print(f"sweeping {args.base} with {args.sampler} to {num_trials} trials"
        f"{f', {args.vmap} at a time with jax.vmap' if args.vmap else ''}; "
        f"study {args.study_name!r} "
        f"in {args.storage or sweep.default_storage(args.workdir)} ({done} finished before)",
        flush=True)
  if args.vmap:
    vmap_sweep.run_vmapped_study(study, config, space, num_trials, members=args.vmap,
                                 metric=args.metric)
  else:
    sweep.run_study(study, config, space, args.workdir, num_trials, train=train,
                    metric=args.metric)
  rows = sweep.study_rows(study, args.metric)
  written = list(sweep.write_results(rows, args.workdir, metric=args.metric, mode=args.mode))
  if sweep.best_row(rows, args.metric, args.mode) is not None:
    written.append(plots.plot_sweep(rows, os.path.join(args.workdir, "sweep.png"), x=plot_x,
                                    metric=args.metric))
    written.append(plots.plot_trial_curves(rows, os.path.join(args.workdir, "history.png"),
                                           metric=args.metric))
  print()
  print(sweep.markdown_table(rows, args.metric, args.mode))
  print("\nwrote " + ", ".join(written))
  return rows


def main() -> None:
  """`run` on `sys.argv`: a bad argument prints one line and exits 2; a sweep in which no trial
  finished exits 1."""
  # jdl prints a line per trial; Optuna's own per-trial lines would repeat them.
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  try:
    rows = run(sys.argv[1:])
  except config_lib.ConfigError as error:
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2) from None
  if all(row["status"] != "ok" for row in rows):
    print("error: no trial finished (see the table).", file=sys.stderr)
    raise SystemExit(1)


if __name__ == "__main__":
  main()
