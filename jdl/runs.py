"""A run's workdir: its task's data, what a later script needs to rebuild the model, its lock.

Beside `config.json`, `metrics.jsonl` and `checkpoints/`, `train_and_evaluate` writes `data.json`
(the `jdl.data.DatasetMeta`) and, for a text task, `vocab.json`; with them `load_run(workdir)`
rebuilds the model and restores the trained state without the dataset. `config.task` is
"classification", "language_model" (characters; `jdl.data.text.load_char_lm_data`) or
"text_classification" (word ids; `jdl.data.text.load_text_classification_data`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from jdl import data as data_lib, models, optim, parallel, transfer
from jdl.checkpoint import Checkpointer
from jdl.config import ConfigError
from jdl.data import text as text_lib
from jdl.writers import CONFIG_NAME
from jdl.state import TrainState, create_train_state

TASKS = ("classification", "language_model", "text_classification")
DATA_NAME = "data.json"
VOCAB_NAME = "vocab.json"
CHECKPOINT_DIR = "checkpoints"  # the workdir's folder of `train_and_evaluate`'s checkpoints

Vocabulary = Any  # text_lib.CharVocabulary | text_lib.WordVocabulary


def load_task_data(
    config: Any, *, pipeline_augment: data_lib.PipelineAugmentFn | None = None,
) -> tuple[data_lib.BatchSource, data_lib.BatchSource, data_lib.DatasetMeta, Vocabulary | None]:
  """`(train_source, eval_source, meta, vocabulary)` for `config.task` (see the module docstring);
  the vocabulary is None for non-text tasks."""
  task = config.task
  if task not in TASKS:
    raise ValueError(f"unknown config.task {task!r}; expected one of {TASKS}.")
  processes = jax.process_count()  # the eval batch is rounded up to a multiple of it
  common = dict(
      batch_size=config.batch_size,
      eval_batch_size=-(-config.eval_batch_size // processes) * processes,
      train_split=config.train_split, eval_split=config.eval_split, data_dir=config.data_dir,
      download=config.download, seed=config.seed, process_index=jax.process_index(),
      process_count=processes)
  if task != "classification" and (pipeline_augment is not None or not config.in_memory):
    raise ValueError(f"task {task!r} keeps its data in memory and takes no image augmentation; "
                     "set in_memory=true and leave config.augment off.")
  if task == "language_model":
    return text_lib.load_char_lm_data(config.dataset, block_size=config.text.block_size,
                                      manual_dir=config.manual_dir, **common)
  if task == "text_classification":
    return text_lib.load_text_classification_data(
        config.dataset, max_length=config.text.max_length, max_words=config.text.max_words,
        shuffle=config.shuffle, manual_dir=config.manual_dir, **common)
  train, evaluation, meta = data_lib.load_classification_data(
      config.dataset, in_memory=config.in_memory, shuffle=config.shuffle,
      manual_dir=config.manual_dir, augment=pipeline_augment, **common)
  return train, evaluation, meta, None


def eval_name(config: Any) -> str:
  """The prefix of a run's evaluation metrics: its eval split without a slice ("test[:10%]")."""
  return config.eval_split.split("[")[0]


def make_runner(config: Any) -> parallel.Runner:
  """The config's device layout: `config.layout` on `config.num_devices`, or, where
  `config.mesh` asks for more than data parallelism on all devices, a sharded state on that mesh
  by `config.sharding_rules` (`jdl.sharding`)."""
  mesh = config.mesh
  devices = dict(num_devices=config.num_devices or None, batch_size=config.batch_size)
  if (mesh.data, mesh.fsdp, mesh.tensor) == (0, 1, 1):
    return parallel.make_runner(config.layout, **devices)
  rules = {name: tuple(axis.strip() for axis in axes.split(",") if axis.strip())
           for name, axes in config.sharding_rules.items()}
  try:
    return parallel.make_runner(
        config.layout, **devices, rules=rules, fsdp_min_size=config.fsdp_min_size,
        mesh_shape={"data": mesh.data or -1, "fsdp": mesh.fsdp, "tensor": mesh.tensor})
  except ValueError as error:  # a mesh this machine cannot hold: the config's mistake
    raise ConfigError(f"config.mesh {mesh.to_dict()}: {error}") from None


def initial_state(config: Any, meta: data_lib.DatasetMeta, *, total_steps: int,
                  axis_name: str | None = None, load: bool = True,
                  log: Callable[[str], None] = print,
                  shardings: Callable[[TrainState], Any] | None = None) -> TrainState:
  """The run's fresh state: the config's model and optimizer, initialised from `config.seed`
  (straight into the layout `shardings` gives, when given), then changed as `config.transfer`
  asks (`apply_transfer_config` with `load`)."""
  model = models.build_model(config.model, num_classes=meta.num_classes, axis_name=axis_name)
  tx = optim.make_optimizer(config.optimizer, total_steps=total_steps)
  state = create_train_state(model, tx, np.zeros((1, *meta.input_shape), meta.input_dtype),
                             jax.random.PRNGKey(config.seed), shardings=shardings)
  return apply_transfer_config(state, config.get("transfer"), load=load, log=log)


