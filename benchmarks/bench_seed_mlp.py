"""Benchmark: the seed MLP (784-128-10, Adam 1e-3, batch 32, 60,000 examples an epoch).

Contenders, each in its own process, run side by side in one invocation, `--repeats` times in
turn (medians reported; "jdl / this" compares the medians, "paired" is the median of each
repeat's own ratio, the two having run back to back):
  jdl               `jdl.fit` on an in-memory `jdl.data.ArraySource`: the device-resident engine,
                    one compiled call (one loop) per epoch, no evaluation, progress off
  jdl-nocheck       the same with `jdl.make_steps(check_finite=False)`: no NaN/inf watch
  plain             a hand-written flax+optax program: the arrays on the device, each epoch's
                    steps one jitted `lax.scan` over batches shuffled on the device before the
                    epoch's clock starts (`jax.random.permutation`, one gather): the steps alone
  plain-shuffling   the same, with the shuffle inside the epoch's jitted call (and its clock)
  plain-step        a per-step `jax.jit` loop written directly with flax and optax, batches
                    gathered on the host
  jdl-step          `jdl.fit` with its per-step engine, batches from memory
  jdl-stream        `jdl.fit` with its per-step engine, batches streamed through tf.data
  keras-jax         Keras 3 `model.fit` on its JAX backend
  keras-tf          Keras 3 `model.fit` on its TensorFlow backend
plus the input pipeline alone (tf.data streaming a Fashion-MNIST-sized array, batches/s) and the
matmul peak of this machine (a 2048x2048 float32 product under jit; 8192x8192 on an accelerator),
which sets the FLOP floor. The first epoch of every run is warm-up (compilation); the epochs
after it are timed.

The data are random Fashion-MNIST-shaped arrays (28x28x1 images scaled to [0, 1], labels 0-9):
the time of an epoch does not depend on the pixel values, and nothing is downloaded. Same model,
optimizer (Adam 1e-3, epsilon 1e-7 everywhere), loss and batch size for every contender.

  pip install -e ".[bench]"      # Keras 3
  python -m benchmarks.bench_seed_mlp --epochs=3 --repeats=3
  python -m benchmarks.bench_seed_mlp --only=jdl,plain --epochs=4 --repeats=3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the children import numpy where they need it
  import numpy as np

NUM_EXAMPLES = 60_000
BATCH = 32
HIDDEN = 128
# Multiply-adds of one forward pass: 784*128 + 128*10. Training costs about three forward passes
# (forward, gradient with respect to activations, gradient with respect to weights).
TRAIN_FLOPS_PER_EXAMPLE = 3 * 2 * (784 * HIDDEN + HIDDEN * 10)


def make_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Random Fashion-MNIST-shaped training arrays: float32 [60000, 28, 28, 1] in [0, 1], int32
  labels 0-9."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(NUM_EXAMPLES, 28, 28, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, size=NUM_EXAMPLES).astype(np.int32)
  return images.astype(np.float32) / 255.0, labels


def run_jdl(epochs: int, engine: str = "resident", check_finite: bool = True) -> dict:
  """`jdl.fit` with its resident engine, or its per-step engine fed from memory ("step") or
  streamed through tf.data ("stream"): if "step" and "stream" train at one rate, the step never
  waits for its input. The epoch's time is that between two evaluation hooks (no eval split, so
  an "evaluation" is the train record alone): everything `fit` does in an epoch."""
  import jax  # pylint: disable=import-outside-toplevel

  import jdl  # pylint: disable=import-outside-toplevel

  x, y = make_data()
  if engine == "stream":
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    train = jdl.data.TFDataSource(tf.data.Dataset.from_tensor_slices((x, y)), NUM_EXAMPLES, BATCH,
                                  shuffle=True, seed=0)
  else:
    train = jdl.data.ArraySource(x, y, BATCH, shuffle=True, seed=0)
  state = jdl.create_train_state(jdl.models.MLP(hidden=(HIDDEN,), num_classes=10),
                                 jdl.make_optimizer({"name": "adam", "learning_rate": 1e-3}),
                                 x[:1], jax.random.PRNGKey(0))
  train_step, eval_step = jdl.make_steps(check_finite=check_finite)
  times, cpu_times = [], []
  start, cpu_start = time.perf_counter(), time.process_time()

  def hook(step: int, state: Any, record: dict[str, float]) -> None:
    del step, state, record
    times.append(time.perf_counter())
    cpu_times.append(time.process_time())

  _, history = jdl.fit(state, train_step, eval_step, train, None, num_epochs=epochs, hooks=[hook],
                       progress=False, device_resident=engine == "resident",
                       runner=jdl.parallel.JitRunner())
  epoch_times = [b - a for a, b in zip([start] + times[:-1], times)]
  epoch_cpu = [b - a for a, b in zip([cpu_start] + cpu_times[:-1], cpu_times)]
  return {"epoch_seconds": epoch_times, "epoch_cpu_seconds": epoch_cpu,
          "final_loss": history[-1]["train_loss"], "device": jax.devices()[0].device_kind}


def _plain_model_and_optimizer() -> tuple[Any, Any]:
  """The seed MLP written directly in flax, and optax's Adam: the plain contenders' pieces."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  class SeedMlp(nn.Module):
    """Flatten -> Dense(128, relu) -> Dense(10) logits."""

    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(HIDDEN)(x.reshape(x.shape[0], -1)))
      return nn.Dense(10)(x)

  return SeedMlp(), optax.adam(1e-3, eps=1e-7)


