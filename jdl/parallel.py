"""Runners: the same pure step under jit ("none", `JitRunner`), jit over a device mesh ("shard",
`ShardedRunner`: the single-device program, so BatchNorm statistics and dropout keys are those of
the global batch; the state replicated, or sharded by `jdl.sharding`'s rules over an fsdp or
tensor axis) or pmap ("pmap", `PmapRunner`, with steps and models built with
`axis_name=runner.axis_name`); "auto" is "shard" on more than one device, else "none". Many
hosts: `initialize_distributed` joins the processes, each feeds its own share of every global
batch, and `ShardedRunner` assembles global arrays from the pieces (docs/devices.md).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdl import sharding
from jdl.data.sources import num_rows
from jdl.state import TrainState

PMAP_AXIS = "batch"  # the axis name steps and models use under pmap
LAYOUTS = ("auto", "none", "shard", "pmap")

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]
TrainStep = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
EvalStep = Callable[[TrainState, Batch], Metrics]


class PeerError(RuntimeError):
  """The processes of a multi-process run disagree (config, workdir) or one of them was lost."""


class Runner:
  """A device layout: what the loop needs to place, compile and fetch; as is, plain `jax.jit` on
  the default device (`JitRunner`), which the other layouts override.

  `place_state` lays the state out for the compiled steps, `fetch_state` gives it back usable on
  one device. `place_batch` readies a host batch (this process's share): with `pad`, padded with
  masked examples to a multiple of the device count, else an uneven batch is an error. `compile`
  compiles the steps (the train step donates the state; None stays None); `fetch_metrics` gives
  sums as plain scalars; `place_replicated` copies a tree to every device (resident data), and
  `constrain_batch` / `constrain_state` lay a batch / state out inside a compiled function.
  `state_shardings`, where not None, maps a state's shapes to its layout, for
  `create_train_state(shardings=...)`."""

  layout = "none"
  axis_name: str | None = None  # build steps and models with this
  num_devices = 1  # devices across all processes
  batch_devices = 1  # devices that each take their own part of a batch
  supports_resident = True  # whether whole splits may live on the devices (jdl.resident)
  state_shardings: Callable[[TrainState], Any] | None = None

  def place_state(self, state: TrainState) -> TrainState:
    return jax.device_put(state)

  def fetch_state(self, state: TrainState) -> TrainState:
    return state

  def place_batch(self, batch: Batch, *, pad: bool = False) -> Batch:
    """The host arrays themselves: the compiled step's C++ dispatch copies them for less."""
    del pad
    return dict(batch)

  def compile(self, train_step: TrainStep, eval_step: EvalStep | None
              ) -> tuple[TrainStep, EvalStep | None]:
    return (jax.jit(train_step, donate_argnums=0),
            None if eval_step is None else jax.jit(eval_step))

  def fetch_metrics(self, sums: Metrics) -> Metrics:
    return sums

  def place_replicated(self, tree: Any) -> Any:
    return jax.device_put(tree)

  def constrain_batch(self, batch: Batch) -> Batch:
    return batch

  def constrain_state(self, state: TrainState) -> TrainState:
    return state


def make_runner(layout: str = "auto", *, num_devices: int | None = None,
                batch_size: int | None = None, mesh_shape: Mapping[str, int] | None = None,
                rules: Mapping[str, Any] | None = None,
                fsdp_min_size: int = sharding.FSDP_MIN_SIZE) -> Runner:
  """The runner for `layout` ("auto", "none", "shard" or "pmap") on `num_devices` (default: all;
  per process under pmap). An explicit count is strict: more than are present, or one that does
  not divide the global `batch_size`, is an error; "auto" without it takes the most devices that
  divide `batch_size`, so a default config runs on any machine.

  `mesh_shape` (`jdl.sharding.make_mesh`'s, e.g. `{"fsdp": 8}` or `{"fsdp": 4, "tensor": 2}`)
  asks for a sharded state: layout "shard" over that mesh, the state laid out by `rules` and
  `fsdp_min_size` (`jdl.sharding.ShardingPlan`); it replaces `num_devices`."""
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}.")
  if mesh_shape is not None and (layout not in ("auto", "shard") or num_devices is not None):
    raise ValueError(f"a mesh shape ({dict(mesh_shape)}) needs layout 'shard' or 'auto' and no "
                     f"num_devices; got layout {layout!r}, num_devices={num_devices}.")
  if layout == "auto" and mesh_shape is None:
    count = num_devices or jax.device_count()
    if num_devices is None and batch_size:
      processes = jax.process_count()
      fitting = [d for d in range(processes, count + 1, processes) if batch_size % d == 0]
      count = max(fitting) if fitting else count
    layout, num_devices = ("shard", count) if count > 1 else ("none", None)
  if mesh_shape is not None:
    runner: Runner = ShardedRunner(sharding.make_mesh(mesh_shape), rules=rules,
                                   fsdp_min_size=fsdp_min_size)
  elif layout == "none":
    if num_devices not in (None, 1):
      raise ValueError(f"layout 'none' runs on one device; got num_devices={num_devices}.")
    runner = JitRunner()
  elif layout == "shard":
    if num_devices is not None and num_devices < 1:
      raise ValueError(f"a mesh needs at least one device; got num_devices={num_devices}.")
    runner = ShardedRunner(sharding.make_mesh({"data": num_devices or -1}))
  else:
    runner = PmapRunner(num_devices)
  count = runner.batch_devices
  if batch_size is not None and batch_size % count:
    raise ValueError(
        f"the global batch size {batch_size} is not divisible by the {count} devices that split "
        f"a batch in layout {runner.layout!r}; use a batch size that is a multiple of {count}.")
  return runner