def write_run_metadata(workdir: str, meta: data_lib.DatasetMeta,
                       vocabulary: Vocabulary | None) -> None:
  """Writes `data.json` (and `vocab.json` for text tasks) into `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, DATA_NAME), "w", encoding="utf-8") as f:
    json.dump(dataclasses.asdict(meta), f, indent=2, sort_keys=True)
  if vocabulary is not None:
    with open(os.path.join(workdir, VOCAB_NAME), "w", encoding="utf-8") as f:
      f.write(vocabulary.to_json())


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained run loaded from its workdir: the restored state (on the default device), its
  `config.json` (with tuples where it had tuples), dataset metadata, text vocabulary (or None)
  and the step of the restored checkpoint."""

  state: TrainState
  config: ml_collections.ConfigDict
  meta: data_lib.DatasetMeta
  vocabulary: Vocabulary | None
  step: int


def load_run(workdir: str, *, checkpoint: str | int = "latest",
             log: Callable[[str], None] = print) -> Run:
  """Rebuilds a run's model and optimizer from its workdir (written by `train_and_evaluate`) and
  restores a checkpoint: "latest", "best" (by the run's `best_metric`) or a step number. Raises
  FileNotFoundError, saying which and what writes it, where the workdir lacks `config.json`,
  `data.json` or checkpoints."""
  config, meta = read_config(workdir), read_meta(workdir)
  # The schedule's length changes no array of the optimizer state, so any positive length does;
  # a fine-tuned run's optimizer has the structure its `config.transfer` gave it (frozen groups).
  template = initial_state(config, meta, total_steps=max(int(config.num_steps), 1), load=False)
  with Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), writable=False) as checkpointer:
    steps = checkpointer.steps()
    if not steps:
      raise FileNotFoundError(f"{checkpointer.directory} holds no checkpoint; train with "
                              "config.checkpoint=true first.")
    if checkpoint == "latest":
      state = checkpointer.restore_latest(template, log=log, move_unusable=False)
      if state is None:
        raise FileNotFoundError(f"no usable checkpoint in {checkpointer.directory}.")
    else:
      step = best_step(workdir, config) if checkpoint == "best" else int(checkpoint)
      if step not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} in {checkpointer.directory}; it "
                                f"holds steps {steps}.")
      state = checkpointer.restore(template, step)
  return Run(state, config, meta, read_vocabulary(workdir), int(state.step))


def best_step(workdir: str, config: ml_collections.ConfigDict) -> int:
  """The step of the checkpoint with the best evaluation `config.best_metric`, from the metrics
  saved with each checkpoint (they survive resumes; `metrics.jsonl` is not consulted)."""
  if not config.best_metric:
    raise ValueError("the run kept no best checkpoint (config.best_metric is empty).")
  key = f"{eval_name(config)}_{config.best_metric}"
  with Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), best_metric=key,
                    writable=False) as checkpointer:
    step = checkpointer.best_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint of {workdir} was saved with {key!r} (checkpoints "
                            "saved at evaluations carry it).")
  return step


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's `config.json` as a ConfigDict (JSON lists become tuples, as configs write them)."""
  return ml_collections.ConfigDict(_tuples(_read_json(workdir, CONFIG_NAME)))


def read_meta(workdir: str) -> data_lib.DatasetMeta:
  """The run's dataset metadata (`data.json`)."""
  return data_lib.DatasetMeta.from_dict(_read_json(workdir, DATA_NAME))


def read_vocabulary(workdir: str) -> Vocabulary | None:
  """The run's vocabulary (`vocab.json`), or None for a task without one."""
  path = os.path.join(workdir, VOCAB_NAME)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    document = f.read()
  kinds = {"char": text_lib.CharVocabulary, "word": text_lib.WordVocabulary}
  kind = json.loads(document).get("kind")
  if kind not in kinds:
    raise ValueError(f"{path} holds a vocabulary of unknown kind {kind!r}; expected "
                     f"{sorted(kinds)}.")
  return kinds[kind].from_json(document)


def _read_json(workdir: str, name: str) -> dict[str, Any]:
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: is {workdir} a workdir written by "
                            "jdl.train_and_evaluate (an experiment run)?")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _tuples(value: Any) -> Any:
  if isinstance(value, dict):
    return {key: _tuples(item) for key, item in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(item) for item in value)
  return value


def load_pretrained_from_workdir(
    target_state: TrainState, workdir: str, *, checkpoint: str | int = "latest",
    rename: transfer.Renames | None = None, skip: transfer.Patterns = (),
    log: Callable[[str], None] = print) -> tuple[TrainState, transfer.TransferReport]:
  """`jdl.transfer.load_pretrained_state` into `target_state` (fresh) from the run in `workdir`,
  rebuilt and restored by `load_run` (no dataset needed); its optimizer state is discarded."""
  run = load_run(workdir, checkpoint=checkpoint, log=log)
  return transfer.load_pretrained_state(target_state, run.state, rename=rename, skip=skip)