def run_plain(epochs: int, preshuffled: bool = True) -> dict:
  """The hand-written reference for jdl's resident engine: the arrays on the device, each epoch
  one jitted call whose steps are one `lax.scan` over shuffled batches. With `preshuffled`, the
  epoch's shuffled batches are made on the device before its clock starts, so only the scan is
  timed; without, the shuffle is part of the epoch's call."""
  import functools  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  model, tx = _plain_model_and_optimizer()
  x, y = make_data()
  steps = NUM_EXAMPLES // BATCH  # 60,000 = 1,875 x 32: no partial batch to pad
  x_device, y_device = jax.device_put(x), jax.device_put(y)
  params = model.init(jax.random.PRNGKey(0), x[:1])
  opt_state = tx.init(params)

  def train_step(carry, batch):
    params, opt_state = carry
    images, labels = batch

    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, images), labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  def shuffled_batches(key, images, labels):
    order = jax.random.permutation(key, NUM_EXAMPLES)
    return (images[order].reshape(steps, BATCH, *images.shape[1:]),
            labels[order].reshape(steps, BATCH))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def scan_epoch(params, opt_state, batches):
    (params, opt_state), losses = jax.lax.scan(train_step, (params, opt_state), batches)
    return params, opt_state, losses.mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def shuffle_and_scan_epoch(params, opt_state, key, images, labels):
    return scan_epoch(params, opt_state, shuffled_batches(key, images, labels))

  shuffle = jax.jit(shuffled_batches)
  epoch_times, epoch_cpu, loss = [], [], None
  for epoch in range(epochs):
    key = jax.random.fold_in(jax.random.PRNGKey(0), epoch)
    if preshuffled:
      batches = jax.block_until_ready(shuffle(key, x_device, y_device))
      start, cpu_start = time.perf_counter(), time.process_time()
      params, opt_state, loss = scan_epoch(params, opt_state, batches)
    else:
      start, cpu_start = time.perf_counter(), time.process_time()
      params, opt_state, loss = shuffle_and_scan_epoch(params, opt_state, key, x_device, y_device)
    loss = float(loss)  # waits for the epoch
    epoch_times.append(time.perf_counter() - start)
    epoch_cpu.append(time.process_time() - cpu_start)
  return {"epoch_seconds": epoch_times, "epoch_cpu_seconds": epoch_cpu, "final_loss": loss}


