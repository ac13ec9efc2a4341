"""The training state: one pytree of everything a train step changes. The fixed pieces (the model's
`apply`, the optimizer, the input shape) are static fields, part of the tree structure, so a
jitted step specialises on them once and never retraces.
"""

from __future__ import annotations

import functools
import inspect
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jdl.models.layers import recording_axis_names


Params = Any  # a pytree of arrays
ModelState = Mapping[str, Any]  # non-parameter collections, e.g. {"batch_stats": ...}
ApplyFn = Callable[..., Any]
ParamAxes = tuple[tuple[str, tuple[str | None, ...]], ...]  # ((path, names per dimension), ...)


class TrainState(struct.PyTreeNode):
  """Everything a train step reads and returns.

  `step` counts the optimizer updates (int32); `model_state` holds the model's collections other
  than "params" (`{"batch_stats": ...}`); a step's key is `fold_in(rng, step)`, so the keys depend
  only on the seed and the step (resumption is exact). Static: `apply_fn`, `tx`, and the
  per-example `input_shape` and `input_dtype` the model was initialised with ("float32" pixels,
  "int32" token ids; per-leaf tuples for pytree inputs, whose `input_structure` is kept), against
  which steps check batches while tracing, for free; and `param_axes`, the logical axis names the
  model gave its parameters (`nn.with_logical_partitioning`), from which `jdl.sharding` lays them
  out on a mesh.
  """

  step: jax.Array
  params: Params
  model_state: ModelState
  opt_state: optax.OptState
  rng: jax.Array
  apply_fn: ApplyFn = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  input_shape: tuple[int, ...] = struct.field(pytree_node=False)
  input_dtype: Any = struct.field(pytree_node=False, default="float32")
  input_structure: Any = struct.field(pytree_node=False, default=None)
  param_axes: ParamAxes = struct.field(pytree_node=False, default=())

  def apply_gradients(self, grads: Params, **changes: Any) -> TrainState:
    """Returns the state after one optimizer update with `grads`; `changes` replace other fields."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **changes)

  def variables(self) -> dict[str, Any]:
    """The full variable dict to pass to `apply_fn`: params plus model state."""
    return {"params": self.params, **self.model_state}

  def input_specs(self, batch_size: int = 1) -> Any:
    """`jax.ShapeDtypeStruct`s of a batch of `batch_size` model inputs (a pytree for pytrees)."""
    if self.input_structure is None:
      return jax.ShapeDtypeStruct((batch_size, *self.input_shape), self.input_dtype)
    leaves = [jax.ShapeDtypeStruct((batch_size, *shape), dtype)
              for shape, dtype in zip(self.input_shape, self.input_dtype)]
    return jax.tree.unflatten(self.input_structure, leaves)


def model_mode(apply_fn: ApplyFn, train: bool) -> dict[str, bool]:
  """The keyword that tells the model train from eval mode, as its `__call__` names it: `train`
  (jdl's models), `training`, or `deterministic` (Flax's dropout style, the negation); `{}` for a
  model with none of them. A plain function (not a module's `apply`) gets `train`."""
  module = getattr(apply_fn, "__self__", None)
  if not isinstance(module, nn.Module):
    return {"train": train}
  keyword = _mode_keyword(type(module))
  return {} if keyword is None else {keyword: (not train) if keyword == "deterministic" else train}


@functools.lru_cache(maxsize=None)
def _mode_keyword(module_class: type) -> str | None:
  parameters = inspect.signature(module_class.__call__).parameters
  return next((name for name in ("train", "training", "deterministic") if name in parameters),
              None)


def stream_id(name: str) -> int:
  """A stable number >= 2**30 for a stream's name (apart from `jdl.step.AUGMENT_STREAM` etc.)."""
  return (zlib.crc32(name.encode()) & 0x3FFFFFFF) | 0x40000000


def stream_key(key: jax.Array, name: str) -> jax.Array:
  """The key of stream `name` from a step's key: the key itself for "dropout" (so dropout draws
  what it always drew), else `fold_in(key, stream_id(name))`."""
  return key if name == "dropout" else jax.random.fold_in(key, stream_id(name))


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       sample_input: jax.Array | np.ndarray, rng: jax.Array, *,
                       rng_streams: tuple[str, ...] = ("dropout",),
                       shardings: Callable[[TrainState], Any] | None = None) -> TrainState:
  """Initialises a Flax linen `model` (with its `model_mode` keyword, if any) and the optimizer
  `tx` into a fresh `TrainState` at step 0.

  `sample_input` is a batch (any size >= 1) shaped and typed as the training inputs: an array, or
  a pytree of arrays passed to the model as one argument. `rng`, raw or typed, is split into the
  initialisation key and the state's base key, so one key always gives the same parameters and
  step keys. `rng_streams` are the model's random streams at initialisation (`Task.rng_streams`).

  `shardings` maps the state's shapes (`jax.eval_shape`) to every array's sharding, e.g.
  `jdl.sharding.ShardingPlan(mesh).state_shardings`: one program then initialises the state
  straight into that layout, so the whole state never exists on one device. The values are the
  same either way.
  """
  sample_input = _checked_sample(sample_input)

  def init(rng: jax.Array, sample_input: Any) -> TrainState:
    variables, state_rng = initial_variables(model, rng, sample_input, rng_streams)
    params, param_axes = split_logical_axes(variables["params"])
    # What a model sows for inspection ("intermediates") grows every call: not carried over.
    model_state = nn.meta.unbox(
        {k: v for k, v in variables.items() if k not in ("params", "intermediates")})
    leaves, structure = jax.tree.flatten(sample_input)
    shapes = tuple(tuple(leaf.shape[1:]) for leaf in leaves)
    dtypes = tuple(str(leaf.dtype) for leaf in leaves)
    if isinstance(sample_input, jax.Array):  # one array: its shape and dtype, no structure
      shapes, dtypes, structure = shapes[0], dtypes[0], None
    return TrainState(
        step=jnp.asarray(np.int32(0)),  # placed: no program to compile
        params=params, model_state=model_state, opt_state=initial_optimizer_state(tx, params),
        rng=state_rng, apply_fn=model.apply, tx=tx, input_shape=shapes, input_dtype=dtypes,
        input_structure=structure, param_axes=param_axes)

  if shardings is None:
    return init(rng, sample_input)
  layout = shardings(jax.eval_shape(init, rng, sample_input))
  return jax.jit(init, out_shardings=layout)(rng, sample_input)


