"""An experiment from its config (`jdl.config.base_config` lists the keys): `train_and_evaluate`
assembles data, model, optimizer, steps and loop, then runs them; `main` is the body of every
`experiments/<name>.py`."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections

from jdl import augment as augment_lib, config as config_lib, data as data_lib
from jdl import losses, models, optim, parallel, runs, step as step_lib, tasks
from jdl.checkpoint import Checkpointer, CheckpointError, CheckpointWriteError
from jdl.data import augment_tf
from jdl.loop import Hook, NonFiniteError, Preempted, Record, evaluate, fit
from jdl.state import TrainState, count_params
from jdl.writers import JSONL_NAME, MetricWriter, read_jsonl, truncate_records

RunFn = Callable[[ml_collections.ConfigDict, str], Any]  # (config, workdir) -> result


def train_and_evaluate(config: Any, workdir: str,
                       hooks: Sequence[Hook] = ()) -> tuple[TrainState, list[Record]]:
  """Runs the experiment `config` describes (any `config.task`), writing logs to `workdir`.

  Joins a multi-process run when asked (`config.distributed`; only process 0 prints and writes),
  picks the device layout (`config.layout`), and resumes from the latest good checkpoint in
  `workdir/checkpoints` (`config.resume`): data order, dropout and augmentation are functions of
  the seed and the step, so a resumed run ends where an uninterrupted one would, and
  `metrics.jsonl` keeps only the records up to the resumed step. Process 0 holds
  `WORKDIR/jdl.lock` while it runs (`runs.WorkdirLock`). Returns `(state, history)` as `fit` does
  (history: this invocation's records; for a run already complete, its last step's record).

  Raises:
    jdl.ConfigError: the config cannot train, or the workdir holds a run it may not continue
      (`config.resume` false, another config); checked before any work.
    jdl.runs.WorkdirBusyError, jdl.runs.WorkdirError: another run holds the workdir; it cannot
      be written.
    jdl.CheckpointError: the workdir's checkpoints are all unusable or another model's.
    jdl.CheckpointWriteError: a checkpoint could not be saved (earlier ones are intact).
  """
  check_config(config)
  parallel.initialize_distributed(config.distributed)
  parallel.check_same_everywhere("workdirs", os.path.abspath(workdir))
  parallel.check_same_everywhere("configs", json.dumps(flat_config(config), sort_keys=True))
  main = parallel.is_main_process()
  log = print if main else (lambda _: None)
  lock, refused = None, None
  if main:
    try:
      lock = runs.WorkdirLock(workdir, log=log)
    except runs.WorkdirError as error:
      refused = error
  parallel.raise_if_any_failed(refused, f"take {workdir} for this run")
  with lock or contextlib.nullcontext():
    try:
      return _train_and_evaluate(config, workdir, hooks, main, log)
    except Exception as error:
      if (lost := parallel.lost_peer(error)) is not None:
        raise lost from error
      raise


def _train_and_evaluate(config: Any, workdir: str, hooks: Sequence[Hook], main: bool,
                        log: Callable[[str], None]) -> tuple[TrainState, list[Record]]:
  """`train_and_evaluate` once the config is checked and the workdir is this run's."""
  device_augment, pipeline_augment = make_augmentations(config.augment, in_memory=config.in_memory)
  runner = runs.make_runner(config)
  eval_name = runs.eval_name(config)
  checkpointer = None
  if config.checkpoint:
    best = f"{eval_name}_{config.best_metric}" if config.best_metric else None
    checkpointer = Checkpointer(os.path.join(workdir, runs.CHECKPOINT_DIR),
                                keep=config.keep_checkpoints, best_metric=best)
    if steps := checkpointer.steps():
      if not config.resume:
        raise config_lib.ConfigError(
            f"{checkpointer.directory} already holds checkpoints (steps {steps}) and config.resume "
            "is false; use a new workdir, or resume=true to continue that run.")
      check_resumable(workdir, config)
  train_data, eval_data, meta, vocabulary = runs.load_task_data(
      config, pipeline_augment=pipeline_augment)
  num_steps = config.num_steps or config.num_epochs * train_data.steps_per_epoch
  state = runs.initial_state(config, meta, total_steps=num_steps, axis_name=runner.axis_name,
                             log=log, shardings=runner.state_shardings)
  if checkpointer is not None and config.resume:
    restored = checkpointer.restore_latest(state, log=log)
    if restored is not None:
      state = restored
      log(f"resuming from the checkpoint of step {int(state.step)} in {checkpointer.directory}.")
    else:  # every process stops if process 0 sees an earlier run's records (only it writes them)
      parallel.raise_if_any_failed(_start_over_refusal(workdir, checkpointer),
                                   "resume the run in its workdir")
  if main:  # what an earlier attempt wrote after this run's starting step is written again
    truncate_records(workdir, int(state.step))
  task = (tasks.language_model() if _model_output(config) == "hidden" else
          tasks.classification(config.loss, label_smoothing=config.label_smoothing,
                               top_k=tuple(config.top_k), pixels=meta.pixels))
  train_step, eval_step = step_lib.make_steps(
      task, l1=config.l1, l2=config.l2, axis_name=runner.axis_name, augment=device_augment,
      compute_dtype=config.compute_dtype, adversary=make_adversary(config.adversarial),
      check_finite=config.check_finite, gradient_norms=config.gradient_norms,
      microbatches=config.microbatches)
  if config.progress:
    log(f"{meta.name}: {train_data.num_examples} train / {eval_data.num_examples} "
        f"{config.eval_split} examples, input {meta.input_shape}, {meta.num_classes} classes; "
        f"model {config.model.name} with {count_params(state.params):,} parameters; "
        f"{num_steps} steps of batch {config.batch_size} on {runner.num_devices} "
        f"{jax.devices()[0].platform} device(s), layout {runner.layout!r}.")
    if isinstance(runner, parallel.ShardedRunner) and runner.plan.shards_state:
      log(runner.plan.describe(state))
  writer = MetricWriter(workdir) if main else None
  with checkpointer or contextlib.nullcontext(), writer or contextlib.nullcontext():
    if writer is not None:
      writer.write_config(config, summary=int(state.step) == 0)
      runs.write_run_metadata(workdir, meta, vocabulary)
    if int(state.step) >= num_steps:
      record = _completed_record(workdir, state, (train_step, eval_step), eval_data, runner,
                                 eval_name)
      log(_final_line(config, eval_name, record))
      log(f"the run in {workdir} is complete (step {int(state.step)} of {num_steps}); to train "
          "longer, raise --config.num_steps (or num_epochs); to train again from step 0, use a "
          "new --workdir.")
      return state, [record]
    state, history = fit(
        state, train_step, eval_step, train_data, eval_data, num_steps=num_steps,
        eval_every_steps=config.eval_every_steps or None, hooks=hooks, writer=writer,
        progress=config.progress and main, eval_name=eval_name, runner=runner,
        checkpointer=checkpointer, checkpoint_every_steps=config.checkpoint_every_steps or None,
        checkpoint_min_seconds=config.checkpoint_min_seconds)
  log(_final_line(config, eval_name, history[-1]))
  return state, history


