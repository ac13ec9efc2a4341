"""The per-step engine reads the next batches while a step runs (`jdl.prefetch`)."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdl
from jdl import models, prefetch


class _HandshakeSource:
  """Batch i+1 is made only once step i has started (the source waits for it), so a loop that
  reads a batch only after its step ended would never overlap the two."""

  def __init__(self, steps: int) -> None:
    self.steps_per_epoch, self.batch_size, self.num_examples = steps, 4, 4 * steps
    self.started = [threading.Event() for _ in range(steps + 1)]
    self.made = [threading.Event() for _ in range(steps + 1)]

  def epoch(self, index):
    for i in range(self.steps_per_epoch):
      if i:
        self.started[i - 1].wait(timeout=10)
      self.made[i].set()
      yield {"input": np.full((4, 3), i, np.float32), "label": np.zeros(4, np.int32),
             "mask": np.ones(4, bool), "index": np.full((4,), i, np.int32)}


def test_the_next_batch_is_read_while_the_step_runs():
  """Each step (from inside the compiled program, through a callback) sees the next batch made
  before it ends: reading overlaps computing instead of adding to it."""
  source = _HandshakeSource(steps=6)
  overlapped = []

  def step_began(index):
    index = int(np.asarray(index)[0])
    source.started[index].set()
    overlapped.append(source.made[index + 1].wait(timeout=2) if index + 1 < 6 else True)
    return np.float32(0)

  def handshake(outputs, batch, mask):
    del outputs, mask
    value = jax.pure_callback(step_began, jax.ShapeDtypeStruct((), jnp.float32), batch["index"])
    return {"handshake_sum": value}

  base = jdl.tasks.classification()
  task = jdl.Task(loss=base.loss, metrics=(handshake,))
  state = jdl.create_train_state(models.MLP(hidden=(4,), num_classes=2), optax.sgd(0.1),
                                 np.zeros((1, 3), np.float32), jax.random.key(0))
  jdl.fit(state, *jdl.make_steps(task), source, None, num_steps=6, progress=False)
  assert overlapped == [True] * 6


def test_a_seek_restarts_the_walk_and_errors_reach_the_reader():
  class Source:
    steps_per_epoch = 3

    def epoch(self, index):
      for i in range(3):
        if index == 2 and i == 1:
          raise OSError("disk gone")
        yield (index, i)

  batches = prefetch.BatchPrefetcher(Source(), prepare=lambda b: b, depth=2)
  assert [batches.get(s) for s in (0, 1, 2, 3)] == [(0, 0), (0, 1), (0, 2), (1, 0)]
  assert batches.get(5) == (1, 2)  # a seek: the walk starts again at step 5
  assert batches.get(6) == (2, 0)
  with pytest.raises(OSError, match="disk gone"):
    batches.get(7)
  batches.close()
