"""Where each array of a training state lives on a mesh: data parallel, FSDP, tensor parallel.

The mesh has three named axes, any of them of size 1:
  "data":   the batch is split over it; the state is replicated along it.
  "fsdp":   the batch is split over it too, and so are parameters and optimizer state (fully
            sharded data parallel: each device holds 1/fsdp of them; XLA gathers a layer's
            parameters where it needs them and reduce-scatters their gradients).
  "tensor": parameters are split along their model dimensions (the MLP's hidden units, the
            attention heads, the vocabulary); the batch is replicated along it.

Parameters name their dimensions with Flax's logical axis names (`nn.with_logical_partitioning`),
mapped to mesh axes by a rule table (`DEFAULT_RULES`, or a config's `sharding_rules`); a dimension
an axis does not divide stays whole. An array of at least `fsdp_min_size` elements left unsplit by
"fsdp" is split along its largest dimension "fsdp" divides. Optimizer state follows the parameter
its path ends with (Adam's moments, an EMA, accumulated gradients); scalars and keys are replicated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdl.state import path_name

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the axes a batch is split over

DEFAULT_RULES: Mapping[str, tuple[str, ...]] = {  # jdl's models' logical axis names -> mesh axes
    "embed": ("fsdp",), "conv_in": ("fsdp",),  # model width; a convolution's input channels
    "mlp": ("tensor",), "heads": ("tensor",), "vocab": ("tensor",), "conv_out": ("tensor",),
    "kv": (), "classes": (), "layers": (),  # a head's width; classes; scanned layers' stack
}
FSDP_MIN_SIZE = 2**14  # smaller unnamed arrays stay replicated: splitting them saves little


def make_mesh(shape: Mapping[str, int] | None = None) -> Mesh:
  """A mesh with axes `MESH_AXES` of the sizes in `shape` (missing axes: 1; one may be -1, the
  devices left over); the default, `{"data": -1}`, puts every device on "data". Devices are taken
  in process order, the same number from each process, so each process's share of a batch lands
  on its own devices."""
  shape = dict(shape or {"data": -1})
  if unknown := set(shape) - set(MESH_AXES):
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh's axes are {MESH_AXES}.")
  sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  devices = jax.devices()
  if sizes.count(-1) > 1 or any(size == 0 or size < -1 for size in sizes):
    raise ValueError(f"mesh sizes must be positive, with at most one -1 (the rest); got {shape}.")
  if -1 in sizes:
    known = math.prod(size for size in sizes if size != -1)
    if len(devices) % known:
      raise ValueError(f"the mesh {shape} cannot fill {len(devices)} devices: "
                       f"{known} does not divide {len(devices)}.")
    sizes[sizes.index(-1)] = len(devices) // known
  count, processes = math.prod(sizes), jax.process_count()
  if count > len(devices):
    raise ValueError(f"the mesh {dict(zip(MESH_AXES, sizes))} needs {count} devices but only "
                     f"{len(devices)} are present ({devices[0].platform}).")
  if count % processes:
    raise ValueError(f"a mesh of {count} devices cannot be spread evenly over {processes} "
                     f"processes; use a multiple of {processes}.")
  chosen = []
  for process in range(processes):
    own = [device for device in devices if device.process_index == process]
    if len(own) < count // processes:
      raise ValueError(f"process {process} has {len(own)} devices; the mesh needs "
                       f"{count // processes} from each process.")
    chosen.extend(own[:count // processes])
  return Mesh(np.array(chosen).reshape(sizes), MESH_AXES)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The axes of `mesh` a batch is split over: those of `BATCH_AXES` it has."""
  return tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)