def _final_line(config: Any, eval_name: str, final: Record) -> str:
  """The line a run ends with: the final evaluation."""
  loss, accuracy = final[f"{eval_name}_loss"], final[f"{eval_name}_accuracy"]
  after = f"after {int(final['step'])} steps, {final['elapsed_seconds']:.1f}s"
  if config.task != "language_model":
    return f"final {eval_name} accuracy: {accuracy:.4f} (loss {loss:.4f}) {after}"
  speed = (f", {final['examples_per_second']:,.0f} tokens/s"
           if "examples_per_second" in final else "")
  return (f"final {eval_name} loss: {loss:.4f} nats per character (next-character accuracy "
          f"{accuracy:.4f}) {after}{speed}")


def _completed_record(workdir: str, state: TrainState, steps: tuple[Any, Any],
                      eval_data: data_lib.BatchSource, runner: parallel.Runner,
                      eval_name: str) -> Record:
  """The final record of a run already complete: its own from `metrics.jsonl`, or, where that is
  gone (and always over several processes, which must all take part in the same evaluation), a
  fresh evaluation of its last checkpoint."""
  step, key = int(state.step), f"{eval_name}_accuracy"
  if jax.process_count() == 1 and os.path.exists(os.path.join(workdir, JSONL_NAME)):
    saved = [r for r in read_jsonl(workdir) if int(r["step"]) == step and r.get(key) is not None]
    if saved:
      return saved[-1]
  _, compiled_eval = runner.compile(*steps)
  means = evaluate(runner.place_state(state), compiled_eval, eval_data, runner=runner)
  return {"step": step, "elapsed_seconds": 0.0,
          **{f"{eval_name}_{k}": v for k, v in means.items() if k != "count"}}