def _checked_sample(sample_input: Any) -> Any:
  if not jax.tree.leaves(sample_input):
    raise ValueError(f"sample_input holds no arrays; got {type(sample_input).__name__}.")
  try:
    sample_input = jax.tree.map(jnp.asarray, sample_input)
  except TypeError as error:
    raise ValueError(f"sample_input must be an array or a pytree of arrays: {error}") from None
  shapes = [tuple(leaf.shape) for leaf in jax.tree.leaves(sample_input)]
  sizes = {shape[0] if shape else None for shape in shapes}
  if None in sizes or 0 in sizes or len(sizes) != 1:
    raise ValueError(
        "sample_input must be a batch with a leading batch dimension of size >= 1, the same for "
        f"every array; got shape(s) {shapes[0] if len(shapes) == 1 else shapes}.")
  return sample_input


def _compiled_per_object(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn(static, *args)` compiled once per hashable `static` (a model, an optimizer); run as it is
  for an unhashable one (a model with a list attribute) or inside a traced function."""
  compiled = jax.jit(fn, static_argnums=0)

  @functools.wraps(fn)
  def call(static: Any, *args: Any) -> Any:
    try:
      hash(static)
    except TypeError:
      return fn(static, *args)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(args)):
      return fn(static, *args)
    return compiled(static, *args)

  return call


def initial_variables(model: nn.Module, rng: jax.Array, sample_input: Any,
                      rng_streams: tuple[str, ...] = ("dropout",)) -> tuple[Any, jax.Array]:
  """`(model.init(keys, sample_input, <eval mode>), k3)`, `k1, k2, k3 = split(rng, 3)`: `keys` holds
  `k1` for "params", `k2` for "dropout" and `stream_key(k2, name)` for the other `rng_streams`.
  One compiled program per model: run eagerly, an init compiles each operation alone."""
  return _init((model, tuple(rng_streams)), rng, sample_input)


@_compiled_per_object
def _init(static: tuple[nn.Module, tuple[str, ...]], rng: jax.Array, sample_input: Any
          ) -> tuple[Any, jax.Array]:
  model, streams = static
  init_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
  keys = {name: stream_key(dropout_rng, name) for name in ("dropout", *streams)}
  with recording_axis_names():  # jdl's models box their parameters with logical axis names
    variables = model.init({"params": init_rng, **keys}, sample_input,
                           **model_mode(model.apply, train=False))
  return variables, state_rng


@_compiled_per_object
def initial_optimizer_state(tx: optax.GradientTransformation, params: Params) -> optax.OptState:
  """`tx.init(params)` compiled per optimizer: fresh buffers even where a state starts as the
  parameters themselves, so donating the state never donates one buffer twice."""
  return tx.init(params)


def path_name(path: tuple[Any, ...]) -> str:
  """A key path as "a/b/0/c", the form of `TrainState.param_axes` and of `jdl.sharding`."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def split_logical_axes(params: Params) -> tuple[Params, ParamAxes]:
  """`(params without Flax's partitioning boxes, ((path, names), ...))`: the logical axis names of
  every array boxed by `nn.with_logical_partitioning`, keyed by its path; others have no entry."""
  is_box = lambda leaf: isinstance(leaf, nn.Partitioned)
  named = tuple((path_name(path), tuple(leaf.names)) for path, leaf in
                jax.tree_util.tree_leaves_with_path(params, is_leaf=is_box) if is_box(leaf))
  return nn.meta.unbox(params), named


def count_params(params: Params) -> int:
  """The number of scalar parameters in a pytree."""
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
