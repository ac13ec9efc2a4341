"""The training state: one pytree that holds everything a train step changes.

`TrainState` keeps the arrays (step, params, model state such as BatchNorm statistics, optimizer
state, base random key) as pytree leaves, and the fixed pieces (the model's `apply` function, the
optimizer, the per-example input shape the model was built for) as static fields. Static fields are
part of the tree structure, so a jitted step specialises on them once and never retraces.
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jdl import prng_batching

Params = Any  # a pytree of arrays
ModelState = Mapping[str, Any]  # non-parameter collections, e.g. {"batch_stats": ...}
ApplyFn = Callable[..., Any]


class TrainState(struct.PyTreeNode):
  """Everything a train step reads and returns.

  Attributes:
    step: number of optimizer updates applied so far (int32 scalar).
    params: the model's trainable parameters (the "params" collection).
    model_state: every other variable collection of the model, e.g. `{"batch_stats": ...}`;
      empty for models without mutable state.
    opt_state: the Optax optimizer state.
    rng: the base PRNG key; a step derives its key as `fold_in(rng, step)`, so the key sequence
      depends only on the seed and the step number (which makes resumption exact).
    apply_fn: the model's `apply` (static).
    tx: the Optax gradient transformation (static).
    input_shape: per-example input shape the model was initialised with (static). Steps check
      batches against it while tracing, so a mismatch fails with a clear message, for free.
    input_dtype: dtype of the sample input the model was initialised with (static), e.g.
      "float32" for pixels or "int32" for token ids.
  """

  step: jax.Array
  params: Params
  model_state: ModelState
  opt_state: optax.OptState
  rng: jax.Array
  apply_fn: ApplyFn = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  input_shape: tuple[int, ...] = struct.field(pytree_node=False)
  input_dtype: str = struct.field(pytree_node=False, default="float32")

  def apply_gradients(self, grads: Params, **changes: Any) -> TrainState:
    """Returns the state after one optimizer update with `grads`; `changes` replace other fields."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **changes)

  def variables(self) -> dict[str, Any]:
    """The full variable dict to pass to `apply_fn`: params plus model state."""
    return {"params": self.params, **self.model_state}


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    sample_input: jax.Array | np.ndarray,
    rng: jax.Array,
) -> TrainState:
  """Initialises a model and its optimizer into a fresh `TrainState`.

  Args:
    model: a Flax linen module whose `__call__(x, *, train: bool)` maps a batch to outputs.
    tx: the Optax optimizer.
    sample_input: a batch of inputs (any batch size >= 1) with the shape and dtype the model will
      be trained on; only its shape and dtype are used.
    rng: a PRNG key. It is split into the initialisation key and the state's base key, so the same
      key always gives identical parameters and an identical sequence of dropout keys.

  Returns:
    A `TrainState` at step 0.
  """
  sample_input = _checked_sample(sample_input)
  variables, state_rng = initial_variables(model, rng, sample_input)
  params, model_state = _split_params(variables)
  return _assemble(params, model_state, initial_optimizer_state(tx, params), state_rng, model, tx,
                   sample_input, step=jnp.asarray(np.int32(0)))  # placed: no program to compile


class PendingTrainState:
  """A `TrainState` being initialised on a background thread (`start_train_state`).

  `abstract` is the state's structure now: the same static fields, and `jax.ShapeDtypeStruct`
  leaves with the shapes, dtypes and weak types the values will have. `result()` waits for the
  values. `jdl.fit` accepts one in place of a state: on one device it traces and compiles its
  training program from `abstract` while the initialisation compiles and runs, then trains the
  result (elsewhere it waits for the result first).
  """

  def __init__(self, abstract: TrainState, values: concurrent.futures.Future) -> None:
    self._abstract, self._values = abstract, values

  @property
  def abstract(self) -> TrainState:
    """The state's structure: static fields, and `jax.ShapeDtypeStruct` leaves."""
    return self._abstract

  def done(self) -> bool:
    """Whether the values are ready (or the initialisation failed)."""
    return self._values.done()

  def result(self) -> TrainState:
    """The initialised `TrainState` (waits for it; an initialisation error is raised here)."""
    return self._values.result()