def _start_over_refusal(workdir: str, checkpointer: Checkpointer) -> CheckpointError | None:
  """A CheckpointError when a workdir holds an earlier run's records but no usable checkpoint
  (starting over silently would mix two runs in one workdir), else None."""
  if not parallel.is_main_process() or not os.path.exists(os.path.join(workdir, JSONL_NAME)):
    return None
  last = max((int(record["step"]) for record in read_jsonl(workdir)), default=None)
  if last is None:
    return None
  aside = checkpointer.unusable_directory
  moved = (f"; the unusable ones are in {aside}" if os.path.isdir(aside) and os.listdir(aside)
           else "")
  return CheckpointError(
      f"{workdir} holds records of a run up to step {last} but no usable checkpoint to "
      f"resume it from{moved}. Nothing was changed. To start it over from step 0 (its records "
      "are replaced), run again with --config.resume=false; or use a new --workdir.")


_COUNTS = {  # config key: (least value, what it counts)
    "num_steps": (0, "training steps; 0: num_epochs decides"),
    "num_epochs": (0, "passes over the training split; used when num_steps is 0"),
    "eval_every_steps": (0, "steps between evaluations; 0: every epoch"),
    "checkpoint_every_steps": (0, "steps between saves; 0: evaluations and epoch ends"),
    "keep_checkpoints": (1, "checkpoints kept"),
    "batch_size": (1, "examples per training batch"),
    "eval_batch_size": (1, "examples per evaluation batch"),
    "num_devices": (0, "devices to use; 0: all"),
}


def check_config(config: Any) -> None:
  """Raises ConfigError for a config that could not train, before any data or device work: a
  count out of range, an unknown task, layout, model, model attribute, optimizer or optimizer key,
  an augmentation that cannot run, a loss that does not fit the model's output."""
  for key, (least, meaning) in _COUNTS.items():
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise config_lib.ConfigError(
          f"config.{key} must be an integer >= {least} ({meaning}); got {value!r}.")
  if not config.num_steps and not config.num_epochs:
    raise config_lib.ConfigError("config.num_steps and config.num_epochs are both 0: set one of "
                                 "them to how long to train.")
  if not config.checkpoint_min_seconds >= 0:
    raise config_lib.ConfigError("config.checkpoint_min_seconds must be >= 0; got "
                                 f"{config.checkpoint_min_seconds!r}.")
  for key, valid in (("task", runs.TASKS), ("layout", parallel.LAYOUTS)):
    if config[key] not in valid:
      raise config_lib.ConfigError(f"unknown config.{key} {config[key]!r}; expected one of "
                                   f"{valid}.")
  try:  # building these is cheap and pure, and checks every key they read
    _check_loss_matches_output(config)
    make_augmentations(config.augment, in_memory=config.in_memory)
    models.build_model(config.model, num_classes=2)
    optim.make_optimizer(config.optimizer, total_steps=config.num_steps or 10**9)
    losses.get_classification_loss(config.loss, config.label_smoothing)
  except (ValueError, TypeError, KeyError) as error:
    raise config_lib.ConfigError(str(error).strip("'\"")) from None


