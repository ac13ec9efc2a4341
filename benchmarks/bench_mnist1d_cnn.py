"""Benchmark: the MNIST-1D paper's CNN, 6000 steps of Adam 1e-2 at batch 100, compilation included.

Contenders, each in its own process, `--repeats` times in turn (medians reported, and the
median of each repeat's jdl / contender ratio). Repeat r uses seed r for all (initialisation key
and data order), so the accuracy column is a median over seeds, not one seed's luck (seeds move
MNIST-1D's test accuracy by a few points):
  jdl            `jdl.fit` on the `experiments.mnist1d` model, optimizer and CPU thread count
                 (`cpu_threads`: one; see `jdl.experiment.set_cpu_threads`), one device
  plain          a per-step `jax.jit` loop written directly with flax (`nn.Conv`) and optax
  plain_1thread  the same loop on one CPU thread too, so that the thread count is not the gain
                 (a CPU contender: on a GPU host leave it out with `--only=jdl,plain`)
All read MNIST-1D through jdl's offline TFDS builder first; the clock starts once the arrays are
in memory and includes building the model, compiling, 6000 steps and the test evaluation. On a
machine without TensorFlow (an accelerator host), read the same arrays from a file written
elsewhere with `--save_arrays` (jdl itself trains without TensorFlow; see `jdl.lazy_import`).

  python -m benchmarks.bench_mnist1d_cnn --repeats=3
  python -m benchmarks.bench_mnist1d_cnn --save_arrays=mnist1d.npz        # where TFDS is
  python -m benchmarks.bench_mnist1d_cnn --arrays=mnist1d.npz --only=jdl,plain
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the children import numpy where they need it
  import numpy as np

STEPS, BATCH, LEARNING_RATE = 6000, 100, 1e-2


ARRAYS_PATH = os.environ.get("JDL_BENCH_MNIST1D_ARRAYS", "")  # set from --arrays for the children


def load_mnist1d() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """((x, y), (x_test, y_test)): from jdl's TFDS builder, or the `--arrays` file."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  if ARRAYS_PATH:
    with np.load(ARRAYS_PATH) as arrays:
      return (arrays["x"], arrays["y"]), (arrays["x_test"], arrays["y_test"])
  import jdl  # pylint: disable=import-outside-toplevel

  builder = jdl.data.get_builder("mnist1d")
  jdl.data.prepare(builder)
  return jdl.data.load_split_arrays(builder, "train"), jdl.data.load_split_arrays(builder, "test")


def run_jdl(seed: int) -> dict:
  """`jdl.fit` as `experiments.mnist1d` runs it (its model, optimizer and thread count), timed
  from the arrays in memory to the test accuracy."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  import jdl  # pylint: disable=import-outside-toplevel
  from experiments import mnist1d  # pylint: disable=import-outside-toplevel

  config = mnist1d.get_config()
  jdl.experiment.set_cpu_threads(config.cpu_threads)  # before JAX starts, as the experiment does
  (x, y), (x_test, y_test) = load_mnist1d()
  start = time.perf_counter()  # data loaded, as for the plain loop; compilation included
  train = jdl.data.ArraySource(x, y, BATCH, shuffle=True, seed=seed)
  test = jdl.data.ArraySource(x_test, y_test, 1000, shuffle=False)
  model = jdl.models.build_model(config.model, num_classes=10)
  state = jdl.create_train_state(model, jdl.make_optimizer(config.optimizer),
                                 np.zeros((1, 40), np.float32), jax.random.PRNGKey(seed))
  train_step, eval_step = jdl.make_steps()
  _, history = jdl.fit(state, train_step, eval_step, train, test, num_steps=STEPS,
                       eval_every_steps=STEPS, progress=False, runner=jdl.parallel.JitRunner())
  return {"seconds": time.perf_counter() - start, "accuracy": history[-1]["test_accuracy"],
          "device": jax.devices()[0].device_kind}


def run_plain(seed: int) -> dict:
  """The same training written directly with flax and optax, one jitted call per step."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  (x, y), (x_test, y_test) = load_mnist1d()

  class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = x[..., None]
      for size in (5, 3, 3):
        x = nn.relu(nn.Conv(25, (size,), strides=(2,), padding=[(1, 1)])(x))
      return nn.Dense(10)(x.reshape(x.shape[0], -1))

  start = time.perf_counter()
  model = ConvNet()
  params = model.init(jax.random.PRNGKey(seed), x[:1])
  tx = optax.adam(LEARNING_RATE)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xb), yb).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  order = np.array([], np.int64)
  for _ in range(STEPS):
    if len(order) < BATCH:
      order = rng.permutation(len(x))
    idx, order = order[:BATCH], order[BATCH:]
    params, opt_state = step(params, opt_state, x[idx], y[idx])
  logits = jax.jit(model.apply)(params, x_test)
  accuracy = float((np.asarray(logits).argmax(1) == y_test).mean())
  return {"seconds": time.perf_counter() - start, "accuracy": accuracy}