def start_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    sample_input: jax.Array | np.ndarray,
    rng: jax.Array,
) -> PendingTrainState:
  """`create_train_state(model, tx, sample_input, rng)`, computed on a background thread.

  The model's init is traced here, so its mistakes (a shape the model rejects, a bad sample) raise
  here as they would in `create_train_state`; compiling and running it, and the optimizer's init,
  happen on a thread of their own. Passed to `jdl.fit`, the training program compiles from the
  state's shapes meanwhile: for the MNIST-1D CNN on a 2-core CPU the steps start about 0.2 s
  sooner (BUILD_NOTES.md, "Speed"). The values are bitwise `create_train_state`'s.

  The thread sees the process's JAX configuration, not the caller's thread-local contexts (`with
  jax.default_device(...)`, `with jax.enable_x64(...)`): under those, use `create_train_state`.
  Inside a traced function, or for a model or optimizer that cannot be hashed (whose init is not
  compiled; see `initial_variables`), the state is computed right away and returned as done.
  """
  sample_input = _checked_sample(sample_input)
  if _traced((rng, sample_input)) or not (_hashable(model) and _hashable(tx)):
    state = create_train_state(model, tx, sample_input, rng)
    done: concurrent.futures.Future = concurrent.futures.Future()
    done.set_result(state)
    return PendingTrainState(jax.eval_shape(lambda: state), done)
  # Traced once, here: the background call finds the traced program in jit's cache.
  variables, state_rng = _COMPILED[_init, _on_cpu()].trace(model, rng, sample_input).out_info
  params, model_state = _split_params(variables)
  opt_state = _COMPILED[_tx_init, _on_cpu()].trace(tx, params).out_info
  abstract = _assemble(params, model_state, opt_state, state_rng, model, tx, sample_input,
                       step=jax.ShapeDtypeStruct((), jnp.int32))
  return PendingTrainState(abstract, _INIT_THREAD.submit(create_train_state, model, tx,
                                                         sample_input, rng))


def _checked_sample(sample_input: jax.Array | np.ndarray) -> jax.Array:
  sample_input = jnp.asarray(sample_input)
  if sample_input.ndim < 1 or sample_input.shape[0] < 1:
    raise ValueError(
        "sample_input must be a batch with a leading batch dimension of size >= 1; "
        f"got shape {sample_input.shape}."
    )
  return sample_input


def _split_params(variables: Mapping[str, Any]) -> tuple[Params, dict[str, Any]]:
  """`(variables["params"], every other collection)`."""
  model_state = dict(variables)
  return model_state.pop("params"), model_state


def _assemble(params: Params, model_state: ModelState, opt_state: optax.OptState, rng: Any,
              model: nn.Module, tx: optax.GradientTransformation, sample_input: jax.Array,
              *, step: Any) -> TrainState:
  return TrainState(step=step, params=params, model_state=model_state, opt_state=opt_state,
                    rng=rng, apply_fn=model.apply, tx=tx,
                    input_shape=tuple(sample_input.shape[1:]), input_dtype=str(sample_input.dtype))


def initial_variables(model: nn.Module, rng: jax.Array, sample_input: jax.Array
                      ) -> tuple[Any, jax.Array]:
  """`(model.init({"params": k1, "dropout": k2}, sample_input, train=False), k3)` where
  `k1, k2, k3 = jax.random.split(rng, 3)`: the variables and the state's base key, as one
  compiled program cached per model.

  Run eagerly, initialisation dispatches and compiles each small operation on its own: 3 of the
  4 s a MNIST-1D CNN took to initialise on a CPU. Compiled whole, a second state for an equal
  model (same class and attributes) reuses the compilation. The values are bitwise those of
  `jax.jit(model.init)`, and those of the eager `model.init` up to float rounding (XLA fuses an
  initializer's scaling into the random draw: one ulp, in some kernels). On the CPU the program
  runs once, so it is compiled for compile time (`INIT_COMPILER_OPTIONS`): LLVM at `-O1` took
  compiling the CNN's init from about 1.5 s to 0.5 s, and XLA's loop emitters instead of its
  fusion emitters from 0.45 to 0.35 s (the MLP's: 0.30 to 0.21 s). Its random hashes are
  computed one call per dependency level (`jdl.prng_batching`): the CNN's 13 Threefry loops
  become 3, and its init compiles in 0.28-0.29 s instead of 0.43-0.50 s (lowered in 0.06-0.08
  s instead of 0.11-0.12, traced in 0.04-0.05 s more). No value changes (tested across the model
  zoo). A model with unhashable attributes (a list, say) cannot key the cache and is initialised
  eagerly; inside a traced function (`jit`, `vmap`: `jdl.vmap_sweep`) the init is traced into it.
  """
  return _compiled_per_object(_init, model, rng, sample_input)