def _split_evenly(batch: Batch, count: int, what: str, *, pad: bool) -> Batch:
  """`batch` padded to a multiple of `count` (with `pad`), or checked to be one."""
  if pad:
    return pad_to_multiple(batch, count)
  size = num_rows(batch)
  if size % count:
    raise ValueError(f"the batch of {size} examples cannot be split evenly over {count} {what}; "
                     f"use a batch size that is a multiple of {count}.")
  return batch


def pad_to_multiple(batch: Batch, multiple: int) -> dict[str, Any]:
  """A host batch padded with zero examples, False in `mask`, to a multiple of `multiple`."""
  batch = jax.tree.map(np.asarray, dict(batch))
  size = num_rows(batch)
  if "mask" not in batch:
    batch["mask"] = np.ones((size,), np.bool_)
  if extra := -size % multiple:
    batch = jax.tree.map(
        lambda v: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)]), batch)
  return batch


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Every array of `tree` copied to every device of `mesh` (a replicated global array)."""
  return sharding.place(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(batch: Batch, mesh: Mesh) -> dict[str, jax.Array]:
  """A batch as global arrays split over the mesh's data and fsdp axes (`jdl.sharding`); `batch`
  is this process's share."""
  split = NamedSharding(mesh, PartitionSpec(sharding.batch_axes(mesh)))
  return jax.tree.map(
      lambda value: jax.make_array_from_process_local_data(split, np.asarray(value)), dict(batch))


def unreplicate(tree: Any) -> Any:
  """The first device's copy of a pmap-replicated tree (arrays with a leading device axis)."""
  return jax.tree.map(lambda x: x[0], tree)


class JitRunner(Runner):
  """Plain `jax.jit` on the default device: `Runner` as it is."""


