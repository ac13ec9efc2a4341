"""Real faults, injected: unwritable and full checkpoint folders, corrupt arrays, resumes and the
best checkpoint, two runs on one workdir, every checkpoint unusable, bad arguments, TensorBoard
after a resume, a finished run run again, and several processes signalled or lost.

Each test bounds its subprocesses with a timeout, so a hang fails the test instead of the suite.
BUILD_NOTES.md, "Faults", lists what jdl does for each.
"""

import glob
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import jdl
from jdl import experiment, models, runs, writers

from experiments import mnist1d
from tests.checkpoint_test import Crash, _crash_at

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tiny_config(data_dir, overrides=()):
  return jdl.apply_overrides(mnist1d.get_config(), [
      f"data_dir={data_dir}", "model.name=mlp", "model.mlp.hidden=(16,)", "num_steps=60",
      "eval_every_steps=20", "progress=false", "batch_size=96", "eval_batch_size=500",
      "layout=none", *overrides])


def _command(workdir, data_dir, *overrides):
  return [sys.executable, "-m", "experiments.mnist1d", f"--workdir={workdir}",
          f"--config.data_dir={data_dir}", "--config.model.name=mlp", "--config.layout=none",
          "--config.progress=false", "--config.eval_every_steps=20", "--config.batch_size=96",
          *overrides]


def _run(command, env, timeout=120, **kwargs):
  """Runs a command to its end, or fails the test when it takes longer than `timeout`."""
  started = time.perf_counter()
  done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False, **kwargs)
  return done, time.perf_counter() - started


def _error_lines(stderr):
  """The lines of stderr that are not warnings of the libraries underneath."""
  return [line for line in stderr.splitlines()
          if line.strip() and "Warning" not in line and not line.startswith(("W0", "I0", "  "))]


def _mlp_state(hidden=64):
  return jdl.create_train_state(models.MLP(hidden=(hidden,), num_classes=3), optax.adam(1e-2),
                                np.zeros((1, 40), np.float32), jax.random.PRNGKey(0))


def _save(checkpointer, steps_and_accuracies, state=None):
  state = state if state is not None else _mlp_state()
  for step, accuracy in steps_and_accuracies:
    checkpointer.save(state.replace(step=jnp.asarray(step, jnp.int32)),
                      metrics={"test_accuracy": accuracy})
  checkpointer.wait()


# ---------------------------------------------------------------------------------------------
# 1 and 7: a checkpoint that cannot be written ends the run at once, with one line.


def test_checkpoint_folder_that_is_a_file_fails_at_once_with_one_line(tmp_path, mnist1d_data_dir,
                                                                       subprocess_env):
  """WORKDIR/checkpoints a file: the run refuses before training, in one `error:` line naming
  the folder, with exit status 1, and the interpreter exits (no orbax thread left waiting)."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "checkpoints").write_text("not a folder")
  done, seconds = _run(_command(workdir, mnist1d_data_dir, "--config.num_steps=40"),
                       subprocess_env(JAX_PLATFORMS="cpu"))
  assert done.returncode == 1, done.stderr[-2000:]
  errors = _error_lines(done.stderr)
  assert len(errors) == 1 and errors[0].startswith("error: cannot save checkpoints in"), errors
  assert "it is a file, not a folder" in errors[0]
  assert seconds < 60
  assert (workdir / "checkpoints").read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_checkpoint_folder_fails_at_once(tmp_path):
  """A checkpoint folder that cannot be written is refused when the Checkpointer is made, with
  the operating system's reason, before any training; earlier checkpoints still read."""
  directory = tmp_path / "ckpt"
  with jdl.Checkpointer(str(directory)) as checkpointer:
    _save(checkpointer, [(1, 0.5)])
  directory.chmod(0o555)
  try:
    with pytest.raises(jdl.CheckpointWriteError, match=r"cannot save checkpoints in .*Permission"):
      jdl.Checkpointer(str(directory))
    assert jdl.Checkpointer(str(directory), writable=False).steps() == [1]
  finally:
    directory.chmod(0o755)


def test_unwritable_workdir_is_one_clear_error(tmp_path):
  """A workdir that cannot be created (a file in its way) is a WorkdirError naming it."""
  (tmp_path / "file").write_text("")
  with pytest.raises(runs.WorkdirError, match=r"cannot write to the workdir .*file/run"):
    runs.WorkdirLock(str(tmp_path / "file" / "run"))


