"""Pure train and eval steps for any task.

`make_train_step(task)` and `make_eval_step(task)` bind the fixed pieces and return plain
functions of `(state, batch)` that run under `jax.jit`, sharded jit, and `jax.pmap` with
`axis_name` set. A batch is any pytree; `mask` marks real examples (loss and metrics cover only
those), and mixup's `mix_label`, `mix_weight` blend the losses on two labels (docs/training.md).
With `axis_name`, the loss is normalised by the example count summed over the axis and gradients
are summed, which is the gradient of the global batch's mean loss however padding is spread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jdl import losses as losses_lib
from jdl import metrics as metrics_lib
from jdl import tasks as tasks_lib
from jdl.state import Params, TrainState, model_mode, stream_key

Batch = Any  # a pytree; see `jdl.tasks`
Metrics = metrics_lib.Metrics
TrainStepFn = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
EvalStepFn = Callable[[TrainState, Batch], Metrics]
AugmentFn = Callable[[jax.Array, Batch], Batch]
AdversaryFn = Callable[[Callable[..., Any], Mapping[str, Any], jax.Array, Batch], Batch]

# Folded into a key for a stream of its own: the step's key for augmentation (dropout keeps the key
# itself) and for the adversary (PGD's random start, say); the state's base key for evaluation.
AUGMENT_STREAM = 1
ADVERSARY_STREAM = 2
EVAL_STREAM = 3


def check_compute_dtype(compute_dtype: Any) -> jnp.dtype | None:
  """`compute_dtype` as a floating dtype (None stays None). "auto" is bfloat16 on GPUs and TPUs
  and float32 on CPUs, whose bfloat16 arithmetic is slower. float16 is refused: its narrow range
  needs loss scaling, which bfloat16 (float32's range) does not."""
  if compute_dtype is None:
    return None
  if compute_dtype == "auto":
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
  try:
    dtype = jnp.dtype(compute_dtype)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        "compute_dtype must be a floating dtype such as ('float32', 'bfloat16', 'auto'); got "
        f"{compute_dtype!r}.")
  if dtype == jnp.float16:
    raise ValueError("compute_dtype float16 needs loss scaling to keep small gradients from "
                     "underflowing; use bfloat16 (float32's range, no scaling) or \"auto\".")
  return dtype