def run_plain_step(epochs: int) -> dict:
  """A per-step `jax.jit` loop, batches gathered on the host: the loop most tutorials write."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  model, tx = _plain_model_and_optimizer()
  x, y = make_data()
  params = model.init(jax.random.PRNGKey(0), x[:1])
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    def loss_fn(p):
      logits = model.apply(p, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(0)
  epoch_times, loss = [], None
  for _ in range(epochs):
    start = time.perf_counter()
    order = rng.permutation(NUM_EXAMPLES)
    for i in range(0, NUM_EXAMPLES, BATCH):
      idx = order[i:i + BATCH]
      params, opt_state, loss = step(params, opt_state, x[idx], y[idx])
    loss = float(loss)
    epoch_times.append(time.perf_counter() - start)
  return {"epoch_seconds": epoch_times, "final_loss": loss}


def run_keras(epochs: int) -> dict:
  import keras  # pylint: disable=import-outside-toplevel

  x, y = make_data()
  model = keras.Sequential([
      keras.Input((28, 28, 1)),
      keras.layers.Flatten(),
      keras.layers.Dense(HIDDEN, activation="relu"),
      keras.layers.Dense(10),
  ])
  model.compile(optimizer=keras.optimizers.Adam(1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  times = []

  class Timer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
      self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
      times.append(time.perf_counter() - self.start)

  history = model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, callbacks=[Timer()])
  return {"epoch_seconds": times, "final_loss": float(history.history["loss"][-1])}


def run_pipeline(epochs: int) -> dict:
  import jdl  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  x, y = make_data()
  source = jdl.data.TFDataSource(tf.data.Dataset.from_tensor_slices((x, y)), NUM_EXAMPLES, BATCH,
                                 shuffle=True, seed=0)
  times = []
  for epoch in range(epochs):
    start = time.perf_counter()
    count = sum(1 for _ in source.epoch(epoch))
    times.append(time.perf_counter() - start)
  return {"epoch_seconds": times, "batches": count}


def run_peak(repeats: int) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  # Large enough to keep the device busy well past the dispatch of one product: 2048 on a CPU,
  # 8192 on an accelerator. Random values: some hardware multiplies constants faster.
  n = 2048 if jax.default_backend() == "cpu" else 8192
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  matmul = jax.jit(lambda m: m @ m)
  matmul(a).block_until_ready()
  best = 0.0
  for _ in range(max(repeats, 3)):  # the best of a few: the peak, not the noise
    start = time.perf_counter()
    for _ in range(10):
      out = matmul(a)
    out.block_until_ready()
    best = max(best, 10 * 2 * n**3 / (time.perf_counter() - start) / 1e9)
  return {"gflops": best, "size": n, "device": jax.devices()[0].device_kind}


CONTENDERS = {
    "jdl": (run_jdl, {}),
    "plain": (run_plain, {}),
    "plain-shuffling": (lambda epochs: run_plain(epochs, preshuffled=False), {}),
    "jdl-nocheck": (lambda epochs: run_jdl(epochs, check_finite=False), {}),
    "plain-step": (run_plain_step, {}),
    "jdl-step": (lambda epochs: run_jdl(epochs, engine="step"), {}),
    "jdl-stream": (lambda epochs: run_jdl(epochs, engine="stream"), {}),
    "keras-jax": (run_keras, {"KERAS_BACKEND": "jax"}),
    "keras-tf": (run_keras, {"KERAS_BACKEND": "tensorflow"}),
    "pipeline": (run_pipeline, {}),
    "peak": (run_peak, {}),
}


def _child(name: str, epochs: int) -> None:
  function, _ = CONTENDERS[name]
  print("RESULT " + json.dumps(function(epochs)), flush=True)


def _spawn(name: str, epochs: int) -> dict | None:
  """Runs contender `name` in a fresh process (its own JAX, its own compilation caches)."""
  env = {**os.environ, **CONTENDERS[name][1], "TF_CPP_MIN_LOG_LEVEL": "2"}
  done = subprocess.run([sys.executable, "-m", "benchmarks.bench_seed_mlp", f"--child={name}",
                         f"--epochs={epochs}"], env=env, capture_output=True, text=True,
                        check=False)
  for line in done.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  print(f"{name} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
  return None


def steady_seconds(run: dict) -> float:
  """A run's time of an epoch after warm-up: the median of its epochs after the first."""
  return statistics.median(run["epoch_seconds"][1:])


