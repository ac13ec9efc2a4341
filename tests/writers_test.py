"""Tests of jdl.writers: JSON lines, and TensorBoard event files written without TensorFlow."""

import math

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.compat.proto import event_pb2
from tensorboard.util import tensor_util

import jdl
from jdl import writers


def read_events(logdir):
  """`(scalars {tag: {step: value}}, texts {tag: {step: str}}, plugins {tag: name})` of a log
  folder, as TensorBoard reads it."""
  accumulator = event_accumulator.EventAccumulator(
      str(logdir), size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  scalars, texts, plugins = {}, {}, {}
  for tag in accumulator.Tags()["tensors"]:
    plugins[tag] = accumulator.SummaryMetadata(tag).plugin_data.plugin_name
    for event in accumulator.Tensors(tag):
      value = tensor_util.make_ndarray(event.tensor_proto)
      if value.dtype == np.float32:
        scalars.setdefault(tag, {})[event.step] = float(value)
      else:
        texts.setdefault(tag, {})[event.step] = value.item().decode()
  return scalars, texts, plugins


def test_metric_writer_event_files_read_back(tmp_path):
  """Scalars come back from the event file as float32 "scalars" summaries at their steps, the
  config as a "text" summary; non-finite values are left out of TensorBoard but kept in JSONL."""
  with jdl.MetricWriter(str(tmp_path)) as writer:
    writer.write_config({"seed": 3, "model": {"name": "cnn1d"}})
    writer.write(100, {"train_loss": 0.6931471805599453, "test_accuracy": 0.926, "epoch": 2})
    writer.write(200, {"train_loss": 0.25, "test_accuracy": 0.95, "epoch": 4,
                       "test_loss": float("nan"), "grad_norm": float("inf")})
  (event_file,) = (tmp_path / writers.TENSORBOARD_DIR).glob("events.out.tfevents.*")
  assert event_file.stat().st_size > 0
  scalars, texts, plugins = read_events(tmp_path / writers.TENSORBOARD_DIR)
  assert scalars == {
      "train_loss": {100: pytest.approx(0.6931471805599453, rel=1e-7), 200: 0.25},
      "test_accuracy": {100: pytest.approx(0.926, rel=1e-7), 200: pytest.approx(0.95, rel=1e-7)},
      "epoch": {100: 2.0, 200: 4.0},
  }
  assert scalars["train_loss"][100] == float(np.float32(0.6931471805599453))
  assert {tag: plugins[tag] for tag in scalars} == dict.fromkeys(scalars, "scalars")
  assert plugins["config"] == "text"
  assert '"name": "cnn1d"' in texts["config"][0]
  records = jdl.read_jsonl(str(tmp_path))
  assert records[1]["test_loss"] is None and math.isinf(records[1]["grad_norm"])


def test_event_file_records_pass_tensorflow_checksums(tmp_path):
  """TensorFlow's own record reader checks every length and data checksum of the file, and the
  first record is the file version TensorBoard expects."""
  tf = pytest.importorskip("tensorflow")
  writer = writers.EventFileWriter(str(tmp_path))
  writer.write_scalars(7, {"loss": 1.5})
  writer.write_text(0, "note", "hello")
  writer.close()
  events = [event_pb2.Event.FromString(record.numpy())
            for record in tf.data.TFRecordDataset(writer.path)]
  assert events[0].file_version == "brain.Event:2"
  assert [(event.step, event.summary.value[0].tag) for event in events[1:]] == [
      (7, "loss"), (0, "note")]


def test_writers_in_one_folder_get_files_of_their_own(tmp_path):
  """Two writers opened in the same second in one folder write two files, both readable."""
  first = writers.EventFileWriter(str(tmp_path))
  second = writers.EventFileWriter(str(tmp_path))
  first.write_scalars(1, {"a": 1.0})
  second.write_scalars(2, {"b": 2.0})
  first.close()
  second.close()
  second.close()  # closing twice is harmless
  assert first.path != second.path
  scalars, _, _ = read_events(tmp_path)
  assert scalars == {"a": {1: 1.0}, "b": {2: 2.0}}


def test_metric_writer_without_tensorboard_writes_no_event_file(tmp_path):
  with jdl.MetricWriter(str(tmp_path), tensorboard=False) as writer:
    writer.write(1, {"loss": 1.0})
  assert not (tmp_path / writers.TENSORBOARD_DIR).exists()
  assert jdl.read_jsonl(str(tmp_path)) == [{"step": 1, "loss": 1.0}]
