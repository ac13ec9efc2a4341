"""Benchmark: a whole experiment process, old checkout against new: wall time and final accuracy.

Runs `python -m experiments.mnist1d --workdir=<a fresh temporary dir> --config.progress=false`
(`--experiment` and `--args` change that; `--old_args` and `--new_args` go to one side only, for
a config key only one side has) as a subprocess with its working directory in each
checkout in turn, `--repeats` times (after `--warmup` untimed runs of each, which also generate
the dataset once and warm the file cache), and prints each run's wall time, the medians, the
ratio new / old of the medians and the median of each repeat's own ratio (the two ran back to
back), the time the process spent outside `fit` (wall time less the seconds its final line
reports, from `fit`'s start to its end, compilation inside `fit` included: what is left is
imports, data, model and optimizer set-up, and exit), and each side's final accuracy line, less
its time, which should agree at the same seed.

A checkout is a directory (a worktree of the repository at some commit) or a commit of this
repository, for which a temporary `git worktree` is made and removed afterwards. Both sides use
this Python (`sys.executable`, its installed packages): with its working directory first on
`sys.path`, `python -m` imports the checkout's own `jdl` and `experiments` (checked before the
first run).

  python -m benchmarks.bench_startup --old=/work/old --repeats=3
  python -m benchmarks.bench_startup --old=adcd75b --repeats=3           # a temporary worktree
  python -m benchmarks.bench_startup --old=adcd75b --new=HEAD --args="--config.num_steps=1000"
  python -m benchmarks.bench_startup --old=/work/old --new_args="--config.compilation_cache_dir="
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINAL_LINE = re.compile(r"^final \S+ (accuracy|loss): .*$", re.MULTILINE)
TRAINING_SECONDS = re.compile(r"after \d+ steps, ([0-9.]+)s")


@contextlib.contextmanager
def checkout(spec: str, repo: str = REPO_ROOT) -> Iterator[str]:
  """The directory of checkout `spec`: `spec` itself when it is a directory, else a temporary
  detached `git worktree` of commit `spec` in `repo`, removed on exit."""
  if os.path.isdir(spec):
    yield os.path.abspath(spec)
    return
  commit = subprocess.run(["git", "-C", repo, "rev-parse", "--verify", f"{spec}^{{commit}}"],
                          capture_output=True, text=True, check=False)
  if commit.returncode != 0:
    raise SystemExit(f"error: {spec!r} is neither a directory nor a commit of {repo}: "
                     f"{commit.stderr.strip()}")
  parent = tempfile.mkdtemp(prefix="jdl-bench-startup-")
  path = os.path.join(parent, f"worktree-{commit.stdout.strip()[:12]}")
  subprocess.run(["git", "-C", repo, "worktree", "add", "--detach", "--quiet", path,
                  commit.stdout.strip()], check=True)
  try:
    yield path
  finally:
    subprocess.run(["git", "-C", repo, "worktree", "remove", "--force", path], check=False)
    shutil.rmtree(parent, ignore_errors=True)


def check_imports_from(directory: str) -> None:
  """Exits with an error unless `python` started in `directory` finds that directory's `jdl` and
  `experiments` (and not, say, an installed copy): otherwise both sides would time one code."""
  found = subprocess.run(
      [sys.executable, "-c", "import importlib.util as u; "
       "print(u.find_spec('jdl').origin); print(u.find_spec('experiments').origin)"],
      cwd=directory, capture_output=True, text=True, check=False)
  origins = found.stdout.split()
  inside = [os.path.realpath(o).startswith(os.path.realpath(directory) + os.sep) for o in origins]
  if found.returncode != 0 or len(origins) != 2 or not all(inside):
    raise SystemExit(f"error: python started in {directory} imports jdl/experiments from "
                     f"{origins or found.stderr.strip()}, not from that checkout.")


def run_once(directory: str, module: str, extra_args: Sequence[str]) -> dict:
  """One experiment process in `directory`, with a fresh workdir: its wall time, its final line
  and the training time that line reports (None where it has none)."""
  with tempfile.TemporaryDirectory(prefix="jdl-bench-startup-run-") as workdir:
    command = [sys.executable, "-m", module, f"--workdir={workdir}", "--config.progress=false",
               *extra_args]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=directory, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
  output = done.stdout + done.stderr
  if done.returncode != 0:
    raise SystemExit(f"error: {shlex.join(command)} in {directory} exited with "
                     f"{done.returncode}:\n{output[-3000:]}")
  finals = [match.group(0) for match in FINAL_LINE.finditer(output)]
  final = finals[-1] if finals else "(no final line)"
  training = TRAINING_SECONDS.search(final)
  return {"seconds": seconds, "final": final,
          "result": TRAINING_SECONDS.sub(lambda m: m.group(0).split(",")[0], final),
          "training": float(training.group(1)) if training else None}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--old", required=True, help="the old checkout: a directory or a commit")
  parser.add_argument("--new", default=REPO_ROOT,
                      help="the new checkout: a directory or a commit (default: this repository's "
                           "working tree)")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, in turn")
  parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each first")
  parser.add_argument("--experiment", default="experiments.mnist1d", help="the module to run")
  parser.add_argument("--args", default="", help="more arguments for the experiment, quoted")
  parser.add_argument("--old_args", default="", help="more arguments for the old side only")
  parser.add_argument("--new_args", default="", help="more arguments for the new side only")
  args = parser.parse_args()
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  extra = {"old": shlex.split(args.args) + shlex.split(args.old_args),
           "new": shlex.split(args.args) + shlex.split(args.new_args)}
  with checkout(args.old) as old, checkout(args.new) as new:
    sides = {"old": old, "new": new}
    for directory in sides.values():
      check_imports_from(directory)
    for name, directory in sides.items():
      command = " ".join(["python", "-m", args.experiment, "--workdir=<fresh tmp dir>",
                          "--config.progress=false", *map(shlex.quote, extra[name])])
      print(f"{name}: {command}\n  in {directory}", flush=True)
    for index in range(args.warmup):
      for name, directory in sides.items():
        result = run_once(directory, args.experiment, extra[name])
        print(f"warm-up {index + 1}/{args.warmup} {name}: {result['seconds']:.2f} s", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
      # Alternate which side goes first, so neither always follows the other's cache footprint.
      order = list(sides) if repeat % 2 == 0 else list(sides)[::-1]
      for name in order:
        result = run_once(sides[name], args.experiment, extra[name])
        runs[name].append(result)
        print(f"repeat {repeat + 1}/{args.repeats} {name}: {result['seconds']:.2f} s wall, "
              f"{result['final']}", flush=True)

  medians = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
  paired = statistics.median(n["seconds"] / o["seconds"] for n, o in zip(runs["new"], runs["old"]))
  print(f"\n{args.experiment}, {args.repeats} runs each in turn (after {args.warmup} warm-up "
        f"each); {os.cpu_count()} CPU cores")
  print(f"{'side':<4} {'median s':>8} {'outside fit s':>13}  runs (s)")
  for name, rs in runs.items():
    outside_fit = [r["seconds"] - r["training"] for r in rs if r["training"] is not None]
    outside = f"{statistics.median(outside_fit):13.2f}" if outside_fit else "-".rjust(13)
    print(f"{name:<4} {medians[name]:8.2f} {outside}  "
          + " ".join(f"{r['seconds']:.2f}" for r in rs))
  print(f"new / old: {medians['new'] / medians['old']:.3f} (medians), {paired:.3f} (paired)")
  for name, rs in runs.items():
    results = sorted({r["result"] for r in rs})  # the final line less its time: one per side
    print(f"{name}: " + " | ".join(results))


if __name__ == "__main__":
  main()