def _with_file_size_limit(command, kilobytes):
  """`command` run where no file it writes may grow past `kilobytes` KiB: the operating system
  refuses the write (EFBIG), as a full disk does (ENOSPC), under orbax's and tensorstore's own
  writes too. SIGXFSZ is ignored so the write fails instead of killing the process."""
  return ["bash", "-c", f"trap '' XFSZ; ulimit -f {kilobytes}; exec \"$@\"", "bash", *command]


def test_a_write_error_mid_run_ends_it_within_seconds_and_keeps_earlier_checkpoints(
    tmp_path, mnist1d_data_dir, subprocess_env):
  """A run saves checkpoints; resumed where no file may grow past 32 KiB (the operating system
  refuses the write, as a full disk does), its first save fails: the run stops right there with
  one `error:` line naming the step, the cause and the intact earlier checkpoints, exit status 1,
  and those checkpoints still restore."""
  workdir = tmp_path / "run"
  wide = "model.mlp.hidden=(512,)"  # a checkpoint of about 250 KB
  env = subprocess_env(JAX_PLATFORMS="cpu")
  jdl.train_and_evaluate(_tiny_config(mnist1d_data_dir, [wide, "num_steps=40"]), str(workdir))
  before = jdl.Checkpointer(str(workdir / "checkpoints"), writable=False).steps()
  assert before == [20, 40]
  # No compilation cache either: its entries are files, which the limit would cut short.
  limited = _with_file_size_limit(
      _command(workdir, mnist1d_data_dir, f"--config.{wide}", "--config.num_steps=200",
               "--config.eval_batch_size=500"), 32)
  done, seconds = _run(limited, {**env, "JAX_ENABLE_COMPILATION_CACHE": "false"})
  assert done.returncode == 1, done.stderr[-3000:]
  errors = _error_lines(done.stderr)
  assert len(errors) == 1, errors
  assert errors[0].startswith("error: could not save the checkpoint of step 60 in")
  assert "([Errno 27] File too large); training stopped" in errors[0]
  assert errors[0].endswith("The checkpoints saved before it are intact (steps [20, 40]).")
  assert seconds < 90
  checkpointer = jdl.Checkpointer(str(workdir / "checkpoints"), writable=False)
  assert checkpointer.steps() == [20, 40]
  assert int(runs.load_run(str(workdir), checkpoint="latest").state.step) == 40
  assert not glob.glob(str(workdir / "checkpoints" / "*tmp*"))  # the failed save left nothing


def test_a_failed_background_save_is_raised_at_the_next_call_not_lost(tmp_path):
  """The write itself fails (the folder was replaced by a file after the first save): `wait`,
  `save` and `raise_if_failed` raise CheckpointWriteError with the cause; nothing waits forever."""
  directory = tmp_path / "ckpt"
  checkpointer = jdl.Checkpointer(str(directory), keep=3)
  _save(checkpointer, [(1, 0.5)])
  os.rename(directory, tmp_path / "moved")
  directory.write_text("now a file")
  checkpointer.save(_mlp_state().replace(step=jnp.asarray(2, jnp.int32)))
  with pytest.raises(jdl.CheckpointWriteError, match=r"could not save the checkpoint of step 2 .*"
                                                    r"\[Errno 20\] Not a directory"):
    checkpointer.wait()
  with pytest.raises(jdl.CheckpointWriteError):
    checkpointer.save(_mlp_state().replace(step=jnp.asarray(3, jnp.int32)))
  checkpointer.close()  # reported already: closes quietly
  assert os.listdir(tmp_path / "moved" / "1")


# ---------------------------------------------------------------------------------------------
# 2: corrupt array data is reported and the previous good checkpoint used.


@pytest.mark.parametrize("damage", ["one_bit", "64_random_bytes"])
def test_corrupt_array_file_is_reported_and_the_previous_checkpoint_used(tmp_path, damage):
  """One flipped bit, or 64 random bytes, in the middle of the largest array file of the latest
  checkpoint: restoring reports it as unusable (its checksum or its format), moves it aside and
  restores the one before, whose arrays equal what was saved."""
  directory = tmp_path / "ckpt"
  checkpointer = jdl.Checkpointer(str(directory), keep=3)
  state = _mlp_state()
  _save(checkpointer, [(1, 0.5), (2, 0.6)], state)
  checkpointer.close()
  files = [f for f in glob.glob(str(directory / "2" / "**" / "*"), recursive=True)
           if os.path.isfile(f) and os.sep + "d" + os.sep in f]
  largest = max(files, key=os.path.getsize)
  data = bytearray(pathlib.Path(largest).read_bytes())
  middle = len(data) // 2
  if damage == "one_bit":
    data[middle] ^= 0x10
  else:
    data[middle:middle + 64] = np.random.default_rng(0).bytes(64)
  pathlib.Path(largest).write_bytes(bytes(data))

  messages = []
  checkpointer = jdl.Checkpointer(str(directory), keep=3)
  restored = checkpointer.restore_latest(state, log=messages.append)
  assert int(restored.step) == 1
  assert len(messages) == 1 and "checkpoint at step 2 is unusable" in messages[0], messages
  assert "corrupt" in messages[0] or "cannot be read" in messages[0]
  assert checkpointer.steps() == [1]
  assert glob.glob(str(tmp_path / "ckpt_unusable" / "2.*"))
  jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
  checkpointer.close()