def cast_floating(tree: Any, dtype: jnp.dtype | None) -> Any:
  """`tree` with every floating array cast to `dtype` (integer arrays untouched); None: as is."""
  if dtype is None:
    return tree
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def _apply_in(compute_dtype: jnp.dtype | None, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`apply_fn` computing in `compute_dtype`, outputs in float32, model state in its own dtypes."""
  if compute_dtype is None:
    return apply_fn

  def apply_in_compute_dtype(variables, inputs, **kwargs):
    params = cast_floating(variables["params"], compute_dtype)
    result = apply_fn({**variables, "params": params}, cast_floating(inputs, compute_dtype),
                      **kwargs)
    if "mutable" not in kwargs:
      return cast_floating(result, jnp.float32)
    outputs, new_state = result
    new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), dict(new_state),
                             {k: variables[k] for k in new_state})
    return cast_floating(outputs, jnp.float32), new_state

  return apply_in_compute_dtype


def make_train_step(task: tasks_lib.Task | None = None, *,
                    weight_penalty: Callable[[Params], jax.Array] | None = None,
                    axis_name: str | None = None, augment: AugmentFn | None = None,
                    check_finite: bool = False, gradient_norms: bool = False,
                    compute_dtype: Any = None, adversary: AdversaryFn | None = None,
                    microbatches: int = 1) -> TrainStepFn:
  """Returns a pure train step `(state, batch) -> (state, metric states)`.

  Its key is `fold_in(state.rng, state.step)` (and the device index under `axis_name`); the task's
  random streams get `jdl.state.stream_key(key, name)`, augmentation and the adversary the key
  folded with `AUGMENT_STREAM` and `ADVERSARY_STREAM`, so runs are reproducible and resumable.

  `task` None is `jdl.tasks.classification()`; `weight_penalty(params)` is added to the mean loss
  (`losses.make_weight_penalty`); `axis_name` is the mapped axis under `pmap`/`shard_map`.
  The task's `prepare` (uint8 pixels to [0, 1], say) runs first, then `augment(key, batch)`
  (`jdl.augment.make_augment`) on the device, then `adversary(apply_fn, variables, key, batch)`
  (`jdl.analysis.adversarial.make_adversary`), not differentiated through.
  `check_finite` adds the non-finite watch `jdl.fit` acts on: the first step whose loss (or, with
  `gradient_norms`, gradient, naming the parameter) was NaN or infinite. `gradient_norms` reports
  `grad_norm` (mean over steps), `grad_norm_max` and `param_norm`. `compute_dtype` None computes
  in the parameters' dtype; bfloat16 is mixed precision (bfloat16 passes; float32 parameters,
  gradients, optimizer state and loss). `microbatches` accumulates gradients: the batch (a
  multiple of it) runs as this many parts in one compiled loop, their gradients summed into the
  whole batch's (equal up to float rounding, without batch statistics) and reduced across devices
  once; each part's random streams fold in its index."""
  task = _checked_task(task)
  compute_dtype = check_compute_dtype(compute_dtype)
  if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
    raise ValueError(f"microbatches must be an integer >= 1; got {microbatches!r}.")

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    batch = task.prepared(batch)
    _check_inputs(task, batch, state)
    mode = model_mode(state.apply_fn, train=True)
    apply_fn = _apply_in(compute_dtype, state.apply_fn)
    key = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
      key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    if augment is not None:
      batch = augment(jax.random.fold_in(key, AUGMENT_STREAM), batch)
    if adversary is not None:
      batch = jax.lax.stop_gradient(adversary(
          apply_fn, state.variables(), jax.random.fold_in(key, ADVERSARY_STREAM), batch))
    rngs = {name: stream_key(key, name) for name in task.rng_streams}
    num_shards = 1 if axis_name is None else jax.lax.psum(1, axis_name)
    mutable = list(state.model_state)

    def gradients(model_state, part, rngs, whole: bool):
      """Gradients, metric states and model state of one batch (`whole`: of the mean loss and
      the penalty) or one micro-batch (of its summed loss; `accumulate` scales once)."""
      loss_fn = _mixed_loss(task.loss, part)

      def objective(params: Params):
        outputs, new_model_state = apply_fn({"params": params, **model_state},
                                            task.model_inputs(part), rngs=rngs, mutable=mutable,
                                            **mode)
        loss, sums = _loss_and_sums(loss_fn(outputs, part), task, part, axis_name)
        if not whole:
          loss = sums["loss_sum"]
        elif weight_penalty is not None:
          # Each shard adds its share, so the psum of gradients counts the penalty once.
          loss = loss + weight_penalty(params) / num_shards
        return loss, (outputs, sums, new_model_state)

      (_, (outputs, sums, new_model_state)), grads = jax.value_and_grad(
          objective, has_aux=True)(state.params)
      return grads, _with_task_metrics(task, sums, outputs, part), dict(new_model_state)

    def accumulate():
      """The batch as `microbatches` parts in one loop: one gradient, as of the whole batch."""
      sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
      if any(size % microbatches for size in sizes):
        raise ValueError(
            f"a batch of {sorted(sizes)} examples cannot be split into {microbatches} equal "
            "micro-batches; use a batch size that is a multiple of microbatches.")
      parts = jax.tree.map(lambda x: x.reshape(microbatches, -1, *x.shape[1:]), batch)
      first = jax.tree.map(lambda x: x[0], parts)

      def body(carry, indexed):
        total, sums, model_state = carry
        index, part = indexed
        part_rngs = {name: jax.random.fold_in(k, index) for name, k in rngs.items()}
        grads, part_sums, model_state = gradients(model_state, part, part_rngs, whole=False)
        return (jax.tree.map(jnp.add, total, grads), metrics_lib.merge_metrics(sums, part_sums),
                model_state), None

      zero_sums = metrics_lib.zero_metrics(jax.eval_shape(
          lambda: gradients(state.model_state, first, rngs, whole=False)[1]))
      zero_grads = jax.tree.map(jnp.zeros_like, state.params)
      (grads, sums, model_state), _ = jax.lax.scan(
          body, (zero_grads, zero_sums, dict(state.model_state)),
          (jnp.arange(microbatches), parts))
      count = sums["count"] if axis_name is None else jax.lax.psum(sums["count"], axis_name)
      grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1).astype(g.dtype), grads)
      if weight_penalty is not None:
        penalty = jax.grad(weight_penalty)(state.params)
        grads = jax.tree.map(lambda g, p: g + p / num_shards, grads, penalty)
      return grads, sums, model_state

    grads, metrics, new_model_state = (
        gradients(state.model_state, batch, rngs, whole=True) if microbatches == 1
        else accumulate())
    if axis_name is not None:
      grads = jax.lax.psum(grads, axis_name)
      metrics = metrics_lib.reduce_over_axis(metrics, axis_name)
    squares: list[jax.Array] = []
    if gradient_norms:  # after the psum: the norms of the global batch's gradient
      squares = [jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)]
      metrics = {**metrics, **_norm_metrics(squares, state.params)}
    if check_finite:  # after the psum, so every device agrees
      metrics = {**metrics, **metrics_lib.nonfinite_metrics(state.step, metrics["loss_sum"],
                                                            squares)}
    return state.apply_gradients(grads, model_state=new_model_state), metrics

  return train_step