RESUMABLE_CHANGES = frozenset({
    "num_steps", "num_epochs", "eval_every_steps", "eval_batch_size", "progress", "resume",
    "checkpoint", "checkpoint_every_steps", "checkpoint_min_seconds", "keep_checkpoints",
    "best_metric", "check_finite", "gradient_norms", "data_dir", "manual_dir", "download",
    "distributed", "num_devices", "layout", "cpu_threads", "compilation_cache_dir", "mesh",
    "sharding_rules", "fsdp_min_size"})
"""Config keys a resumed run may change: how long, how often to evaluate or save, where the data
is, on which devices. Every other key shapes the trajectory (seed, model, optimizer, data...)."""


def check_resumable(workdir: str, config: Any) -> None:
  """Raises ConfigError (a ValueError) if `workdir` holds a run whose saved config differs from
  `config` in a key outside `RESUMABLE_CHANGES`: resuming would silently continue that run with
  other settings (another seed, say). A workdir without `config.json` is not checked."""
  try:
    saved = flat_config(runs.read_config(workdir))
  except FileNotFoundError:
    return
  now = flat_config(config)
  # Keys only one side has (a config written before a key existed) are not compared.
  differing = [key for key in sorted(set(saved) & set(now))
               if key.split(".")[0] not in RESUMABLE_CHANGES and saved[key] != now[key]]
  if differing:
    changes = "; ".join(f"{key}: {saved[key]!r} there, {now[key]!r} now" for key in differing[:5])
    raise config_lib.ConfigError(
        f"{workdir} holds checkpoints of a run with another config ({changes}"
        f"{'; ...' if len(differing) > 5 else ''}). Resuming would continue that run with these "
        "settings; use a new workdir for the new run, or the saved config to resume the old one.")