def initial_optimizer_state(tx: optax.GradientTransformation, params: Params) -> optax.OptState:
  """`tx.init(params)` as one compiled program cached per optimizer object (compiled for compile
  time on the CPU, as `initial_variables`).

  Eagerly, Adam's init compiles one small program per distinct parameter shape (0.3 s for the
  MNIST-1D CNN's five); compiled whole it is one program (0.08-0.1 s to compile here), and its
  outputs are fresh buffers even where a transformation's state starts as the parameters
  themselves (so donating the state never donates one buffer twice). An optimizer that cannot
  be hashed, or a call inside a traced function, runs `tx.init` as it is.
  """
  return _compiled_per_object(_tx_init, tx, params)


def _compiled_per_object(fn: Callable[..., Any], static: Any, *args: Any) -> Any:
  """`fn(static, *args)`, compiled once per hashable `static` (with `INIT_COMPILER_OPTIONS` on the
  CPU); run as it is inside a traced function (it is compiled with that) or when `static` cannot
  key a cache."""
  if _traced(args) or not _hashable(static):
    return fn(static, *args)
  key = (fn, _on_cpu())
  try:
    return _COMPILED[key](static, *args)
  except jax.errors.JaxRuntimeError as error:
    if not key[1] or "compile option" not in str(error):
      raise
    # An XLA without one of the options (a later one may drop its loop emitters): -O1 alone.
    _COMPILED[key] = jax.jit(_PROGRAMS[fn], static_argnums=0,
                             compiler_options=_INIT_FALLBACK_OPTIONS)
    return _COMPILED[key](static, *args)


def _traced(tree: Any) -> bool:
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def _hashable(value: Any) -> bool:
  try:
    hash(value)
  except TypeError:
    return False
  return True


def _on_cpu() -> bool:
  return jax.default_backend() == "cpu"


def _init(model: nn.Module, rng: jax.Array, sample_input: jax.Array) -> tuple[Any, jax.Array]:
  init_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
  variables = model.init({"params": init_rng, "dropout": dropout_rng}, sample_input, train=False)
  return variables, state_rng


def _init_batching_hashes(model: nn.Module, rng: jax.Array, sample_input: jax.Array
                          ) -> tuple[Any, jax.Array]:
  """`_init` with its random hashes merged per dependency level (`jdl.prng_batching`): the same
  values, a third of the hash loops to compile."""
  return prng_batching.batch_random_hashes(functools.partial(_init, model))(rng, sample_input)


def _tx_init(tx: optax.GradientTransformation, params: Params) -> optax.OptState:
  return tx.init(params)


_INIT_FALLBACK_OPTIONS = {"xla_backend_optimization_level": 1}
INIT_COMPILER_OPTIONS = {**_INIT_FALLBACK_OPTIONS, "xla_cpu_use_fusion_emitters": False}
# What is compiled for each function: the init with its random hashes batched.
_PROGRAMS = {_init: _init_batching_hashes, _tx_init: _tx_init}
_COMPILED = {(fn, on_cpu): jax.jit(_PROGRAMS[fn], static_argnums=0,
                                   compiler_options=INIT_COMPILER_OPTIONS if on_cpu else None)
             for fn in (_init, _tx_init) for on_cpu in (False, True)}
_INIT_THREAD = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jdl-init")


def count_params(params: Params) -> int:
  """The number of scalar parameters in a pytree."""
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
