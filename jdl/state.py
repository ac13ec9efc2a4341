"""The training state: one pytree that holds everything a train step changes.

`TrainState` keeps the arrays (step, params, model state such as BatchNorm statistics, optimizer
state, base random key) as pytree leaves, and the fixed pieces (the model's `apply` function, the
optimizer, the per-example input shape the model was built for) as static fields. Static fields are
part of the tree structure, so a jitted step specialises on them once and never retraces.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct


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
  `k1, k2, k3 = jax.random.split(rng, 3)`: the variables and the state's base key.

  Compiled as one program, cached per model (jit keys its cache on the model's class and
  attributes): run eagerly, an init dispatches and compiles each small operation on its own. A
  model with unhashable attributes (a list, say) is initialised eagerly, and inside a traced
  function (`jit`, `vmap`) the init is traced into it.
  """
  return _compiled_per_object(_init, model, rng, sample_input)


def initial_optimizer_state(tx: optax.GradientTransformation, params: Params) -> optax.OptState:
  """`tx.init(params)` as one compiled program cached per optimizer object. Its outputs are fresh
  buffers even where a transformation's state starts as the parameters themselves, so donating
  the state never donates one buffer twice."""
  return _compiled_per_object(_tx_init, tx, params)


def _compiled_per_object(fn: Callable[..., Any], static: Any, *args: Any) -> Any:
  """`fn(static, *args)`, compiled once per hashable `static`; run as it is inside a traced
  function (it is compiled with that) or when `static` cannot key a cache."""
  if _traced(args) or not _hashable(static):
    return fn(static, *args)
  return _COMPILED[fn](static, *args)


def _traced(tree: Any) -> bool:
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def _hashable(value: Any) -> bool:
  try:
    hash(value)
  except TypeError:
    return False
  return True


def _init(model: nn.Module, rng: jax.Array, sample_input: jax.Array) -> tuple[Any, jax.Array]:
  init_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
  variables = model.init({"params": init_rng, "dropout": dropout_rng}, sample_input, train=False)
  return variables, state_rng


def _tx_init(tx: optax.GradientTransformation, params: Params) -> optax.OptState:
  return tx.init(params)


_COMPILED = {fn: jax.jit(fn, static_argnums=0) for fn in (_init, _tx_init)}


def count_params(params: Params) -> int:
  """The number of scalar parameters in a pytree."""
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