def test_checksums_name_the_array_that_changed(tmp_path):
  """The checksum check itself: an array whose saved bytes differ is named."""
  state = _mlp_state(hidden=4)
  sums = jdl.checkpoint.array_checksums(state)
  assert set(sums) >= {"params/Dense_0/kernel", "step"}
  changed = state.replace(params=jax.tree.map(lambda p: p.at[0].add(1e-7), state.params))
  with pytest.raises(jdl.CorruptCheckpointError, match="array params/Dense_0/bias does not"):
    jdl.checkpoint._verify(changed, sums, 7, str(tmp_path))  # pylint: disable=protected-access


# ---------------------------------------------------------------------------------------------
# 3: the metrics that rank checkpoints live with them, so the best survives resumes.


def test_best_checkpoint_survives_two_resumes_and_loads_as_best(tmp_path):
  """keep=1 plus the best: the best checkpoint (step 1) is kept through two later sessions that
  save worse ones (two resumes), and "best" names it, not the latest."""
  workdir = tmp_path / "run"
  directory = str(workdir / runs.CHECKPOINT_DIR)
  for session in ([(1, 0.9), (2, 0.5)], [(3, 0.6)], [(4, 0.4)]):
    with jdl.Checkpointer(directory, keep=1, best_metric="test_accuracy") as checkpointer:
      _save(checkpointer, session)
  reopened = jdl.Checkpointer(directory, keep=1, best_metric="test_accuracy")
  assert reopened.steps() == [1, 4]
  assert reopened.metrics(1) == {"test_accuracy": 0.9}
  config = ml_collections.ConfigDict({"best_metric": "accuracy", "eval_split": "test"})
  assert runs.best_step(str(workdir), config) == 1
  assert int(reopened.restore(_mlp_state(), runs.best_step(str(workdir), config)).step) == 1
  reopened.close()


# ---------------------------------------------------------------------------------------------
# 4: one run per workdir.