def flat_config(config: Any, prefix: str = "") -> dict[str, Any]:
  """A config (a ConfigDict or a mapping) as dotted keys -> leaf values, the values normalised
  as `config.json` stores them (lists, strings)."""
  flat: dict[str, Any] = {}
  for key, value in (config.to_dict() if hasattr(config, "to_dict") else config).items():
    if isinstance(value, Mapping):
      flat.update(flat_config(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = json.loads(json.dumps(value, default=str))
  return flat


def make_adversary(adversarial_config: Mapping[str, Any]) -> step_lib.AdversaryFn | None:
  """The train step's adversary `config.adversarial` asks for (None while its epsilon is 0)."""
  settings = dict(adversarial_config)
  epsilon = settings.pop("epsilon")
  if not epsilon:
    return None
  from jdl.analysis import adversarial  # pylint: disable=import-outside-toplevel

  value_range = settings.pop("value_range")
  return adversarial.make_adversary(
      epsilon, value_range=None if value_range is None else tuple(value_range), **settings)


AUGMENT_PLACES = ("device", "pipeline")


def make_augmentations(augment_config: Mapping[str, Any], *, in_memory: bool
                       ) -> tuple[step_lib.AugmentFn | None, data_lib.PipelineAugmentFn | None]:
  """The `(device, pipeline)` augmentations `config.augment` asks for (at most one), checked
  before any data is loaded: "device" runs jax ops inside the train step (either data path, every
  layout), "pipeline" tf.data ops on the host (streaming data only)."""
  spec = {key: value for key, value in dict(augment_config).items() if key != "where"}
  where = augment_config.get("where", "device")
  if where not in AUGMENT_PLACES:
    raise ValueError(f"unknown config.augment.where {where!r}; expected one of {AUGMENT_PLACES}.")
  if where == "device":
    return augment_lib.make_augment(spec), None
  pipeline = augment_tf.make_tf_augment(spec)
  if pipeline is not None and in_memory:
    raise ValueError(
        "config.augment.where='pipeline' augments in tf.data, which needs in_memory=False; "
        "set --config.in_memory=false, or augment on the device with where='device'.")
  return None, pipeline


def _model_output(config: Any) -> str:
  return (config.model.get(config.model.name) or {}).get("output", "logits")


def _check_loss_matches_output(config: Any) -> None:
  """A softmax output needs the probability loss and logits need the logit loss: mixing them
  trains on a silently wrong objective. The features output ("hidden") is a language model's."""
  output = _model_output(config)
  if output == "hidden" and (config.task != "language_model" or config.label_smoothing
                             or config.top_k):
    raise ValueError("model output 'hidden' trains a language model with the chunked loss "
                     "(tasks.language_model): it needs task 'language_model', no label_smoothing "
                     "and no top_k.")
  expected = {"logits": "softmax_cross_entropy", "softmax": "cross_entropy_from_probabilities",
              "hidden": "softmax_cross_entropy"}
  if output in expected and config.loss != expected[output]:
    raise ValueError(f"model output {output!r} needs loss {expected[output]!r}, but config.loss "
                     f"is {config.loss!r}.")


def run_experiment(get_config: Callable[[], ml_collections.ConfigDict], argv: Sequence[str], *,
                   name: str, train: RunFn | None = None) -> Any:
  """The body of an experiment's `main`: parses the command line (`argv` without the program
  name; a ConfigError for an unknown key or a value of the wrong type), then returns what
  `train(config, workdir)` (default `train_and_evaluate`) returns, or None after `--help`. `name`
  is used in `--help` and the default workdir `runs/<name>`."""
  parsed = config_lib.parse_command_line(get_config(), argv, name=name,
                                         default_workdir=os.path.join("runs", name))
  if parsed is None:
    return None
  config, workdir = parsed
  configure_process(config)
  return (train or train_and_evaluate)(config, workdir)


def main(get_config: Callable[[], ml_collections.ConfigDict], *, name: str,
         train: RunFn | None = None) -> None:
  """`run_experiment` on `sys.argv`, for `if __name__ == "__main__"`, with one line instead of a
  traceback and an exit status: 2 for a config mistake or a workdir the run may not use (another
  run holds it, its checkpoints are all unusable or another config's); 1 for a workdir or a
  checkpoint that cannot be written, or a lost peer process; 128 + the signal number, as if killed
  by it, for a run stopped by SIGTERM/SIGINT (after saving a checkpoint; the line says how to
  resume); 3 for a loss or gradient that became NaN or infinite."""
  try:
    run_experiment(get_config, sys.argv[1:], name=name, train=train)
  except Preempted as stopped:
    print(str(stopped), file=sys.stderr)
    # "SIGTERM", or "SIGTERM (to process 1)" on the processes it stopped with it.
    raise SystemExit(128 + int(signal.Signals[stopped.signal_name.split()[0]])) from None
  except (config_lib.ConfigError, runs.WorkdirError, CheckpointError, CheckpointWriteError,
          parallel.PeerError, NonFiniteError) as error:
    print(f"error: {error}", file=sys.stderr, flush=True)
    if isinstance(error, parallel.PeerError):
      sys.stdout.flush()
      # Exits at once: JAX's shutdown would wait for the other processes at a barrier (a lost one
      # never comes), then abort with pages of its own logs. Logs and checkpoints are on disk.
      os._exit(1)  # pylint: disable=protected-access
    refused = (config_lib.ConfigError, runs.WorkdirBusyError, CheckpointError)  # before training
    raise SystemExit(3 if isinstance(error, NonFiniteError)
                     else 2 if isinstance(error, refused) else 1) from None


def configure_process(config: ml_collections.ConfigDict) -> None:
  """Applies the settings of a config that hold for the whole process, before JAX's first
  computation, as `run_experiment` does: `cpu_threads`, `compilation_cache_dir` and, for a run on
  the CPU, `reuse_host_memory`."""
  set_cpu_threads(config.get("cpu_threads", 0))
  set_compilation_cache(config.get("compilation_cache_dir", ""))
  reuse = config.get("reuse_host_memory", True)
  if not isinstance(reuse, bool):
    raise config_lib.ConfigError(f"config.reuse_host_memory must be true or false; got {reuse!r}.")
  if reuse and _runs_on_cpu():
    reuse_host_memory()


def set_cpu_threads(count: int) -> None:
  """Runs XLA's CPU programs on `count` threads instead of one per core (0: XLA's default): small
  models train faster on one, their operations taking about what a hand-off between threads costs.
  It sets `PJRT_NPROC` (unless set), read when JAX starts, so only before JAX's first computation
  (`main` calls it first); not where an accelerator plugin is installed (it reads it too)."""
  if isinstance(count, bool) or not isinstance(count, int) or count < 0:
    raise config_lib.ConfigError(
        f"config.cpu_threads must be a non-negative integer (0: one per core); got {count!r}.")
  if count and _runs_on_cpu():
    os.environ.setdefault("PJRT_NPROC", str(count))


def _runs_on_cpu() -> bool:
  """Whether JAX will compute on the CPU, known without starting it: `JAX_PLATFORMS` names the CPU
  first or, unset, no accelerator plugin is installed."""
  accelerators = (importlib.metadata.entry_points(group="jax_plugins")
                  or importlib.util.find_spec("jax_plugins") or importlib.util.find_spec("libtpu"))
  platforms = os.environ.get("JAX_PLATFORMS", "")
  return platforms.split(",")[0] == "cpu" if platforms else not accelerators


# glibc's mallopt options (malloc.h) and values: M_MMAP_MAX 0 (no block gets a mapping of its
# own), M_TRIM_THRESHOLD the largest int (no heap shrinks), M_TOP_PAD 64 MiB (heaps grow in steps
# that large: address space, costing memory only once written; without it a third of the
# shakespeare_char step's page faults stayed).
_KEEP_FREED_MEMORY = ((-4, 0), (-1, 2**31 - 1), (-2, 64 << 20))


def reuse_host_memory() -> bool:
  """Makes the C library's malloc keep the memory a CPU step frees for the next step: every block
  comes from a heap, and no heap shrinks.

  XLA on a CPU allocates a program's temporary buffer on every run (42 MiB for the
  shakespeare_char transformer's train step). By default glibc maps a block over 32 MiB afresh
  and unmaps it when freed, so each step faults all of its pages in again; with this setting that
  step takes about 0.7x the time on a 2-core VM (docs/devices.md). A block over 64 MiB, the size
  of glibc's heaps for threads other than the main one, is still mapped afresh. The price: the
  process keeps its peak memory, up to one temporary buffer for each of XLA's threads, until it
  exits. `run_experiment` calls it for a run on the CPU (`config.reuse_host_memory`); your own
  program can call it once, at any time. Returns whether it applied: with glibc (Linux);
  elsewhere it changes nothing."""
  if platform.libc_ver()[0] != "glibc":
    return False
  mallopt = ctypes.CDLL(None).mallopt
  return all(mallopt(option, value) == 1 for option, value in _KEEP_FREED_MEMORY)


def set_compilation_cache(directory: str) -> None:
  """Keeps the XLA programs this process compiles in `directory` (JAX's persistent compilation
  cache; "" for none) for later runs to load, unless a directory is already chosen. Every program
  is kept, however quickly it compiled: a small model's run trains in about its compile time."""
  if not isinstance(directory, str):
    raise config_lib.ConfigError(
        f'config.compilation_cache_dir must be a folder path, or "" for none; got {directory!r}.')
  if directory and not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
