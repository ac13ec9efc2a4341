"""Batches made ready ahead of the step that needs them, by a background thread.

Reading, checking and laying out a batch of a streaming source costs host time; a thread walking
the source ahead overlaps it with the step, so a step costs the larger of the two, not their sum.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any

_END = object()  # what a thread that stopped early leaves behind


class BatchPrefetcher:
  """The batches of a `jdl.data.BatchSource` from any step on, each passed through `prepare`
  (checks, device placement) in a thread, up to `depth` ahead.

  `get(step)` returns the batch of `step`; asking for another step than the next (a resume) walks
  again from there (without reading the epoch's earlier batches where the source has
  `epoch_from`), and raises what the thread raised. `close()` stops the (daemon) thread."""

  def __init__(self, source: Any, prepare: Callable[[Any], Any], depth: int = 2) -> None:
    if depth < 1:
      raise ValueError(f"depth must be >= 1 (batches kept ready); got {depth}.")
    self.source, self.prepare, self.depth = source, prepare, depth
    self.next_step: int | None = None  # None until the first `get` starts the thread
    self._thread: threading.Thread | None = None

  def get(self, step: int) -> Any:
    """The prepared batch of `step` (0-based, counted across epochs)."""
    if step != self.next_step:
      self._start(step)
    item_step, item = self._queue.get()
    if item_step is None:  # the thread failed, or the source ran dry
      self.next_step = None
      if item is _END:
        raise RuntimeError(f"the batch source ended before step {step}: its epochs yielded fewer "
                           "batches than steps_per_epoch says.")
      raise item
    if item_step != step:
      self.close()
      raise RuntimeError(f"the batch source gave the batch of step {item_step} where step {step} "
                         "was due: its epochs yield another number of batches than "
                         "steps_per_epoch says.")
    self.next_step = step + 1
    return item

  def close(self) -> None:
    """Stops the thread (waiting a moment for it) and drops the prepared batches."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join(timeout=5.0)
    self._thread, self.next_step = None, None

  def _start(self, step: int) -> None:
    self.close()
    self._stop = threading.Event()
    self._queue = queue.Queue(maxsize=self.depth)
    self._thread = threading.Thread(target=self._walk, args=(step, self._stop, self._queue),
                                    name="jdl-prefetch", daemon=True)
    self._thread.start()

  def _walk(self, step: int, stop: threading.Event, ready: queue.Queue) -> None:
    try:
      steps_per_epoch = self.source.steps_per_epoch
      epoch_from = getattr(self.source, "epoch_from", None)  # skips without reading the batches
      while not stop.is_set():
        epoch, skip = divmod(step, steps_per_epoch)
        produced = False
        for batch in (epoch_from(epoch, skip) if skip and epoch_from is not None
                      else itertools.islice(self.source.epoch(epoch), skip, None)):
          if not self._put(ready, stop, (step, self.prepare(batch))):
            return
          step, produced = step + 1, True
        step = max(step, (epoch + 1) * steps_per_epoch)
        if not produced:
          self._put(ready, stop, (None, _END))
          return
    except BaseException as error:  # pylint: disable=broad-except  # raised again by `get`
      self._put(ready, stop, (None, error))

  @staticmethod
  def _put(ready: queue.Queue, stop: threading.Event, item: Any) -> bool:  # False: stopped first
    while not stop.is_set():
      with contextlib.suppress(queue.Full):
        ready.put(item, timeout=0.1)
        return True
    return False