def test_second_run_on_a_workdir_is_refused_and_a_dead_holder_is_taken_over(
    tmp_path, mnist1d_data_dir, subprocess_env, capsys):
  """While another process holds the workdir, a run refuses before writing anything, naming the
  holder's host and pid; once that process is killed (SIGKILL: no clean-up), the next run takes
  the stale lock over, says so, and trains."""
  workdir = tmp_path / "run"
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from jdl import runs; "
       f"lock = runs.WorkdirLock({str(workdir)!r}); print('locked', flush=True); time.sleep(300)"],
      cwd=REPO_ROOT, env=subprocess_env(JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    config = _tiny_config(mnist1d_data_dir, ["num_steps=20"])
    with pytest.raises(runs.WorkdirBusyError, match=rf"in use by another run \(host \S+, pid "
                                                   rf"{holder.pid}, started"):
      jdl.train_and_evaluate(config, str(workdir))
    assert sorted(os.listdir(workdir)) == ["jdl.lock"]  # nothing else written
  finally:
    holder.kill()
    holder.wait(timeout=30)
  capsys.readouterr()
  _, history = jdl.train_and_evaluate(config, str(workdir))
  assert "ended without releasing it" in capsys.readouterr().out
  assert [r["step"] for r in history] == [20]
  assert [r["step"] for r in jdl.read_jsonl(str(workdir))] == [20]
  assert not (workdir / "jdl.lock").exists()  # released at the end


# ---------------------------------------------------------------------------------------------
# 5: every checkpoint unusable: refuse, and say how to start over.


def test_every_checkpoint_truncated_refuses_and_says_how_to_start_over(tmp_path, mnist1d_data_dir,
                                                                       capfd):
  """All checkpoints truncated: the run refuses (CheckpointError, exit 2 from the command line)
  instead of starting over beside the old records, and keeps refusing on the next try; with
  resume=false it starts from step 0 and metrics.jsonl holds each step once."""
  workdir = str(tmp_path / "run")
  config = _tiny_config(mnist1d_data_dir, ["num_steps=40"])
  jdl.train_and_evaluate(config, workdir)
  for name in glob.glob(os.path.join(workdir, "checkpoints", "*", "**", "d", "*"), recursive=True):
    with open(name, "r+b") as f:
      f.truncate(3)
  records = pathlib.Path(workdir, "metrics.jsonl").read_text()
  capfd.readouterr()
  for _ in range(2):
    with pytest.raises(jdl.CheckpointError, match=r"holds records of a run up to step 40 but no "
                                                  r"usable checkpoint.*--config.resume=false"):
      jdl.train_and_evaluate(config, workdir)
    assert pathlib.Path(workdir, "metrics.jsonl").read_text() == records
  assert "Event loop is closed" not in "".join(capfd.readouterr())
  assert len(os.listdir(os.path.join(workdir, "checkpoints_unusable"))) == 2
  _, history = jdl.train_and_evaluate(jdl.apply_overrides(config, ["resume=false"]), workdir)
  assert [r["step"] for r in history] == [20, 40]
  assert [r["step"] for r in jdl.read_jsonl(workdir)] == [20, 40]


# ---------------------------------------------------------------------------------------------
# 8: bad arguments are one line and exit 2 before any work; a label out of range is not silent.


@pytest.mark.parametrize("override, message", [
    ("num_steps=-5", "config.num_steps must be an integer >= 0"),
    ("num_epochs=-1", "config.num_epochs must be an integer >= 0"),
    ("eval_every_steps=-10", "config.eval_every_steps must be an integer >= 0"),
    ("model.name=nope", "unknown model 'nope'"),
    ("optimizer.name=nope", "unknown optimizer 'nope'"),
])
def test_bad_config_is_refused_before_any_work(tmp_path, override, message):
  """Negative counts and unknown names are ConfigErrors raised before the workdir is created."""
  workdir = tmp_path / "run"
  with pytest.raises(jdl.ConfigError, match=message):
    experiment.run_experiment(mnist1d.get_config, [f"--workdir={workdir}",
                                                   f"--config.{override}"], name="mnist1d")
  assert not workdir.exists()


def test_workdir_refusals_are_one_line_and_exit_2(tmp_path, mnist1d_data_dir, monkeypatch,
                                                  capsys):
  """resume=false on a workdir with checkpoints, and another seed on it, end `main` with one
  `error:` line and exit status 2, the workdir untouched."""
  workdir = tmp_path / "run"
  arguments = _command(workdir, mnist1d_data_dir, "--config.num_steps=20")[3:]
  experiment.run_experiment(mnist1d.get_config, arguments, name="mnist1d")
  saved = (workdir / "config.json").read_text()
  for extra, message in (("--config.resume=false", "already holds checkpoints"),
                         ("--config.seed=1", "another config (seed: 0 there, 1 now)")):
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["mnist1d", *arguments, extra])
    with pytest.raises(SystemExit) as exited:
      experiment.main(mnist1d.get_config, name="mnist1d")
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
  assert (workdir / "config.json").read_text() == saved


def test_fit_refuses_negative_counts_at_once():
  x = np.zeros((8, 3), np.float32)
  source = jdl.data.ArraySource(x, np.zeros(8, np.int32), 4, shuffle=False)
  state = jdl.create_train_state(models.MLP(hidden=(4,), num_classes=2), optax.sgd(0.1), x[:1],
                                 jax.random.PRNGKey(0))
  train_step, eval_step = jdl.make_steps()
  for arguments in ({"num_epochs": -1}, {"num_steps": -5},
                    {"num_steps": 4, "eval_every_steps": -10}):
    with pytest.raises(ValueError, match="must be >= 1"):
      jdl.fit(state, train_step, eval_step, source, source, progress=False, **arguments)


