"""One sweep worker of the sweep tests (run by sweep_test.py, not collected by pytest).

  python tests/sweep_worker.py WORKDIR NUM_TRIALS NAME [--kill_at=K] [--heartbeat=S] [--peers=N]

Runs `jdl.sweep.run_study` on the SQLite study in WORKDIR with a stand-in for training that
takes a fraction of a second, appends the workdir of every trial it trains to WORKDIR/NAME.log,
and first waits until N workers have started (each touches WORKDIR/NAME.started), so that
concurrent workers really overlap. With --kill_at=K the worker kills itself (SIGKILL, as a
crashed machine would) while training its K-th trial (1-based), after its first heartbeat.
"""

import argparse
import glob
import os
import signal
import time

import jdl
from jdl import sweep


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("num_trials", type=int)
  parser.add_argument("name")
  parser.add_argument("--kill_at", type=int, default=0)
  parser.add_argument("--heartbeat", type=int, default=sweep.HEARTBEAT_SECONDS)
  parser.add_argument("--peers", type=int, default=1)
  args = parser.parse_args()
  space = sweep.space_from_json({"optimizer.learning_rate": {"log_uniform": [1e-4, 1e-1]}})
  study = sweep.open_study(args.workdir, space, heartbeat_seconds=args.heartbeat,
                           sampler=sweep.make_sampler("random", space, seed=None))
  open(os.path.join(args.workdir, f"{args.name}.started"), "w", encoding="utf-8").close()
  deadline = time.time() + 120
  while len(glob.glob(os.path.join(args.workdir, "*.started"))) < args.peers:
    if time.time() > deadline:
      raise SystemExit(f"{args.name}: the other workers did not start within 120 s.")
    time.sleep(0.05)
  trained = []

  def train(config, trial_dir, hooks):
    trained.append(trial_dir)
    with open(os.path.join(args.workdir, f"{args.name}.log"), "a", encoding="utf-8") as log:
      log.write(trial_dir + "\n")
    time.sleep(0.3)
    if len(trained) == args.kill_at:
      # Killed once the trial's heartbeat thread has written (every second with --heartbeat=1):
      # a trial killed before its first heartbeat is never found stale.
      time.sleep(1.5)
      os.kill(os.getpid(), signal.SIGKILL)
    record = {"step": 10, "test_accuracy": 1.0 - abs(config.optimizer.learning_rate - 1e-2)}
    for hook in hooks:
      hook(10, None, record)
    return None, [record]

  sweep.run_study(study, jdl.base_config(), space, args.workdir, args.num_trials, train=train,
                  log=None)


if __name__ == "__main__":
  main()