def paired_ratio(first: list[dict], second: list[dict]) -> float | None:
  """The median over repeats of `first`'s epoch time over `second`'s in the same repeat (the two
  ran back to back, so a load that drifts between repeats cancels), or None where no repeat has
  both."""
  seconds = {run["repeat"]: steady_seconds(run) for run in second}
  ratios = [steady_seconds(run) / seconds[run["repeat"]] for run in first
            if run["repeat"] in seconds]
  return statistics.median(ratios) if ratios else None


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is warm-up")
  parser.add_argument("--repeats", type=int, default=3, help="runs of each contender, in turn")
  parser.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated contenders")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    _child(args.child, args.epochs)
    return
  if args.epochs < 2:
    parser.error("--epochs must be >= 2: the first epoch is warm-up (compilation)")
  names = args.only.split(",")
  unknown = sorted(set(names) - set(CONTENDERS))
  if unknown:
    parser.error(f"unknown contenders {unknown}; expected some of {sorted(CONTENDERS)}")
  runs: dict[str, list[dict]] = {name: [] for name in names}
  for repeat in range(args.repeats):
    for name in names:
      result = _spawn(name, args.epochs)
      if result is not None:
        runs[name].append({**result, "repeat": repeat})
      print(f"repeat {repeat + 1}/{args.repeats} {name}: {result}", file=sys.stderr, flush=True)

  peak = statistics.median(r["gflops"] for r in runs.get("peak", [])) if runs.get("peak") else None
  size = runs["peak"][0]["size"] if peak else None
  floor = NUM_EXAMPLES * TRAIN_FLOPS_PER_EXAMPLE / (peak * 1e9) if peak else None
  rows = {}
  for name in names:
    if name == "peak" or not runs[name]:
      continue
    steady = statistics.median(s for r in runs[name] for s in r["epoch_seconds"][1:])
    first = statistics.median(r["epoch_seconds"][0] for r in runs[name])
    cpu = [s for r in runs[name] for s in r.get("epoch_cpu_seconds", [])[1:]]
    rows[name] = (steady, max(first - steady, 0.0), statistics.median(cpu) if cpu else None)
  device = next((r["device"] for rs in runs.values() for r in rs if "device" in r), "?")
  print(f"\nseed MLP 784-128-10, Adam 1e-3, batch {BATCH}, {NUM_EXAMPLES} examples an epoch; "
        f"medians of {args.repeats} runs x {args.epochs - 1} timed epochs; JAX device {device}; "
        f"{os.cpu_count()} CPU cores")
  if peak:
    print(f"matmul peak {peak:.1f} GFLOP/s ({size}^2 float32); FLOP floor {floor:.3f} s/epoch "
          f"({TRAIN_FLOPS_PER_EXAMPLE * NUM_EXAMPLES / 1e9:.2f} GFLOP an epoch)")
  print(f"{'contender':<17} {'s/epoch':>8} {'examples/s':>11} {'compile s':>9} {'GFLOP/s':>8} "
        f"{'x floor':>8} {'jdl / this':>10} {'paired':>7} {'cpu s':>6} {'jdl/this':>8}")
  for name, (steady, compile_s, cpu) in rows.items():
    if name == "pipeline":
      continue
    gflops = NUM_EXAMPLES * TRAIN_FLOPS_PER_EXAMPLE / steady / 1e9
    versus = f"{rows['jdl'][0] / steady:.3f}" if "jdl" in rows else "-"
    paired = paired_ratio(runs.get("jdl", []), runs[name])
    paired_text = "-" if paired is None else f"{paired:.3f}"
    cpu_text = "-" if cpu is None else f"{cpu:.3f}"
    jdl_cpu = rows["jdl"][2] if "jdl" in rows else None
    cpu_versus = f"{jdl_cpu / cpu:.3f}" if cpu and jdl_cpu else "-"
    print(f"{name:<17} {steady:8.3f} {NUM_EXAMPLES / steady:11,.0f} {compile_s:9.2f} "
          f"{gflops:8.1f} {steady / floor if floor else float('nan'):8.2f} {versus:>10} "
          f"{paired_text:>7} {cpu_text:>6} {cpu_versus:>8}")
  print("compile s: the first epoch's time less a timed epoch's; jdl / this: the ratio of the "
        "medians; paired: the median of each repeat's own ratio; cpu s: the median CPU seconds "
        "of a timed epoch (all the process's threads; steadier than wall time on a loaded "
        "machine)")
  if "pipeline" in rows:
    batches_per_s = (NUM_EXAMPLES / BATCH) / rows["pipeline"][0]
    print(f"\ninput pipeline (tf.data, shuffle + batch {BATCH} + prefetch): {batches_per_s:,.0f} "
          f"batches/s")
    for name in ("jdl-step", "jdl-stream"):
      if name in rows:
        steps_per_s = (NUM_EXAMPLES / BATCH) / rows[name][0]
        print(f"  {name} trains {steps_per_s:,.0f} steps/s ({batches_per_s / steps_per_s:.1f}x "
              "below the pipeline's rate)")


if __name__ == "__main__":
  main()
