"""What each part of jdl's device-resident epoch costs: the seed MLP's epoch program, piece by piece.

Starts from the program `jdl.fit` runs for one epoch of the seed MLP (784-128-10, Adam 1e-3, batch
32, 60,000 random Fashion-MNIST-shaped examples): `jdl.resident.make_train_chunk` jitted with
`donate_argnums=(0, 3)`, as `jdl.resident.ResidentEngine` builds it, called once per epoch. Each
variant below takes one thing away (or, for the plain ones, is written without jdl), all compiled
up front and then timed in one process, one epoch each in turn, `--repeats` rounds (medians):

  fit             `jdl.fit` itself (no evaluation, progress off), timed between its epoch hooks;
                  the other variants run inside its hook, so it alternates with them too
  jdl             the epoch program, its epoch's order drawn inside the call (as in `fit`)
  jdl-order-given the same, called with the epoch's order already drawn (the carried order)
  jdl-nocheck     `make_steps(check_finite=False)`: no NaN/inf watch over the gradients
  jdl-nomask      the batches without their `mask` (none is padding: 60,000 = 1,875 x 32)
  jdl-loss-only   the metric sums cut to `loss_sum` (no `count`, no `correct`)
  jdl-optax-adam  the state's optimizer `optax.adam(1e-3, eps=1e-7)` itself, not
                  `jdl.make_optimizer`'s (`inject_hyperparams` around it)
  jdl-bare        all four taken away together
  plain-gather    a hand-written flax+optax `lax.scan` whose step gathers its 32 rows from the
                  device-resident arrays by a precomputed order
  plain           the hand-written `lax.scan` over batches shuffled before the clock starts
plus the epoch's order alone (`jdl.data.sources.epoch_order`, 60,000 examples) and the plain
program's shuffle alone (`jax.random.permutation` and one gather of the whole split).

  python -m benchmarks.breakdown_seed_mlp --repeats=5
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

NUM_EXAMPLES, BATCH, HIDDEN = bench_seed_mlp.NUM_EXAMPLES, bench_seed_mlp.BATCH, bench_seed_mlp.HIDDEN
STEPS = NUM_EXAMPLES // BATCH
SEED = 0

Timer = Callable[[int], float]  # epoch index -> seconds of that epoch, work finished


def without_mask(train_step: Callable[..., Any]) -> Callable[..., Any]:
  """`train_step` on batches stripped of their `mask` (every example real)."""
  return lambda state, batch: train_step(state, {k: v for k, v in batch.items() if k != "mask"})


def loss_sum_only(outputs: jax.Array, labels: jax.Array, losses: jax.Array,
                  mask: jax.Array | None) -> dict[str, jax.Array]:
  """A metrics function with one sum: what a step must report for its loss to be seen at all."""
  del outputs, labels, mask
  return {"loss_sum": jnp.sum(losses.astype(jnp.float32))}


def jdl_program(x: np.ndarray, y: np.ndarray, *, check_finite: bool = True, mask: bool = True,
                full_metrics: bool = True, jdl_optimizer: bool = True,
                order_given: bool = False) -> Timer:
  """A timer of one epoch of jdl's resident train program, with the parts named by the flags."""
  model = jdl.models.MLP(hidden=(HIDDEN,), num_classes=10)
  tx = (jdl.make_optimizer({"name": "adam", "learning_rate": 1e-3}) if jdl_optimizer
        else optax.adam(1e-3, eps=1e-7))
  state = jdl.create_train_state(model, tx, x[:1], jax.random.PRNGKey(0))
  train_step = jdl.make_train_step(
      check_finite=check_finite,
      **({} if full_metrics else {"metrics_fn": loss_sum_only}))
  if not mask:
    train_step = without_mask(train_step)
  data = resident.ResidentData(*jax.device_put(resident.with_padding_row(x, y)), batch_size=BATCH,
                               shuffle=True, seed=SEED)
  chunk = jax.jit(resident.make_train_chunk(train_step, data), donate_argnums=(0, 3))
  carry = {"state": state, "order": jax.device_put(data.initial_order())}

  def run(epoch: int) -> float:
    if order_given:  # the carried order is already this epoch's: the call draws none
      carry["order"] = jax.block_until_ready(
          resident.EpochOrder(jnp.int32(epoch), data.padded_order(epoch)))
    start = time.perf_counter()
    state, sums, carry["order"] = chunk(carry["state"], data.inputs, data.labels, carry["order"],
                                        np.int32(epoch * STEPS), np.int32(STEPS))
    jax.block_until_ready(sums)
    carry["state"] = state
    return time.perf_counter() - start

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

  def run(epoch: int) -> float:
    key = jax.random.fold_in(jax.random.PRNGKey(SEED), epoch)
    if gather:
      order = jax.block_until_ready(jax.random.permutation(key, NUM_EXAMPLES).reshape(STEPS, BATCH))
      start = time.perf_counter()
      params, opt_state, loss = scan_gathering(carry["params"], carry["opt_state"], order, images,
                                               labels)
    else:
      batches = jax.block_until_ready(shuffled(key, images, labels))
      start = time.perf_counter()
      params, opt_state, loss = scan_batches(carry["params"], carry["opt_state"], *batches)
    jax.block_until_ready(loss)
    carry.update(params=params, opt_state=opt_state)
    return time.perf_counter() - start

  return run