class ShardedRunner(Runner):
  """`jax.jit` over a mesh with `jdl.sharding`'s axes: the batch split over "data" and "fsdp", the
  state laid out by a `ShardingPlan` of `rules` (replicated on a data-only mesh); multi-process
  too. The steps take the state in the layout it is placed in and keep it (their outputs are
  constrained to it), so donation reuses every buffer."""

  layout = "shard"

  def __init__(self, mesh: Mesh, *, rules: Mapping[str, Any] | None = None,
               fsdp_min_size: int = sharding.FSDP_MIN_SIZE) -> None:
    self.plan = sharding.ShardingPlan(mesh, rules, fsdp_min_size)
    self.mesh, self.replicated = mesh, self.plan.replicated
    self.batch_sharding, self.state_shardings = self.plan.batch_sharding, self.plan.state_shardings
    self.num_devices, self.batch_devices = int(mesh.devices.size), self.plan.batch_devices
    local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    self.local_batch_devices = local * self.batch_devices // self.num_devices

  def place_state(self, state: TrainState) -> TrainState:
    return self.plan.place_state(state)

  def place_batch(self, batch: Batch, *, pad: bool = False) -> Batch:
    what = ("devices" if jax.process_count() == 1 else
            f"local devices of process {jax.process_index()}")
    return shard_batch(_split_evenly(batch, self.local_batch_devices, what, pad=pad), self.mesh)

  def compile(self, train_step: TrainStep, eval_step: EvalStep | None
              ) -> tuple[TrainStep, EvalStep | None]:
    def train(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
      state, sums = train_step(state, self.constrain_batch(batch))
      return self.constrain_state(state), self._replicated(sums)

    def evaluate(state: TrainState, batch: Batch) -> Metrics:
      return self._replicated(eval_step(state, self.constrain_batch(batch)))

    return jax.jit(train, donate_argnums=0), None if eval_step is None else jax.jit(evaluate)

  def _replicated(self, sums: Metrics) -> Metrics:
    return jax.lax.with_sharding_constraint(sums, self.replicated)

  def fetch_metrics(self, sums: Metrics) -> Metrics:
    # This process's copy: in a multi-process run the global array is not addressable as a whole.
    return jax.tree.map(lambda x: x.addressable_data(0), sums)

  def place_replicated(self, tree: Any) -> Any:
    return sharding.place(tree, self.replicated)

  def constrain_batch(self, batch: Batch) -> Batch:
    return jax.lax.with_sharding_constraint(dict(batch), self.batch_sharding)

  def constrain_state(self, state: TrainState) -> TrainState:
    return self.plan.constrain_state(state)


class PmapRunner(Runner):
  """`jax.pmap` over this process's devices with `axis_name=PMAP_AXIS`: state stacked with a
  leading device axis, batch reshaped to [devices, batch / devices, ...]; single-process only.
  pmap is in maintenance mode in JAX and stays for code written for it."""

  layout = "pmap"
  axis_name = PMAP_AXIS
  supports_resident = False  # pmap steps see per-device batches; they stream from the host

  def __init__(self, num_devices: int | None = None) -> None:
    if jax.process_count() > 1:
      raise ValueError(
          f"layout 'pmap' runs within one process; this run has {jax.process_count()} processes. "
          "Use layout 'shard' (the default) for multi-process runs.")
    local = jax.local_devices()
    count = len(local) if num_devices is None else int(num_devices)
    if count < 1 or count > len(local):
      raise ValueError(f"pmap over {count} devices was requested but this process has "
                       f"{len(local)}; ask for between 1 and {len(local)}.")
    self.devices = local[:count]
    self.local_devices = self.num_devices = self.batch_devices = count
    # Arrays with a leading device axis, one slice per device: what pmap consumes and returns.
    self.stacked = NamedSharding(Mesh(np.array(self.devices), (PMAP_AXIS,)),
                                 PartitionSpec(PMAP_AXIS))

  def place_state(self, state: TrainState) -> TrainState:
    count = self.local_devices

    def stack(x: Any) -> jax.Array:
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys: stack their data
        return jax.random.wrap_key_data(stack(jax.random.key_data(x)), impl=jax.random.key_impl(x))
      return jax.device_put(np.broadcast_to(np.asarray(x), (count, *np.shape(x))), self.stacked)

    return jax.tree.map(stack, state)

  def fetch_state(self, state: TrainState) -> TrainState:
    return unreplicate(state)

  def place_batch(self, batch: Batch, *, pad: bool = False) -> Batch:
    count = self.local_devices
    batch = _split_evenly(batch, count, "devices", pad=pad)
    return jax.tree.map(lambda value: jax.device_put(
        np.asarray(value).reshape(count, -1, *np.shape(value)[1:]), self.stacked), dict(batch))

  def compile(self, train_step: TrainStep, eval_step: EvalStep | None
              ) -> tuple[TrainStep, EvalStep | None]:
    train = jax.pmap(train_step, axis_name=PMAP_AXIS, devices=self.devices, donate_argnums=0)
    return train, None if eval_step is None else jax.pmap(eval_step, axis_name=PMAP_AXIS,
                                                          devices=self.devices)

  def fetch_metrics(self, sums: Metrics) -> Metrics:
    return unreplicate(sums)

  def place_replicated(self, tree: Any) -> Any:
    raise NotImplementedError("layout 'pmap' streams batches from the host.")

  def constrain_batch(self, batch: Batch) -> Batch:
    raise NotImplementedError("layout 'pmap' streams batches from the host.")


def initialize_distributed(mode: str = "auto") -> bool:
  """Joins a multi-process JAX run (before any other JAX work) when the environment asks; returns
  whether it did. JAX_COORDINATOR_ADDRESS is process 0's host:port, JAX_NUM_PROCESSES the count,
  JAX_PROCESS_ID this process's index from 0. "auto" joins when the address is set; "on" lets
  JAX's cluster detection (TPU pods, SLURM, Open MPI, Kubernetes) fill in the rest; "off" never."""
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"unknown distributed mode {mode!r}; expected 'auto', 'on' or 'off'.")
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if mode == "off" or (mode == "auto" and not address):
    return False
  kwargs: dict[str, Any] = {"coordinator_address": address} if address else {}
  for variable, name in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if os.environ.get(variable):
      try:
        kwargs[name] = int(os.environ[variable])
      except ValueError:
        raise ValueError(f"{variable} must be an integer; got {os.environ[variable]!r}.") from None
  if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
    # CPU processes need a collectives backend to talk to each other (GPU and TPU ignore this).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # A silently dead peer is noticed by its missing heartbeats; JAX's defaults wait 100 s (300 s).
  jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=PEER_TIMEOUT_SECONDS,
                             shutdown_timeout_seconds=PEER_TIMEOUT_SECONDS)
  return True