def make_eval_step(task: tasks_lib.Task | None = None, *, axis_name: str | None = None,
                   compute_dtype: Any = None) -> EvalStepFn:
  """Returns a pure eval step `(state, batch) -> metric states`, the model in inference mode and
  the task's `eval_loss` (if any) its loss. Random streams get keys from `fold_in(state.rng,
  EVAL_STREAM)`, so a model that samples (a VAE) is evaluated the same way every time."""
  task = _checked_task(task).for_evaluation()
  compute_dtype = check_compute_dtype(compute_dtype)

  def eval_step(state: TrainState, batch: Batch) -> Metrics:
    batch = task.prepared(batch)
    _check_inputs(task, batch, state)
    key = jax.random.fold_in(state.rng, EVAL_STREAM)
    rngs = {name: stream_key(key, name) for name in task.rng_streams}
    outputs = _apply_in(compute_dtype, state.apply_fn)(
        state.variables(), task.model_inputs(batch), rngs=rngs,
        **model_mode(state.apply_fn, train=False))
    _, metrics = _loss_and_sums(task.loss(outputs, batch), task, batch, None)
    metrics = _with_task_metrics(task, metrics, outputs, batch)
    if axis_name is not None:
      metrics = metrics_lib.reduce_over_axis(metrics, axis_name)
    return metrics

  return eval_step


def _checked_task(task: tasks_lib.Task | None) -> tasks_lib.Task:
  if task is None:
    return tasks_lib.classification()
  if not isinstance(task, tasks_lib.Task):
    raise TypeError(
        f"the step takes a jdl.tasks.Task; got {type(task).__name__}. Wrap a loss of (outputs, "
        "batch) as jdl.Task(loss=...), or a loss of (outputs, labels) as "
        "jdl.tasks.classification(loss) or jdl.tasks.regression(loss).")
  return task


