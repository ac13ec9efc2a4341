"""What each part of jdl's device-resident epoch costs: the seed MLP's epoch, piece by piece.

Starts from the program `jdl.fit` runs for one epoch of the seed MLP (784-128-10, Adam 1e-3, batch
32, 60,000 random Fashion-MNIST-shaped examples): `jdl.resident.make_train_chunk` jitted with
`donate_argnums=(0, 3)`, as `jdl.resident.ResidentEngine` builds it, called once per epoch. Each
variant below takes one thing away (or, for the plain ones, is written without jdl), all compiled
up front and then timed in one process, one epoch each in turn, `--repeats` rounds (medians):

  fit             `jdl.fit` itself (no evaluation, progress off), timed between its epoch hooks;
                  the other variants run inside its hook, so it alternates with them too
  jdl             the epoch program, its epoch's order drawn inside the call (as in `fit`)
  jdl-order-given the same, called with the epoch's order already drawn (the carried order)
  jdl-nocheck     `make_steps(check_finite=False)`: no NaN/inf watch over the loss
  jdl-gradnorms   `gradient_norms=True` as well: gradient and parameter norms, and the watch over
                  every gradient (one more pass over gradients and parameters each step)
  jdl-nomask      the batches without their `mask` (none is padding: 60,000 = 1,875 x 32)
  jdl-loss-only   a task without metrics: `count` and `loss_sum` only (no accuracy)
  jdl-optax-adam  the state's optimizer `optax.adam(1e-3, eps=1e-7)` itself, not
                  `jdl.make_optimizer`'s (`inject_hyperparams` around it)
  jdl-bare        all four taken away together
  plain-gather    a hand-written flax+optax `lax.scan` whose step gathers its 32 rows from the
                  device-resident arrays by a precomputed order
  plain           the hand-written `lax.scan` over batches shuffled before the clock starts
  plain-again     the same, compiled again: how far two executables of one program differ
plus the epoch's order alone (`jdl.data.sources.epoch_order`, 60,000 examples) and the plain
program's shuffle alone (`jax.random.permutation` and one gather of the whole split).

  python -m benchmarks.breakdown_seed_mlp --repeats=15
  python -m benchmarks.breakdown_seed_mlp --repeats=30 --only=jdl,jdl-nocheck,plain
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jdl
from benchmarks import bench_seed_mlp
from jdl import resident
from jdl.data.sources import epoch_order

NUM_EXAMPLES, BATCH, HIDDEN = (bench_seed_mlp.NUM_EXAMPLES, bench_seed_mlp.BATCH,
                               bench_seed_mlp.HIDDEN)
STEPS = NUM_EXAMPLES // BATCH
SEED = 0

Seconds = tuple[float, float]  # (wall-clock, CPU time of this process: all its threads)
Timer = Callable[[int], Seconds]  # epoch index -> seconds of that epoch, work finished


class Clock:
  """Wall-clock and process CPU time from `start()` to `stop()`. On a shared, loaded machine the
  CPU time this process used varies less than the wall time, which waits for other processes."""

  def start(self) -> None:
    self.wall, self.cpu = time.perf_counter(), time.process_time()

  def stop(self) -> Seconds:
    return time.perf_counter() - self.wall, time.process_time() - self.cpu


def without_mask(train_step: Callable[..., Any]) -> Callable[..., Any]:
  """`train_step` on batches stripped of their `mask` (every example real)."""
  return lambda state, batch: train_step(state, {k: v for k, v in batch.items() if k != "mask"})


def jdl_program(x: np.ndarray, y: np.ndarray, *, check_finite: bool = True, mask: bool = True,
                full_metrics: bool = True, jdl_optimizer: bool = True,
                order_given: bool = False, gradient_norms: bool = False) -> Timer:
  """A timer of one epoch of jdl's resident train program, with the parts named by the flags."""
  model = jdl.models.MLP(hidden=(HIDDEN,), num_classes=10)
  tx = (jdl.make_optimizer({"name": "adam", "learning_rate": 1e-3}) if jdl_optimizer
        else optax.adam(1e-3, eps=1e-7))
  state = jdl.create_train_state(model, tx, x[:1], jax.random.PRNGKey(0))
  task = jdl.tasks.classification()
  if not full_metrics:
    task = jdl.Task(loss=task.loss)
  train_step = jdl.make_train_step(task, check_finite=check_finite, gradient_norms=gradient_norms)
  if not mask:
    train_step = without_mask(train_step)
  data = resident.ResidentData(*jax.device_put(resident.with_padding_row(x, y)), batch_size=BATCH,
                               shuffle=True, seed=SEED)
  chunk = jax.jit(resident.make_train_chunk(train_step, data), donate_argnums=(0, 3))
  carry = {"state": state, "order": jax.device_put(data.initial_order())}

  clock = Clock()

  def run(epoch: int) -> Seconds:
    if order_given:  # the carried order is already this epoch's: the call draws none
      carry["order"] = jax.block_until_ready(
          resident.EpochOrder(jnp.int32(epoch), data.padded_order(epoch)))
    clock.start()
    state, sums, carry["order"] = chunk(carry["state"], data.inputs, data.labels, carry["order"],
                                        np.int32(epoch * STEPS), np.int32(STEPS))
    jax.block_until_ready(sums)
    carry["state"] = state
    return clock.stop()

  return run


