"""Sweep an experiment's hyperparameters: a grid or a random search, each trial a full run.

Trains the base experiment's `get_config()` (plus `--config.` overrides) once per trial, each in
`WORKDIR/trial_<i>`, then prints a Markdown table best first and writes `results.csv`,
`results.md` and `sweep.png` (the metric against the first swept key) into WORKDIR. A trial that
fails (a rejected value, a loss that became NaN) is reported as failed; the others still run.

  python -m experiments.sweep --base=experiments.mnist1d --workdir=runs/sweep \\
      --space='{"optimizer.learning_rate": [1e-3, 3e-3, 1e-2], "optimizer.name": ["adam", "sgd"]}'
  python -m experiments.sweep --space='{"optimizer.learning_rate": {"log_uniform": [1e-4, 1e-1]},
      "model.mlp.hidden": [[64], [128, 64]]}' --random=8 --seed=0 --config.model.name=mlp
  python -m experiments.sweep --vmap --space='{"optimizer.learning_rate": [1e-3, 3e-3, 1e-2, 3e-2]}'

The space is JSON: each key a dotted config key, each value a list of choices (lists inside
become tuples) or, with `--random=N`, a distribution `{"log_uniform": [lo, hi]}`, `{"uniform":
[lo, hi]}` or `{"int_uniform": [lo, hi]}`. `--vmap` trains every trial at once on one device
with `jax.vmap` (`jdl.vmap_sweep.vmap_sweep`); it sweeps `optimizer.learning_rate` and `seed` only.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from jdl import config as config_lib
from jdl import sweep, vmap_sweep


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.sweep", description=__doc__, allow_abbrev=False,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Any other argument must be --config.KEY=VALUE, an override of the base config.")
  parser.add_argument("--base", default="experiments.mnist1d",
                      help="the experiment module whose get_config() every trial starts from")
  parser.add_argument("--space", required=True, help="the sweep space as a JSON object")
  parser.add_argument("--random", type=int, default=0,
                      help="draw this many random trials instead of the full grid")
  parser.add_argument("--seed", type=int, default=0, help="seeds the random search's draws")
  parser.add_argument("--workdir", default=os.path.join("runs", "sweep"),
                      help="where the trials' folders and the results go")
  parser.add_argument("--metric", default="test_accuracy", help="the record key that ranks trials")
  parser.add_argument("--mode", default="max", choices=sweep.MODES,
                      help="whether a larger (max) or smaller (min) metric is better")
  parser.add_argument("--plot_x", default=None,
                      help="the swept key on the plot's x axis (default: the first key)")
  parser.add_argument("--vmap", action="store_true",
                      help="train all trials at once with jax.vmap (learning rates and seeds only)")
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


def parse_space(text: str) -> dict[str, Any]:
  """The `--space` JSON as a sweep space (see `jdl.sweep.space_from_json`)."""
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
  """Parses the command line, runs the sweep, prints the table and writes the results.

  Args:
    argv: command-line arguments, without the program name.
    train: `(config, workdir) -> (state, history)` for every trial; defaults to
      `jdl.train_and_evaluate` (tests pass a fake).

  Returns:
    The rows of `jdl.sweep.run_sweep` (or of the vmapped run), in trial order.

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
  if args.random < 0:
    raise config_lib.ConfigError(f"--random={args.random}: give a number of trials >= 1, or 0 "
                                 "(the default) for the full grid.")
  space = parse_space(args.space)
  try:
    trials = (sweep.random_search(space, args.random, seed=args.seed) if args.random > 0
              else sweep.grid(space))
  except ValueError as error:
    raise config_lib.ConfigError(f"--space: {error}") from None
  sweep.check_keys(config, list(space))
  plot_x = args.plot_x or next(iter(space))
  if plot_x not in space:
    raise config_lib.ConfigError(f"--plot_x={plot_x} is not a key of the space {list(space)}.")
  print(f"sweeping {len(trials)} trials of {args.base} ({'random' if args.random else 'grid'}"
        f"{', vmapped' if args.vmap else ''}) into {args.workdir}", flush=True)
  if args.vmap:
    result = vmap_sweep.vmap_sweep(config, trials, log=print)
    rows = result.rows()
    print(f"{result.num_members} members in {result.train_seconds:.1f}s "
          f"(+{result.compile_seconds:.1f}s compiling)")
  else:
    rows = sweep.run_sweep(config, trials, args.workdir, train=train, metric=args.metric,
                           mode=args.mode)
  csv_path, markdown_path = sweep.write_results(rows, args.workdir, metric=args.metric,
                                                mode=args.mode)
  written = [csv_path, markdown_path]
  if sweep.best_row(rows, args.metric, args.mode) is not None:
    # A random search's other keys rarely repeat, so its points are not grouped into lines.
    written.append(sweep.plot_sweep(rows, os.path.join(args.workdir, "sweep.png"), x=plot_x,
                                    metric=args.metric, group_by=() if args.random else None))
  print()
  print(sweep.markdown_table(rows, args.metric, args.mode))
  print("\nwrote " + ", ".join(written))
  return rows


def main() -> None:
  """`run` on `sys.argv`: a bad argument prints one line and exits 2; a sweep in which every
  trial failed exits 1."""
  try:
    rows = run(sys.argv[1:])
  except config_lib.ConfigError as error:
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2) from None
  if all(row["status"] != "ok" for row in rows):
    print("error: every trial failed (see the table).", file=sys.stderr)
    raise SystemExit(1)


if __name__ == "__main__":
  main()