def _loss_and_sums(value: Any, task: tasks_lib.Task, batch: Batch, axis_name: str | None
                   ) -> tuple[jax.Array, Metrics]:
  """The mean loss to differentiate (over the unmasked examples of the global batch) and the
  metric states of the loss and of the auxiliary values of the task's loss `value`."""
  mask = tasks_lib.batch_mask(batch)
  batch_size = int(jax.tree.leaves(task.model_inputs(batch))[0].shape[0])
  losses, aux = value if isinstance(value, tuple) else (value, {})
  losses = jnp.asarray(losses, jnp.float32)
  if losses.ndim == 0:  # the batch's mean loss already: weigh it by the batch's real examples
    count = jnp.asarray(float(batch_size)) if mask is None else jnp.sum(
        mask.reshape(mask.shape[0], -1).any(axis=1).astype(jnp.float32))
    sums = {"count": count.astype(jnp.int32), "loss_sum": losses * count}
  else:
    if losses.shape[0] != batch_size:
      raise ValueError(
          f"the loss returned shape {losses.shape}, but the batch has {batch_size} examples: a "
          "task's loss gives one value per example (or per position), or one scalar.")
    sums = metrics_lib.loss_metrics(losses, mask)
  count = sums["count"].astype(jnp.float32)
  total = count if axis_name is None else jax.lax.psum(count, axis_name)
  if not isinstance(aux, Mapping):
    raise ValueError(f"a task's loss returns losses or (losses, aux) with aux a dict of named "
                     f"values; got aux of type {type(aux).__name__}.")
  for name, term in aux.items():
    if name in ("loss", "count") or not isinstance(name, str):
      raise ValueError(f"auxiliary loss term name {name!r} is reserved or not a string.")
    term = jnp.asarray(term, jnp.float32)
    if term.ndim == 0:  # a per-batch value: averaged over batches
      sums[f"{name}_sum"] = jax.lax.stop_gradient(term)
      sums[f"{name}_count"] = jnp.ones((), jnp.int32)
      continue
    keep = metrics_lib.broadcast_mask(mask, term.shape).astype(jnp.float32)
    sums[f"{name}_sum"] = jax.lax.stop_gradient(jnp.sum(term * keep))
    if term.shape != losses.shape:  # its own count where it is not the loss's
      sums[f"{name}_count"] = jnp.sum(keep).astype(jnp.int32)
  return sums["loss_sum"] / jnp.maximum(total, 1.0), sums


def _with_task_metrics(task: tasks_lib.Task, metrics: Metrics, outputs: Any, batch: Batch
                       ) -> Metrics:
  for metric in task.metrics:
    extra = metric(outputs, batch, tasks_lib.batch_mask(batch))
    if clash := sorted(set(extra) & set(metrics)):
      raise ValueError(f"metric {getattr(metric, '__name__', metric)!r} returned {clash}, which "
                       "another metric (or the loss) already reports; give its states other names.")
    metrics = {**metrics, **extra}
  return metrics


def _norm_metrics(gradient_squares: Sequence[jax.Array], params: Params) -> Metrics:
  grad_norm = jnp.sqrt(sum(gradient_squares, jnp.zeros(())))
  param_norm = jnp.sqrt(sum((jnp.sum(jnp.square(p.astype(jnp.float32)))
                             for p in jax.tree.leaves(params)), jnp.zeros(())))
  one = jnp.ones((), jnp.int32)
  return {"grad_norm_sum": grad_norm, "grad_norm_count": one, "grad_norm_max": grad_norm,
          "param_norm_sum": param_norm, "param_norm_count": one}


def _mixed_loss(loss_fn: tasks_lib.TaskLossFn, batch: Batch) -> tasks_lib.TaskLossFn:
  """`loss_fn`, or its mixup blend when the batch carries `mix_label` and `mix_weight`: the loss
  on `label` weighted by `mix_weight` plus the loss with `mix_label` as the label."""
  if not isinstance(batch, Mapping) or "mix_label" not in batch:
    return loss_fn
  if "mix_weight" not in batch:
    raise ValueError("a batch with 'mix_label' needs 'mix_weight' (the weight of 'label') too.")
  weight = batch["mix_weight"].astype(jnp.float32)
  mixed_batch = {**batch, "label": batch["mix_label"]}

  def blended(outputs: Any, batch: Batch) -> jax.Array:
    losses, other = loss_fn(outputs, batch), loss_fn(outputs, mixed_batch)
    if isinstance(losses, tuple):  # auxiliary terms of the first label only
      return weight * losses[0] + (1.0 - weight) * other[0], losses[1]
    return weight * losses + (1.0 - weight) * other

  return blended