def order_alone() -> Timer:
  """A timer of drawing one epoch's order on the device, as the resident engine does."""
  def run(epoch: int) -> float:
    start = time.perf_counter()
    jax.block_until_ready(epoch_order(np.uint32(SEED), np.uint32(epoch),
                                      num_examples=NUM_EXAMPLES, shuffle=True))
    return time.perf_counter() - start

  return run


def plain_shuffle_alone(x: np.ndarray, y: np.ndarray) -> Timer:
  """A timer of the plain program's shuffle: a permutation and one gather of the whole split."""
  images, labels = jax.device_put(x), jax.device_put(y)

  @jax.jit
  def shuffled(key, images, labels):
    order = jax.random.permutation(key, NUM_EXAMPLES)
    return images[order], labels[order]

  def run(epoch: int) -> float:
    key = jax.random.fold_in(jax.random.PRNGKey(SEED), epoch)
    start = time.perf_counter()
    jax.block_until_ready(shuffled(key, images, labels))
    return time.perf_counter() - start

  return run


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5, help="timed epochs of each variant")
  args = parser.parse_args()
  x, y = bench_seed_mlp.make_data()
  variants: dict[str, Timer] = {
      "jdl": jdl_program(x, y),
      "jdl-order-given": jdl_program(x, y, order_given=True),
      "jdl-nocheck": jdl_program(x, y, check_finite=False),
      "jdl-nomask": jdl_program(x, y, mask=False),
      "jdl-loss-only": jdl_program(x, y, full_metrics=False),
      "jdl-optax-adam": jdl_program(x, y, jdl_optimizer=False),
      "jdl-bare": jdl_program(x, y, check_finite=False, mask=False, full_metrics=False,
                              jdl_optimizer=False),
      "plain-gather": plain_program(x, y, gather=True),
      "plain": plain_program(x, y, gather=False),
      "order alone": order_alone(),
      "plain shuffle alone": plain_shuffle_alone(x, y),
  }
  seconds: dict[str, list[float]] = {"fit": [], **{name: [] for name in variants}}
  for name, run in variants.items():  # warm-up: compilation, first touches of memory
    run(0)
    print(f"compiled {name}", flush=True)

  marks: list[tuple[float, float]] = []  # (hook entered, hook left) per fit epoch

  def one_round(step: int, state: Any, record: Any) -> None:
    del state, record
    entered = time.perf_counter()
    epoch = step // STEPS
    if epoch >= 2:  # fit's first epoch compiles; each later one has a round of the others
      for name, run in variants.items():
        seconds[name].append(run(epoch))
    marks.append((entered, time.perf_counter()))
    print(f"round {epoch}/{args.repeats + 1} done", flush=True)

  state = jdl.create_train_state(jdl.models.MLP(hidden=(HIDDEN,), num_classes=10),
                                 jdl.make_optimizer({"name": "adam", "learning_rate": 1e-3}),
                                 x[:1], jax.random.PRNGKey(0))
  train_step, eval_step = jdl.make_steps()
  jdl.fit(state, train_step, eval_step, jdl.data.ArraySource(x, y, BATCH, shuffle=True, seed=SEED),
          None, num_epochs=args.repeats + 2, hooks=[one_round], progress=False,
          runner=jdl.parallel.JitRunner())
  # fit's epoch e (e >= 2) ran between the hook of epoch e-1 leaving and that of epoch e entering.
  seconds["fit"] = [marks[i][0] - marks[i - 1][1] for i in range(1, len(marks))][:args.repeats]
  seconds = {name: values[:args.repeats] for name, values in seconds.items()}

  device = jax.devices()[0]
  medians = {name: statistics.median(values) for name, values in seconds.items()}
  print(f"\nseed MLP epoch ({STEPS} steps of batch {BATCH}), medians of {args.repeats} epochs, "
        f"variants in turn in one process; {device.platform} ({device.device_kind}), "
        f"{os.cpu_count()} CPU cores")
  print(f"{'variant':<20} {'s/epoch':>8} {'us/step':>8} {'/ plain':>8} {'jdl - this':>10}  "
        "epochs (s)")
  for name, median in medians.items():
    print(f"{name:<20} {median:8.3f} {median / STEPS * 1e6:8.1f} {median / medians['plain']:8.3f} "
          f"{medians['jdl'] - median:10.3f}  " + " ".join(f"{s:.3f}" for s in seconds[name]))


if __name__ == "__main__":
  main()