def plain_program(x: np.ndarray, y: np.ndarray, *, gather: bool) -> Timer:
  """A timer of one epoch of the hand-written flax+optax scan: over batches shuffled before the
  clock starts, or (`gather`) gathering each step's rows from the resident arrays by an order
  drawn before the clock starts."""
  model, tx = bench_seed_mlp._plain_model_and_optimizer()  # pylint: disable=protected-access
  params = model.init(jax.random.PRNGKey(0), x[:1])
  carry = {"params": params, "opt_state": tx.init(params)}
  images, labels = jax.device_put(x), jax.device_put(y)

  def train_step(state, batch):
    params, opt_state = state
    batch_images, batch_labels = batch

    def loss_fn(p):
      logits = model.apply(p, batch_images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def scan_batches(params, opt_state, batch_images, batch_labels):
    (params, opt_state), losses = jax.lax.scan(train_step, (params, opt_state),
                                               (batch_images, batch_labels))
    return params, opt_state, losses.mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def scan_gathering(params, opt_state, order, images, labels):
    def body(state, indices):
      return train_step(state, (images[indices], labels[indices]))

    (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), order)
    return params, opt_state, losses.mean()

  @jax.jit
  def shuffled(key, images, labels):
    order = jax.random.permutation(key, NUM_EXAMPLES)
    return (images[order].reshape(STEPS, BATCH, *images.shape[1:]),
            labels[order].reshape(STEPS, BATCH))

  clock = Clock()

  def run(epoch: int) -> Seconds:
    key = jax.random.fold_in(jax.random.PRNGKey(SEED), epoch)
    if gather:
      order = jax.block_until_ready(jax.random.permutation(key, NUM_EXAMPLES).reshape(STEPS, BATCH))
      clock.start()
      params, opt_state, loss = scan_gathering(carry["params"], carry["opt_state"], order, images,
                                               labels)
    else:
      batches = jax.block_until_ready(shuffled(key, images, labels))
      clock.start()
      params, opt_state, loss = scan_batches(carry["params"], carry["opt_state"], *batches)
    jax.block_until_ready(loss)
    carry.update(params=params, opt_state=opt_state)
    return clock.stop()

  return run


def order_alone() -> Timer:
  """A timer of drawing one epoch's order on the device, as the resident engine does."""
  clock = Clock()

  def run(epoch: int) -> Seconds:
    clock.start()
    jax.block_until_ready(epoch_order(np.uint32(SEED), np.uint32(epoch),
                                      num_examples=NUM_EXAMPLES, shuffle=True))
    return clock.stop()

  return run


def plain_shuffle_alone(x: np.ndarray, y: np.ndarray) -> Timer:
  """A timer of the plain program's shuffle: a permutation and one gather of the whole split."""
  images, labels = jax.device_put(x), jax.device_put(y)

  @jax.jit
  def shuffled(key, images, labels):
    order = jax.random.permutation(key, NUM_EXAMPLES)
    return images[order], labels[order]

  clock = Clock()

  def run(epoch: int) -> Seconds:
    key = jax.random.fold_in(jax.random.PRNGKey(SEED), epoch)
    clock.start()
    jax.block_until_ready(shuffled(key, images, labels))
    return clock.stop()

  return run