def test_a_label_out_of_range_in_your_own_loop_gives_nan_not_a_wrong_loss():
  """Label -1 (or num_classes) in a user's loop: the step's loss is NaN, and the non-finite
  watch's metrics name the step, where indexing would give a finite wrong loss."""
  x = np.ones((4, 3), np.float32)
  state = jdl.create_train_state(models.MLP(hidden=(4,), num_classes=2), optax.sgd(0.1), x[:1],
                                 jax.random.PRNGKey(0))
  train_step = jax.jit(jdl.make_train_step(jdl.tasks.classification(), check_finite=True))
  for bad in (-1, 2):
    _, sums = train_step(state, {"input": x, "label": np.array([0, 1, bad, 0], np.int32)})
    assert np.isnan(float(sums["loss_sum"]))
    assert int(sums["nonfinite_step"]) == 1
  _, sums = train_step(state, {"input": x, "label": np.array([0, 1, 1, 0], np.int32)})
  assert np.isfinite(float(sums["loss_sum"]))
  probabilities = jax.nn.softmax(jnp.ones((2, 3)))
  assert np.isnan(jdl.cross_entropy_from_probabilities(probabilities, jnp.array([0, -1]))[1])


# ---------------------------------------------------------------------------------------------
# 9 and 10: TensorBoard after a resume; a finished run run again.


def _scalar_steps(workdir, tag):
  from tensorboard.compat.proto import event_pb2  # pylint: disable=import-outside-toplevel

  steps = []
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):
    for record in writers._read_records(path):  # pylint: disable=protected-access
      event = event_pb2.Event.FromString(record)
      steps += [event.step for value in event.summary.value if value.tag == tag]
  return sorted(steps)


def test_tensorboard_holds_each_step_once_after_a_resume_and_a_finished_run_reports(
    tmp_path, mnist1d_data_dir, capsys):
  """A crash after the record of step 40 (checkpoint at 20 only), a resume to 60: TensorBoard and
  metrics.jsonl hold steps 20, 40, 60 once each, the config text once. The same command again
  trains nothing, prints the final accuracy of step 60 and how to train more; "best" loads the
  checkpoint with the best accuracy among those kept."""
  workdir = str(tmp_path / "run")
  config = _tiny_config(mnist1d_data_dir, ["checkpoint_min_seconds=1000"])
  with pytest.raises(Crash):
    jdl.train_and_evaluate(config, workdir, hooks=[_crash_at(40)])
  assert jdl.Checkpointer(os.path.join(workdir, "checkpoints"), writable=False).steps() == [20]
  assert _scalar_steps(workdir, "train_loss") == [20, 40]
  _, history = jdl.train_and_evaluate(config, workdir)
  assert [r["step"] for r in history] == [40, 60]
  assert _scalar_steps(workdir, "train_loss") == [20, 40, 60]
  assert _scalar_steps(workdir, "config") == [0]
  assert [r["step"] for r in jdl.read_jsonl(workdir)] == [20, 40, 60]

  capsys.readouterr()
  state, again = jdl.train_and_evaluate(config, workdir)
  printed = capsys.readouterr().out
  assert int(state.step) == 60 and again == [history[-1]]
  assert f"final test accuracy: {history[-1]['test_accuracy']:.4f}" in printed
  assert "is complete (step 60 of 60)" in printed and "raise --config.num_steps" in printed
  assert [r["step"] for r in jdl.read_jsonl(workdir)] == [20, 40, 60]
  assert _scalar_steps(workdir, "train_loss") == [20, 40, 60]

  checkpointer = jdl.Checkpointer(os.path.join(workdir, "checkpoints"), writable=False)
  kept = {step: checkpointer.metrics(step)["test_accuracy"] for step in checkpointer.steps()}
  best = runs.load_run(workdir, checkpoint="best")
  assert best.step == max(kept, key=lambda step: (kept[step], step))


# ---------------------------------------------------------------------------------------------
# 6: several processes (2 on loopback, 2 CPU devices each) agree, stop together, resume together.


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_processes(workdirs, data_dir, subprocess_env, *overrides, devices=2):
  """Two processes of one run on loopback (process i in workdirs[i]) with `devices` CPU devices
  each, as a cluster starts them."""
  address = f"127.0.0.1:{_free_port()}"
  env = {k: v for k, v in subprocess_env(devices).items() if not k.startswith("JAX_")}
  env["JAX_COMPILATION_CACHE_DIR"] = os.environ["JAX_COMPILATION_CACHE_DIR"]
  processes = []
  for rank, workdir in enumerate(workdirs):
    command = [*_command(workdir, data_dir, *overrides), "--config.layout=shard",
               "--config.eval_batch_size=500"]
    processes.append(subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**env, "JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2",
             "JAX_PROCESS_ID": str(rank)}))
  return processes