def run_plain_1thread(seed: int) -> dict:
  """The plain loop on one XLA CPU thread: XLA sizes its CPU thread pool from `PJRT_NPROC` when
  JAX starts, which is after this (the child has computed nothing yet)."""
  os.environ.setdefault("PJRT_NPROC", "1")
  return run_plain(seed)


CONTENDERS = {"jdl": run_jdl, "plain": run_plain, "plain_1thread": run_plain_1thread}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated contenders")
  parser.add_argument("--arrays", default="",
                      help="read MNIST-1D from this .npz (x, y, x_test, y_test) instead of TFDS")
  parser.add_argument("--save_arrays", default="",
                      help="write MNIST-1D, as read through TFDS, to this .npz and stop")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print("RESULT " + json.dumps(CONTENDERS[args.child](args.seed)), flush=True)
    return
  if args.save_arrays:
    import numpy as np  # pylint: disable=import-outside-toplevel

    (x, y), (x_test, y_test) = load_mnist1d()
    np.savez(args.save_arrays, x=x, y=y, x_test=x_test, y_test=y_test)
    print(f"wrote {args.save_arrays}: train {x.shape}, test {x_test.shape}")
    return
  names = args.only.split(",")
  unknown = sorted(set(names) - set(CONTENDERS))
  if unknown:
    parser.error(f"unknown contenders {unknown}; expected some of {sorted(CONTENDERS)}")
  if args.arrays and not os.path.isfile(args.arrays):
    parser.error(f"--arrays {args.arrays!r} is not a file (write one with --save_arrays)")
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
         "JDL_BENCH_MNIST1D_ARRAYS": os.path.abspath(args.arrays) if args.arrays else ""}
  runs: dict[str, list[dict]] = {name: [] for name in names}
  for repeat in range(args.repeats):
    for name in names:
      done = subprocess.run([sys.executable, "-m", "benchmarks.bench_mnist1d_cnn",
                             f"--child={name}", f"--seed={repeat}"], capture_output=True,
                            text=True, check=False, env=env)
      results = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
      if not results:
        print(f"{name} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        continue
      runs[name].append({**json.loads(results[-1][len("RESULT "):]), "repeat": repeat})
      print(f"repeat {repeat + 1}/{args.repeats} {name}: {runs[name][-1]}", file=sys.stderr,
            flush=True)
  device = next((r["device"] for rs in runs.values() for r in rs if "device" in r), "?")
  print(f"\nMNIST-1D CNN, {STEPS} steps, batch {BATCH}, Adam {LEARNING_RATE}, compilation "
        f"included; medians of {args.repeats} runs (seeds 0..{args.repeats - 1}); JAX device "
        f"{device}")
  print(f"{'contender':<14} {'seconds':>8} {'test acc':>9} {'min acc':>8} {'jdl / this':>10} "
        f"{'paired':>7}")
  medians = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items() if rs}
  for name, rs in runs.items():
    if rs:
      accuracy = statistics.median(r["accuracy"] for r in rs)
      lowest = min(r["accuracy"] for r in rs)
      versus = f"{medians['jdl'] / medians[name]:.3f}" if "jdl" in medians else "-"
      paired = paired_ratio(runs.get("jdl", []), rs)
      paired_text = "-" if paired is None else f"{paired:.3f}"
      print(f"{name:<14} {medians[name]:8.2f} {accuracy:9.4f} {lowest:8.4f} {versus:>10} "
            f"{paired_text:>7}")
  print("jdl / this: the ratio of the medians; paired: the median of each repeat's own ratio (the "
        "two ran back to back, so a load that drifts between repeats cancels)")


def paired_ratio(first: list[dict], second: list[dict]) -> float | None:
  """The median over repeats of `first`'s seconds over `second`'s in the same repeat (both
  ran back to back), or None where no repeat has both."""
  seconds = {run["repeat"]: run["seconds"] for run in second}
  ratios = [run["seconds"] / seconds[run["repeat"]] for run in first if run["repeat"] in seconds]
  return statistics.median(ratios) if ratios else None


if __name__ == "__main__":
  main()