PEER_TIMEOUT_SECONDS = 30  # how long the processes wait for a silent peer before all stop


def check_same_everywhere(what: str, value: str) -> None:
  """Raises PeerError on every process unless `value` (a workdir, a config's JSON) is the same on
  all, so a mistyped command line on one host stops the run at once, not by hanging at the end."""
  if jax.process_count() == 1:
    return
  digest = np.frombuffer(hashlib.sha256(value.encode()).digest(), np.uint8)
  digests = np.asarray(multihost_utils.process_allgather(digest)).reshape(jax.process_count(), -1)
  differing = [index for index, row in enumerate(digests) if not np.array_equal(row, digests[0])]
  if differing:
    shown = value if len(value) <= 200 else f"{value[:200]}..."
    raise PeerError(
        f"the processes of this run were started with different {what}: process {differing[0]}'s "
        f"differs from process 0's (process {jax.process_index()} has {shown}). Start every "
        "process with the same command line.")


def raise_if_any_failed(error: Exception | None, what: str) -> None:
  """Raises `error` where it happened and PeerError (naming it and `what`) on the others."""
  failed = np.zeros(1)  # in a single process there is no other to ask
  if jax.process_count() > 1:
    failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None))).reshape(-1)
  if error is not None:
    raise error
  if failed.any():
    raise PeerError(f"process {int(np.argmax(failed))} could not {what}; its own message says "
                    "why. Every process stops.")


_LOST_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Gloo ",
                    "heartbeat timeout", "stopped sending heartbeats", "Broken pipe")


def lost_peer(error: BaseException) -> PeerError | None:
  """A PeerError when `error` (or one it came from) says another process went away mid-collective
  (its connection closed, its heartbeats stopped); None otherwise and in a single process."""
  if jax.process_count() == 1:
    return None
  found = next((cause for cause in reversed(exception_chain(error))  # the innermost that says so
                if any(sign in str(cause) for sign in _LOST_PEER_SIGNS)), None)
  if found is None:
    return None
  first = (str(found).splitlines() or [""])[0][:300]
  return PeerError(
      f"another process of this run was lost ({type(found).__name__}: {first}); process "
      f"{jax.process_index()} stops too. Start every process again with the same command to "
      "resume from the last checkpoint.")


def exception_chain(error: BaseException) -> list[BaseException]:
  """`error` and the exceptions it was raised from or while handling, outermost first."""
  seen, current, chain = set(), error, []
  while current is not None and id(current) not in seen:
    seen.add(id(current))
    chain.append(current)
    current = current.__cause__ or current.__context__
  return chain


def is_main_process() -> bool:
  """True on the process that writes logs, checkpoints and the progress bar (process 0)."""
  return jax.process_index() == 0