def apply_transfer_config(state: TrainState, config: Mapping[str, Any] | None, *,
                          load: bool = True, log: Callable[[str], None] = print) -> TrainState:
  """A fresh state changed as `config` (a `jdl.transfer.transfer_config()` block; None: no
  change) asks: its optimizer wrapped by `jdl.transfer.freeze` for `config.freeze`, then (with
  `load`) the parameters and model state of the run in `config.init_from` loaded, the report to
  `log`. Call it before restoring a checkpoint of this run: the frozen optimizer's state has
  another structure, which the restore's template needs (`load=False` applies only that).
  """
  if config is None:
    return state
  known = set(transfer.transfer_config())
  if unknown := sorted(set(config) - known):
    raise ValueError(f"unknown config.transfer keys {unknown}; valid keys: {sorted(known)}.")
  if patterns := transfer.as_patterns(config.get("freeze", ()), "config.transfer.freeze"):
    tx = transfer.freeze(state.tx, state.params, patterns)
    state = state.replace(tx=tx, opt_state=tx.init(state.params))
  workdir = config.get("init_from")
  if load and workdir:
    checkpoint = config.get("checkpoint", "latest")
    if isinstance(checkpoint, str) and checkpoint.isdigit():
      checkpoint = int(checkpoint)
    state, report = load_pretrained_from_workdir(
        state, workdir, checkpoint=checkpoint, rename=tuple(config.get("rename", ())) or None,
        skip=config.get("skip", ()), log=log)
    log(f"initialised from {workdir} ({checkpoint} checkpoint): {report}")
  elif not workdir and (config.get("skip") or config.get("rename")):
    raise ValueError("config.transfer.skip and rename apply to loading; set "
                     "config.transfer.init_from to the workdir to load from.")
  return state


LOCK_NAME = "jdl.lock"  # the workdir's file naming the process training in it (`WorkdirLock`)


class WorkdirError(RuntimeError):
  """The workdir cannot be used: it cannot be written, or another run holds it."""


class WorkdirBusyError(WorkdirError):
  """Another process is training in the workdir."""


class WorkdirLock:
  """One run per workdir (created when missing): an exclusive lock on `WORKDIR/jdl.lock`, a file
  naming its holder (host, pid, start, command), or WorkdirBusyError naming a live holder;
  WorkdirError where the workdir cannot be written.

  The lock is `fcntl.flock`'s, dropped however its holder exits (SIGKILL, a crash, a lost NFS
  lease): a lock file nobody holds is taken over, with a note to `log`; `release` removes it.
  Without filesystem locks the file decides: a dead holder on this host is stale, one on another
  host is trusted."""

  def __init__(self, workdir: str, log: Callable[[str], None] = print) -> None:
    self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
    try:
      os.makedirs(workdir, exist_ok=True)
      self._file = self._acquire(log)
    except OSError as error:
      raise WorkdirError(f"cannot write to the workdir {os.path.abspath(workdir)} ([Errno "
                         f"{error.errno}] {error.strerror}); choose a workdir on a writable "
                         "filesystem.") from None
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}
    self._file.seek(0)
    self._file.truncate()
    self._file.write(json.dumps(holder) + "\n")
    self._file.flush()

  def _acquire(self, log: Callable[[str], None]) -> Any:
    for _ in range(10):  # a holder may remove the file between our open and our lock: retry
      file = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
      try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _read_holder(file)
        file.close()
        raise WorkdirBusyError(
            f"{os.path.dirname(self.path)} is in use by another run ({_describe(holder)}); one "
            "run per workdir. Wait for it to finish, stop it, or use another --workdir.") from None
      except OSError as error:
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
          raise
        self._check_holder_alive(_read_holder(file))  # no locks here: trust the file
      try:
        same = os.fstat(file.fileno()).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        if previous := _read_holder(file):
          log(f"taking over {self.path}: the run that held it ({_describe(previous)}) ended "
              "without releasing it.")
        return file
      file.close()
    raise WorkdirBusyError(f"could not lock {self.path}: it keeps being replaced.")

  def _check_holder_alive(self, holder: dict[str, Any]) -> None:
    if not holder:
      return
    if holder.get("host") != socket.gethostname():
      raise WorkdirBusyError(
          f"{os.path.dirname(self.path)} is in use by a run on another host ({_describe(holder)}) "
          f"and this filesystem has no locks to check it; remove {self.path} if that run is over.")
    try:
      os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
      return  # stale
    except PermissionError:
      pass  # alive, another user's
    raise WorkdirBusyError(f"{os.path.dirname(self.path)} is in use by another run "
                           f"({_describe(holder)}); one run per workdir.")

  def release(self) -> None:
    """Removes the lock file and drops the lock; releasing again does nothing."""
    if not self._file.closed:
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.path)
      self._file.close()

  def __enter__(self) -> WorkdirLock:
    return self

  def __exit__(self, *_: object) -> None:
    self.release()


def _read_holder(file: Any) -> dict[str, Any]:
  file.seek(0)
  try:
    return json.loads(file.read() or "{}")
  except ValueError:
    return {}


def _describe(holder: Mapping[str, Any]) -> str:
  if not holder:
    return "holder unknown"
  return (f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}: "
          f"{holder.get('command', '')}".rstrip(": "))
