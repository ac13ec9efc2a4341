"""Masked metric accumulation gives exact full-split numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdl
from jdl import data as data_lib
from jdl import metrics


def _whole_array_metrics(logits, labels):
  losses = np.asarray(jdl.softmax_cross_entropy(logits, labels))
  top3 = np.argsort(-logits, axis=1)[:, :3]
  return {
      "loss": losses.mean(),
      "accuracy": (logits.argmax(1) == labels).mean(),
      "top3_accuracy": (top3 == labels[:, None]).any(1).mean(),
  }


@pytest.mark.parametrize("batch_size", [1, 7, 32, 100, 101])
def test_accumulation_over_uneven_padded_batches_equals_whole_array(batch_size):
  """Summing masked batch metrics (last batch padded) gives the whole-array metrics exactly."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(100, 5)).astype(np.float32)
  labels = rng.integers(0, 5, size=100).astype(np.int32)
  source = data_lib.ArraySource(logits, labels, batch_size, shuffle=False)
  total = jdl.empty_metrics()
  for batch in source.epoch(0):
    losses = jdl.softmax_cross_entropy(batch["input"], batch["label"])
    total = jdl.merge_metrics(total, metrics.classification_metrics(
        batch["input"], batch["label"], losses, batch["mask"], top_k=(3,)))
  computed = jdl.compute_metrics(total)
  expected = _whole_array_metrics(logits, labels)
  assert computed["count"] == 100
  assert computed["accuracy"] == pytest.approx(expected["accuracy"], abs=0)
  assert computed["top3_accuracy"] == pytest.approx(expected["top3_accuracy"], abs=0)
  assert computed["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_top_k_at_least_num_classes_is_skipped():
  """top-k for k >= num_classes is always 1, so it is not tracked."""
  sums = metrics.classification_metrics(jnp.zeros((2, 3)), jnp.array([0, 1]), jnp.zeros(2), top_k=(3, 2))
  assert "top3_accuracy_sum" not in sums and "top2_accuracy_sum" in sums


def test_loss_metrics_and_errors():
  """Loss-only metrics average over unmasked examples; empty totals and key mismatches fail."""
  sums = metrics.loss_metrics(jnp.array([1.0, 3.0, 100.0]), jnp.array([True, True, False]))
  assert jdl.compute_metrics(sums) == {"loss": 2.0, "count": 2}
  with pytest.raises(ValueError, match="count is 0"):
    jdl.compute_metrics(metrics.loss_metrics(jnp.ones(2), jnp.zeros(2, bool)))
  with pytest.raises(ValueError, match="cannot merge"):
    jdl.merge_metrics(sums, {"count": jnp.ones(())})


def test_metrics_sums_merge_under_jit():
  """Metric sums are plain pytrees that pass through jit."""
  fn = jax.jit(lambda o, l: metrics.classification_metrics(o, l, jnp.zeros(l.shape)))
  sums = fn(jnp.eye(3), jnp.array([0, 1, 1]))
  assert int(sums["accuracy_sum"]) == 2 and int(sums["count"]) == 3


def test_per_position_labels_count_positions_and_broadcast_an_example_mask():
  """`[batch, time]` labels: every position is one classification; a `[batch]` mask drops whole
  rows and a `[batch, time]` mask single positions."""
  outputs = jnp.asarray(np.eye(3)[[[0, 1, 2], [2, 2, 2]]], jnp.float32)  # [2, 3, 3]
  labels = jnp.asarray([[0, 1, 0], [2, 0, 2]])
  losses = jnp.ones((2, 3))
  sums = metrics.classification_metrics(outputs, labels, losses, top_k=(2,))
  assert int(sums["count"]) == 6 and int(sums["accuracy_sum"]) == 4
  row_mask = metrics.classification_metrics(outputs, labels, losses, jnp.asarray([True, False]))
  assert int(row_mask["count"]) == 3 and int(row_mask["accuracy_sum"]) == 2
  position_mask = jnp.asarray([[True, True, False], [True, False, False]])
  sums = metrics.classification_metrics(outputs, labels, losses, position_mask)
  assert int(sums["count"]) == 3 and int(sums["accuracy_sum"]) == 3
  with pytest.raises(ValueError, match="fits neither the batch"):
    metrics.classification_metrics(outputs, labels, losses, jnp.ones((3,), bool))