VARIANTS: dict[str, Callable[[np.ndarray, np.ndarray], Timer]] = {
    "jdl": jdl_program,
    "jdl-order-given": functools.partial(jdl_program, order_given=True),
    "jdl-nocheck": functools.partial(jdl_program, check_finite=False),
    "jdl-gradnorms": functools.partial(jdl_program, gradient_norms=True),
    "jdl-nomask": functools.partial(jdl_program, mask=False),
    "jdl-loss-only": functools.partial(jdl_program, full_metrics=False),
    "jdl-optax-adam": functools.partial(jdl_program, jdl_optimizer=False),
    "jdl-bare": functools.partial(jdl_program, check_finite=False, mask=False,
                                  full_metrics=False, jdl_optimizer=False),
    "plain-gather": functools.partial(plain_program, gather=True),
    "plain": functools.partial(plain_program, gather=False),
    "plain-again": functools.partial(plain_program, gather=False),
    "order alone": lambda x, y: order_alone(),
    "plain shuffle alone": plain_shuffle_alone,
}
"""Timer factories of every variant but `fit`, which `main` runs itself."""


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5, help="timed epochs of each variant")
  parser.add_argument("--only", default=",".join(["fit", *VARIANTS]),
                      help="comma-separated variants (jdl and plain are always in)")
  args = parser.parse_args()
  names = args.only.split(",")
  unknown = sorted(set(names) - {"fit", *VARIANTS})
  if unknown:
    parser.error(f"unknown variants {unknown}; expected some of {['fit', *VARIANTS]}")
  x, y = bench_seed_mlp.make_data()
  variants = {name: make(x, y) for name, make in VARIANTS.items()
              if name in names or name in ("jdl", "plain")}
  seconds: dict[str, list[Seconds]] = {**({"fit": []} if "fit" in names else {}),
                                       **{name: [] for name in variants}}
  for name, run in variants.items():  # warm-up: compilation, first touches of memory
    run(0)
    print(f"compiled {name}", flush=True)

  def one_round(epoch: int) -> None:
    for name, run in variants.items():
      seconds[name].append(run(epoch))
    print(f"round {epoch - 1}/{args.repeats} done", flush=True)

  if "fit" not in names:
    for epoch in range(2, args.repeats + 2):
      one_round(epoch)
  else:  # the rounds run inside fit's epoch hook, so fit's epochs alternate with them
    marks: list[tuple[Seconds, Seconds]] = []  # (hook entered, hook left) per fit epoch

    def now() -> Seconds:
      return time.perf_counter(), time.process_time()

    def hook(step: int, state: Any, record: Any) -> None:
      del state, record
      entered = now()
      if step // STEPS >= 2:  # fit's first epoch compiles; each later one has a round
        one_round(step // STEPS)
      marks.append((entered, now()))

    state = jdl.create_train_state(jdl.models.MLP(hidden=(HIDDEN,), num_classes=10),
                                   jdl.make_optimizer({"name": "adam", "learning_rate": 1e-3}),
                                   x[:1], jax.random.PRNGKey(0))
    train_step, eval_step = jdl.make_steps()
    jdl.fit(state, train_step, eval_step,
            jdl.data.ArraySource(x, y, BATCH, shuffle=True, seed=SEED), None,
            num_epochs=args.repeats + 2, hooks=[hook], progress=False,
            runner=jdl.parallel.JitRunner())
    # fit's epoch e (e >= 2) ran between the hook of epoch e-1 leaving and that of e entering.
    seconds["fit"] = [(marks[i][0][0] - marks[i - 1][1][0], marks[i][0][1] - marks[i - 1][1][1])
                      for i in range(1, len(marks))]
  seconds = {name: values[:args.repeats] for name, values in seconds.items()}

  device = jax.devices()[0]
  fastest = {name: min(w for w, _ in values) for name, values in seconds.items()}

  def paired(name: str, which: int) -> float:
    """The median over rounds of this variant's time over plain's in the same round."""
    return statistics.median(mine[which] / base[which]
                             for mine, base in zip(seconds[name], seconds["plain"]))

  print(f"\nseed MLP epoch ({STEPS} steps of batch {BATCH}), {args.repeats} epochs of each, "
        f"variants in turn in one process; {device.platform} ({device.device_kind}), "
        f"{os.cpu_count()} CPU cores")
  print("wall: median elapsed seconds; paired: the median over rounds of the variant's time over "
        "plain's in that round; min: the fastest epoch (the least disturbed by other processes); "
        "cpu: median CPU seconds of this process, all its threads")
  print(f"{'variant':<20} {'wall s':>7} {'paired':>6} {'min s':>6} {'/plain':>6} {'cpu s':>6} "
        f"{'paired':>6}  wall of each epoch (s)")
  for name, values in seconds.items():
    print(f"{name:<20} {statistics.median(w for w, _ in values):7.3f} {paired(name, 0):6.3f} "
          f"{fastest[name]:6.3f} {fastest[name] / fastest['plain']:6.3f} "
          f"{statistics.median(c for _, c in values):6.3f} {paired(name, 1):6.3f}  "
          + " ".join(f"{w:.3f}" for w, _ in values))


if __name__ == "__main__":
  main()