def _check_inputs(task: tasks_lib.Task, batch: Batch, state: TrainState) -> None:
  """Checks, while tracing (free), a batch's model inputs against those the model was built for."""
  got_leaves, got_structure = jax.tree.flatten(task.model_inputs(batch))
  want_leaves, want_structure = jax.tree.flatten(state.input_specs())
  if got_structure != want_structure:
    raise ValueError(f"the model's inputs have structure {got_structure}, but the model was "
                     f"initialised with {want_structure}.")
  sizes = {leaf.shape[0] if leaf.ndim else 0 for leaf in got_leaves}
  if 0 in sizes:
    raise ValueError(f"empty batch: model inputs of shapes {[tuple(x.shape) for x in got_leaves]};"
                     " need at least one example.")
  if len(sizes) != 1:
    raise ValueError(f"the model's inputs have shapes {[tuple(x.shape) for x in got_leaves]}; "
                     "every input needs the same leading batch dimension.")
  for got, want in zip(got_leaves, want_leaves):
    if tuple(got.shape[1:]) != tuple(want.shape[1:]):
      raise ValueError(
          f"input shape {tuple(got.shape[1:])} (per example, batch shape {tuple(got.shape)}) "
          f"does not fit the model, which was initialised for per-example shape "
          f"{tuple(want.shape[1:])}.")
    wants_integers = jnp.issubdtype(want.dtype, jnp.integer)
    if wants_integers != jnp.issubdtype(got.dtype, jnp.integer):
      hint = "token ids must be integers" if wants_integers else "it expects real values"
      if got.dtype == jnp.uint8:
        hint += (" (uint8 pixels become floats in [0, 1] in the step with jdl.tasks."
                 "classification(pixels=True), or Task(prepare=jdl.tasks.scale_pixels()))")
      elif want.dtype == jnp.uint8:
        hint = ("a task that scales pixels gives the model floats: initialise it with those "
                "(jdl.tasks.unit_pixels(x[:1])), not with uint8 pixels")
      raise ValueError(f"the input has dtype {got.dtype}, but the model was initialised with "
                       f"{want.dtype} inputs; {hint}.")
  mask = tasks_lib.batch_mask(batch)
  if mask is not None and (mask.ndim < 1 or mask.shape[0] not in sizes):
    raise ValueError(f"'mask' has shape {mask.shape}; expected a leading batch dimension of "
                     f"{sizes.pop()} (per example [batch], or per position).")


def make_steps(task: tasks_lib.Task | None = None, *, l1: float = 0.0, l2: float = 0.0,
               axis_name: str | None = None, augment: AugmentFn | None = None,
               compute_dtype: Any = None, adversary: AdversaryFn | None = None,
               check_finite: bool = False, gradient_norms: bool = False,
               microbatches: int = 1) -> tuple[TrainStepFn, EvalStepFn]:
  """The train and eval steps of `task` (None: `jdl.tasks.classification()`), with L1/L2 weight
  penalties on the kernels; the other arguments are `make_train_step`'s."""
  return (make_train_step(task, weight_penalty=losses_lib.make_weight_penalty(l1=l1, l2=l2),
                          axis_name=axis_name, augment=augment, compute_dtype=compute_dtype,
                          adversary=adversary, check_finite=check_finite,
                          gradient_norms=gradient_norms, microbatches=microbatches),
          make_eval_step(task, axis_name=axis_name, compute_dtype=compute_dtype))