def _finish(processes, timeout):
  """`[(returncode, stdout, stderr)]` once every process has ended; kills them all at `timeout`
  seconds (the test then fails on their return codes)."""
  deadline = time.time() + timeout
  results = []
  for process in processes:
    try:
      out, err = process.communicate(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
      for other in processes:
        other.kill()
      out, err = process.communicate()
    results.append((process.returncode, out, err))
  return results


def _wait_for_records(workdir, processes, seconds=180):
  records = pathlib.Path(workdir, "metrics.jsonl")
  deadline = time.time() + seconds
  while not (records.exists() and records.stat().st_size) and time.time() < deadline:
    assert all(p.poll() is None for p in processes), _finish(processes, 10)
    time.sleep(0.2)


FSDP_OVER_TWO_PROCESSES = ("--config.mesh.fsdp=8", "--config.fsdp_min_size=64",
                           "--config.model.mlp.hidden=(128, 128)")


def test_sigterm_to_one_of_two_processes_stops_both_and_fsdp_resumes_to_the_uninterrupted_run(
    tmp_path, mnist1d_data_dir, subprocess_env):
  """Two processes of four CPU devices each, parameters and optimizer state split over all
  eight (FSDP). SIGTERM to process 1 only: both stop after the same step, save that one sharded
  checkpoint together and exit with 143; the same command on both then resumes from it and
  finishes with the parameters of a run that was never interrupted."""
  workdir, straight = str(tmp_path / "run"), str(tmp_path / "straight")
  processes = _start_processes([workdir, workdir], mnist1d_data_dir, subprocess_env,
                               *FSDP_OVER_TWO_PROCESSES, "--config.num_steps=1000000", devices=4)
  _wait_for_records(workdir, processes)
  processes[1].send_signal(signal.SIGTERM)
  (code0, _, err0), (code1, _, err1) = _finish(processes, 120)
  assert code0 == code1 == 128 + signal.SIGTERM, (err0[-2000:], err1[-2000:])
  steps = jdl.Checkpointer(os.path.join(workdir, "checkpoints"), writable=False).steps()
  assert f"stopped by SIGTERM after step {steps[-1]};" in err1
  assert f"stopped by SIGTERM (to process 1) after step {steps[-1]};" in err0

  total = f"--config.num_steps={steps[-1] + 10}"
  for run in (workdir, straight):
    finished = _finish(_start_processes([run, run], mnist1d_data_dir, subprocess_env,
                                        *FSDP_OVER_TWO_PROCESSES, total, devices=4), 180)
    assert [code for code, _, _ in finished] == [0, 0], [err[-2000:] for _, _, err in finished]
    assert f"after {steps[-1] + 10} steps" in finished[0][1]
    if run == workdir:
      assert f"resuming from the checkpoint of step {steps[-1]}" in finished[0][1]
  resumed, uninterrupted = (runs.load_run(run).state for run in (workdir, straight))
  assert int(resumed.step) == int(uninterrupted.step) == steps[-1] + 10
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               (resumed.params, resumed.opt_state), (uninterrupted.params, uninterrupted.opt_state))


def test_processes_that_disagree_or_lose_a_peer_stop_with_a_clear_error(
    tmp_path, mnist1d_data_dir, subprocess_env):
  """Processes started with different workdirs refuse at the start, each naming its own, before
  writing anything; when one process of a run is killed (SIGKILL), the other ends within a
  bounded time (jdl's PEER_TIMEOUT_SECONDS) saying that another process was lost."""
  first, second = str(tmp_path / "a"), str(tmp_path / "b")
  results = _finish(_start_processes([first, second], mnist1d_data_dir, subprocess_env,
                                     "--config.num_steps=20"), 120)
  for rank, (code, _, err) in enumerate(results):
    assert code == 1, err[-2000:]
    mine = (first, second)[rank]
    assert f"started with different workdirs: process 1's differs from process 0's (process " \
           f"{rank} has {mine})" in err
  assert not os.path.exists(first) and not os.path.exists(second)

  workdir = str(tmp_path / "run")
  processes = _start_processes([workdir, workdir], mnist1d_data_dir, subprocess_env,
                               "--config.num_steps=1000000")
  _wait_for_records(workdir, processes)
  processes[1].kill()
  started = time.time()
  (code, _, err), _ = _finish(processes, 120)
  assert code != 0 and time.time() - started < 2 * jdl.parallel.PEER_TIMEOUT_SECONDS + 10
  # jdl's own line when the collective in flight fails at once; JAX's when only the missed
  # heartbeats tell (the process is then inside a compiled step, beyond Python's reach).
  assert ("error: another process of this run was lost" in err
          or "This most likely indicates that another task died" in err), err[-3000:]