class ShardingPlan:
  """Shardings of a training state and its batches on `mesh`, whose axes are some of `MESH_AXES`
  (a missing one has size 1). `rules` maps logical axis names to mesh axes (None: `DEFAULT_RULES`;
  a name it lacks is not split); arrays under `fsdp_min_size` elements split only as named."""

  def __init__(self, mesh: Mesh, rules: Mapping[str, tuple[str, ...] | str] | None = None,
               fsdp_min_size: int = FSDP_MIN_SIZE) -> None:
    if not set(mesh.axis_names) <= set(MESH_AXES) or not batch_axes(mesh):
      raise ValueError(f"a mesh's axes must be among {MESH_AXES}, with 'data' or 'fsdp'; got "
                       f"{mesh.axis_names}.")
    self.mesh = mesh
    self.sizes = {axis: int(mesh.shape.get(axis, 1)) for axis in MESH_AXES}
    self.rules = {name: tuple(a for a in _axes_tuple(axes, name) if a in mesh.axis_names)
                  for name, axes in (DEFAULT_RULES if rules is None else rules).items()}
    self.fsdp_min_size = int(fsdp_min_size)
    self.replicated = NamedSharding(mesh, PartitionSpec())
    self.batch_sharding = NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))
    self.batch_devices = self.sizes["data"] * self.sizes["fsdp"]
    self.shards_state = self.sizes["fsdp"] > 1 or self.sizes["tensor"] > 1

  def array_spec(self, shape: tuple[int, ...], names: tuple[str | None, ...] | None = None
                 ) -> PartitionSpec:
    """The PartitionSpec of one array: its names mapped by the rules where the axes divide the
    dimension (each mesh axis used once), then the FSDP default if "fsdp" is still unused."""
    dims: list[tuple[str, ...]] = [() for _ in shape]
    used: set[str] = set()
    if names is not None:
      if len(names) != len(shape):
        raise ValueError(f"logical axis names {names} do not fit an array of shape {shape}.")
      for dim, name in enumerate(names):
        axes = tuple(a for a in self.rules.get(name, ()) if a not in used) if name else ()
        if axes and shape[dim] % math.prod(self.sizes[a] for a in axes) == 0:
          dims[dim] = axes
          used.update(axes)
    fsdp = self.sizes["fsdp"]
    if fsdp > 1 and "fsdp" not in used and math.prod(shape) >= self.fsdp_min_size:
      free = [d for d in range(len(shape))
              if shape[d] % (fsdp * math.prod(self.sizes[a] for a in dims[d])) == 0]
      if free:
        dim = max(free, key=lambda d: (shape[d], -d))
        dims[dim] = ("fsdp", *dims[dim])
    return PartitionSpec(*[axes[0] if len(axes) == 1 else (axes or None) for axes in dims])

  def state_shardings(self, state: Any) -> Any:
    """A tree like `state` (a `TrainState`, or its `jax.eval_shape`) of `NamedSharding`s."""
    names = dict(state.param_axes)
    param_specs: dict[str, tuple[tuple[int, ...], PartitionSpec]] = {}

    def param(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
      name = path_name(path)
      spec = self.array_spec(tuple(leaf.shape), names.get(name))
      param_specs[name] = (tuple(leaf.shape), spec)
      return NamedSharding(self.mesh, spec)

    def unnamed(_: Any, leaf: Any) -> NamedSharding:
      return NamedSharding(self.mesh, self.array_spec(tuple(leaf.shape)))

    def optimizer(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
      parts = path_name(path).split("/")
      for start in range(len(parts)):  # the longest ending of the path that names a parameter
        shape, spec = param_specs.get("/".join(parts[start:]), (None, None))
        if shape == tuple(leaf.shape):
          return NamedSharding(self.mesh, spec)
      return unnamed(path, leaf)

    params = jax.tree_util.tree_map_with_path(param, state.params)
    return state.replace(
        step=self.replicated, rng=self.replicated, params=params,
        model_state=jax.tree_util.tree_map_with_path(unnamed, state.model_state),
        opt_state=jax.tree_util.tree_map_with_path(optimizer, state.opt_state))

  def place_state(self, state: Any) -> Any:
    """`state` laid out as `state_shardings` says (arrays already so laid out stay as they are)."""
    return place(state, self.state_shardings(state))

  def constrain_state(self, state: Any) -> Any:
    """Inside a compiled function: `state` constrained to `state_shardings`."""
    return jax.lax.with_sharding_constraint(state, self.state_shardings(state))

  def describe(self, state: Any) -> str:
    """Per-device bytes of the state's arrays under this plan against replicated, one line."""
    shardings = jax.tree.leaves(self.state_shardings(state))
    leaves = jax.tree.leaves(state)
    full = sum(_local_bytes(leaf, self.replicated) for leaf in leaves)
    local = sum(_local_bytes(leaf, sharding) for leaf, sharding in zip(leaves, shardings))
    return (f"mesh {dict(self.mesh.shape)}: state {local / 2**20:.3g} MiB a device "
            f"({full / 2**20:.3g} MiB replicated)")


def _axes_tuple(axes: tuple[str, ...] | str | None, name: str) -> tuple[str, ...]:
  axes = () if axes in (None, "") else (axes,) if isinstance(axes, str) else tuple(axes)
  if unknown := [axis for axis in axes if axis not in MESH_AXES]:
    raise ValueError(f"sharding rule {name!r} names mesh axes {unknown}; the mesh's axes are "
                     f"{MESH_AXES}.")
  return axes


def _local_bytes(leaf: Any, sharding: NamedSharding) -> float:
  """Bytes of `leaf`'s shard on one device under `sharding`."""
  itemsize = 8 if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else np.dtype(
      leaf.dtype).itemsize
  return float(math.prod(sharding.shard_shape(tuple(leaf.shape))) * itemsize)


def place(tree: Any, shardings: Any) -> Any:
  """Every array of `tree` as a global array laid out by `shardings` (one `NamedSharding`, or a
  tree of them like `tree`): kept where already so; resharded where it is a device array;
  otherwise built from this process's host copy, which in a multi-process run must be the same on
  every process (a fresh state from one seed, a restored checkpoint): no array moves between hosts.
  """
  if isinstance(shardings, NamedSharding):
    shardings = jax.tree.map(lambda _: shardings, tree)
  return jax.tree.map(_place, tree, shardings)


def _place(value: Any, sharding: NamedSharding) -> jax.Array:
  if isinstance(value, jax.Array):
    if value.sharding == sharding:
      return value
    if value.is_fully_addressable and sharding.is_fully_addressable:
      return jax.device_put(value, sharding)
    if not value.is_fully_addressable:
      return jax.jit(lambda x: x, out_shardings=sharding)(value)
  if sharding.is_fully_addressable:
    return jax.device_put(value, sharding)
  if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
    data = _place(np.asarray(jax.random.key_data(value)), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(value))
  host = np.asarray(value)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
