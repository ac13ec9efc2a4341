"""The optimizer factory: each rule, each schedule, clipping, weight decay, the learning rate read
from the state, gradient accumulation, the parameter EMA, and config mistakes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdl
from jdl import models
from jdl import optim


def _one_update(config, grad=1.0, param=0.0, **kwargs):
  tx = jdl.make_optimizer(config, **kwargs)
  params = {"w": jnp.array([param])}
  updates, _ = tx.update({"w": jnp.array([grad])}, tx.init(params), params)
  return float(updates["w"][0])


def test_sgd_without_and_with_momentum():
  """Plain SGD moves by -lr * g; momentum accumulates g over steps."""
  assert _one_update({"name": "sgd", "learning_rate": 0.1}, grad=2.0) == pytest.approx(-0.2)
  tx = jdl.make_optimizer({"name": "sgd", "learning_rate": 0.1, "momentum": 0.9})
  params = {"w": jnp.zeros(1)}
  state = tx.init(params)
  _, state = tx.update({"w": jnp.ones(1)}, state, params)
  second, _ = tx.update({"w": jnp.ones(1)}, state, params)
  assert float(second["w"][0]) == pytest.approx(-0.1 * 1.9)


@pytest.mark.parametrize("name", ["adam", "adamw", "rmsprop"])
def test_adaptive_rules_take_a_first_step_of_about_lr(name):
  """Adam/AdamW first steps are lr * sign(g); RMSProp's is lr * g / sqrt((1-decay) g^2)."""
  update = _one_update({"name": name, "learning_rate": 0.01}, grad=3.0)
  if name == "rmsprop":
    assert update == pytest.approx(-0.01 / np.sqrt(0.001), rel=1e-3)
  else:
    assert update == pytest.approx(-0.01, rel=1e-4)


def test_adam_defaults_are_keras_defaults():
  """Adam's epsilon defaults to Keras' 1e-7 so the seed tutorial matches it."""
  assert optim.OPTIMIZER_DEFAULTS["eps"] == 1e-7


def test_schedules():
  """constant, step (staircase) and warmup+cosine give the expected learning rates."""
  constant = jdl.make_schedule({"learning_rate": 0.1})
  assert float(constant(1000)) == pytest.approx(0.1)
  step = jdl.make_schedule({"learning_rate": 0.1, "schedule": "step", "decay_every": 10, "decay_factor": 0.5})
  assert [float(step(s)) for s in (0, 9, 10, 25)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
  cosine = jdl.make_schedule({"learning_rate": 1.0, "schedule": "warmup_cosine", "warmup_steps": 10},
                             total_steps=110)
  assert float(cosine(0)) == pytest.approx(0.0)
  assert float(cosine(5)) == pytest.approx(0.5)
  assert float(cosine(10)) == pytest.approx(1.0)
  assert float(cosine(60)) == pytest.approx(0.5, abs=1e-6)
  assert float(cosine(110)) == pytest.approx(0.0, abs=1e-6)


def test_global_norm_clipping_bounds_the_update():
  """With clip_norm, SGD's step is at most lr * clip_norm."""
  assert _one_update({"name": "sgd", "learning_rate": 1.0, "clip_norm": 0.5}, grad=10.0) == pytest.approx(-0.5)
  assert _one_update({"name": "sgd", "learning_rate": 1.0, "clip_norm": 0.5}, grad=0.1) == pytest.approx(-0.1)


def test_adamw_applies_decoupled_weight_decay():
  """AdamW's update on a zero gradient is -lr * weight_decay * w. The one-element vector here is
  rank 1, which the default mask ("kernels") spares like a bias; "all" decays it."""
  config = {"name": "adamw", "learning_rate": 0.1, "weight_decay": 0.5}
  update = _one_update({**config, "weight_decay_mask": "all"}, grad=0.0, param=2.0)
  assert update == pytest.approx(-0.1 * 0.5 * 2.0)
  assert _one_update(config, grad=0.0, param=2.0) == 0.0


@pytest.mark.parametrize(
    "config, kwargs, message",
    [
        ({"name": "adagrad"}, {}, "unknown optimizer 'adagrad'"),
        ({"name": "adam", "learnin_rate": 1e-3}, {}, "unknown optimizer config keys"),
        ({"learning_rate": 0.0}, {}, "learning_rate must be > 0"),
        ({"schedule": "linear"}, {}, "unknown schedule"),
        ({"schedule": "warmup_cosine"}, {}, "needs total_steps"),
        ({"schedule": "warmup_cosine", "warmup_steps": 100}, {"total_steps": 50}, "warmup_steps"),
        ({"schedule": "step"}, {}, "decay_every > 0"),
        ({"name": "adam", "weight_decay": 1e-4}, {}, "only applied by 'adamw'"),
        ({"clip_norm": -1.0}, {}, "clip_norm must be > 0"),
        ({"name": "rmsprop", "weight_decay": 1e-4}, {}, "only applied by 'adamw' and 'sgd'"),
        ({"name": "adamw", "weight_decay": -1e-4}, {},
         r"weight_decay must be >= 0 \(0: none\); got -0.0001"),
        ({"weight_decay_mask": "biases"}, {}, "unknown weight_decay_mask 'biases'"),
        ({"accumulate_steps": 0}, {}, "accumulate_steps must be an integer >= 1.*got 0"),
        ({"accumulate_steps": 2.5}, {}, "accumulate_steps must be an integer >= 1.*got 2.5"),
        ({"accumulate_steps": True}, {}, "accumulate_steps must be an integer >= 1.*got True"),
        ({"ema_decay": 1.0}, {}, r"ema_decay must be a number in \[0, 1\).*got 1.0"),
        ({"ema_decay": -0.1}, {}, r"ema_decay must be a number in \[0, 1\).*got -0.1"),
        ({"schedule": "warmup_cosine", "accumulate_steps": 4}, {"total_steps": 3},
         "apply no update"),
        ({"schedule": "warmup_cosine", "warmup_steps": 5, "accumulate_steps": 4},
         {"total_steps": 20}, r"total_steps // accumulate_steps = 20 // 4 = 5\); got 5"),
    ],
)
def test_config_mistakes_fail_with_clear_messages(config, kwargs, message):
  """Each mistake names what was wrong."""
  with pytest.raises(ValueError, match=message):
    jdl.make_optimizer(config, **kwargs)


def test_returns_an_optax_transformation():
  """The factory's result is a plain optax GradientTransformation, wrapped or not."""
  assert isinstance(jdl.make_optimizer({}), optax.GradientTransformation)
  wrapped = jdl.make_optimizer({"accumulate_steps": 2, "ema_decay": 0.9, "clip_norm": 1.0})
  assert isinstance(wrapped, optax.GradientTransformation)


# ---------------------------------------------------------------------------------------------
# The learning rate in the state: same numbers as plain Optax, and readable.


def _random_grads(seed):
  rng = np.random.default_rng(seed)
  return {"w": rng.normal(size=(3, 2)).astype(np.float32),
          "b": rng.normal(size=2).astype(np.float32)}


@pytest.mark.parametrize(
    "config, reference",
    [
        ({"name": "adam", "learning_rate": 1e-2}, optax.adam(1e-2, eps=1e-7)),
        ({"name": "sgd", "learning_rate": 0.1}, optax.sgd(0.1)),
        ({"name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "nesterov": True},
         optax.sgd(0.1, momentum=0.9, nesterov=True)),
        ({"name": "rmsprop", "learning_rate": 1e-2, "momentum": 0.5},
         optax.rmsprop(1e-2, decay=0.999, eps=1e-7, momentum=0.5)),
        ({"name": "adam", "learning_rate": 1e-2, "clip_norm": 0.5},
         optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2, eps=1e-7))),
        ({"name": "adam", "learning_rate": 1e-2, "schedule": "step", "decay_every": 2},
         optax.adam(optax.exponential_decay(1e-2, 2, 0.1, staircase=True), eps=1e-7)),
    ],
)
def test_injected_learning_rate_leaves_the_updates_of_plain_optax_unchanged(config, reference):
  """Storing the learning rate in the state changes nothing but rounding: four updates equal
  plain Optax's to a few float32 ulps (the rate is a value read at run time there and a constant
  here, which XLA may fold into the arithmetic differently)."""
  tx = jdl.make_optimizer(config)
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  state, reference_state = tx.init(params), reference.init(params)
  update, reference_update = jax.jit(tx.update), jax.jit(reference.update)
  for seed in range(4):
    grads = _random_grads(seed)
    updates, state = update(grads, state, params)
    expected, reference_state = reference_update(grads, reference_state, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-9),
                 updates, expected)
    params = optax.apply_updates(params, updates)


@pytest.mark.parametrize(
    "config",
    [
        {"name": "sgd", "schedule": "warmup_cosine", "warmup_steps": 2},
        {"name": "adam", "schedule": "step", "decay_every": 2, "decay_factor": 0.5},
        {"name": "adamw", "schedule": "warmup_cosine", "warmup_steps": 2, "end_fraction": 0.1},
        {"name": "rmsprop", "schedule": "step", "decay_every": 3, "decay_factor": 0.5},
        {"name": "adam", "schedule": "constant", "clip_norm": 1.0},
        {"name": "sgd", "momentum": 0.9, "schedule": "warmup_cosine", "warmup_steps": 2,
         "clip_norm": 1.0, "ema_decay": 0.9},
        {"name": "adamw", "weight_decay": 0.1, "schedule": "warmup_cosine", "warmup_steps": 2,
         "clip_norm": 1.0, "ema_decay": 0.9, "accumulate_steps": 2},
        {"name": "rmsprop", "schedule": "step", "decay_every": 2, "accumulate_steps": 3},
    ],
)
def test_current_learning_rate_is_the_rate_of_the_last_update(config):
  """After applied update n the state says `schedule(n)` (before any update: `schedule(0)`), for
  every rule and schedule, with clipping, EMA and accumulation around it, under jit; between the
  micro-steps of an accumulation it keeps the last applied update's rate."""
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  config = {**config, "learning_rate": 0.1}
  k = config.get("accumulate_steps", 1)
  tx = jdl.make_optimizer(config, total_steps=6 * k)
  rates = jdl.make_schedule(config, total_steps=6 * k)
  state = tx.init(params)
  update = jax.jit(tx.update)
  observed = [jax.jit(optim.current_learning_rate)(state)]
  for step in range(6 * k):
    _, state = update(_random_grads(step), state, params)
    if (step + 1) % k == 0:
      observed.append(optim.current_learning_rate(state))
    else:
      assert float(optim.current_learning_rate(state)) == float(observed[-1]), step
  assert all(rate.dtype == jnp.float32 and rate.shape == () for rate in observed)
  expected = [rates(0)] + [rates(n) for n in range(6)]
  # The schedule inside the compiled update and alone: a cosine or a power a few ulps apart.
  np.testing.assert_allclose(observed, expected, rtol=1e-5, atol=1e-9)
  assert len(set(np.asarray(expected).tolist())) > 1 or config["schedule"] == "constant"


def test_current_learning_rate_rejects_a_state_without_one():
  """A plain Optax state holds no injected learning rate; the error says what was expected."""
  tx = optax.adam(1e-3)
  with pytest.raises(ValueError, match="one injected learning rate"):
    optim.current_learning_rate(tx.init({"w": jnp.zeros(2)}))


# ---------------------------------------------------------------------------------------------
# Gradient accumulation.


def test_total_steps_counts_train_steps_and_the_schedule_applied_updates():
  """With accumulate_steps=k, total_steps=k*T train steps give the schedule of T updates."""
  config = {"learning_rate": 1.0, "schedule": "warmup_cosine", "warmup_steps": 2}
  accumulated = jdl.make_schedule({**config, "accumulate_steps": 4}, total_steps=42)  # 10 updates
  plain = jdl.make_schedule(config, total_steps=10)
  np.testing.assert_allclose([accumulated(n) for n in range(11)], [plain(n) for n in range(11)])


def _train_state(config, model, seed=0):
  tx = jdl.make_optimizer(config)
  return jdl.create_train_state(model, tx, np.zeros((1, 6), np.float32), jax.random.PRNGKey(seed))


def _classification_batch(n, seed):
  rng = np.random.default_rng(seed)
  return {"input": rng.normal(size=(n, 6)).astype(np.float32),
          "label": rng.integers(0, 3, size=n).astype(np.int32)}


@pytest.mark.parametrize(
    "config",
    [{"name": "adam", "learning_rate": 1e-2},
     {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "ema_decay": 0.5}],
)
def test_accumulating_four_quarter_batches_equals_one_full_batch_step(config):
  """jdl's train step on four quarter batches with accumulate_steps=4 gives the parameters (and
  EMA) of one step on the whole batch; the first three micro-steps leave the parameters alone."""
  model = models.MLP(hidden=(8,), num_classes=3)
  train_step = jax.jit(jdl.make_train_step())
  full = _train_state(config, model)
  micro = _train_state({**config, "accumulate_steps": 4}, model)
  initial = micro.params
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
  for update_index in range(2):  # two applied updates, so Adam's moments and momentum matter
    batch = _classification_batch(16, seed=update_index)
    full, _ = train_step(full, batch)
    for quarter in range(4):
      micro, _ = train_step(micro, {k: v[4 * quarter:4 * quarter + 4] for k, v in batch.items()})
      if update_index == 0 and quarter < 3:
        jax.tree.map(np.testing.assert_array_equal, micro.params, initial)
    jax.tree.map(close, micro.params, full.params)
  assert int(micro.step) == 8 and int(full.step) == 2
  if config.get("ema_decay"):
    jax.tree.map(close, optim.ema_parameters(micro.opt_state), optim.ema_parameters(full.opt_state))


# ---------------------------------------------------------------------------------------------
# The parameter EMA.


def test_parameter_ema_matches_a_hand_computation():
  """ema starts at the params and becomes d * ema + (1 - d) * new params after each update."""
  decay, lr = 0.75, 0.1
  tx = jdl.make_optimizer({"name": "sgd", "learning_rate": lr, "ema_decay": decay})
  params = {"w": jnp.array([[1.0, -2.0]]), "b": jnp.array([0.5])}
  state = tx.init(params)
  jax.tree.map(np.testing.assert_array_equal, optim.ema_parameters(state), params)
  hand_params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  hand_ema = dict(hand_params)
  for step in range(3):
    grads = {"w": jnp.array([[step + 1.0, -1.0]]), "b": jnp.array([2.0 * step])}
    updates, state = jax.jit(tx.update)(grads, state, params)
    params = optax.apply_updates(params, updates)
    for k in hand_params:
      hand_params[k] = hand_params[k] - lr * np.asarray(grads[k])
      hand_ema[k] = decay * hand_ema[k] + (1 - decay) * hand_params[k]
  ema = optim.ema_parameters(state)
  for k in hand_params:
    # float32 against float64 by hand: a few ulps from each of three updates.
    np.testing.assert_allclose(params[k], hand_params[k], rtol=1e-5)
    np.testing.assert_allclose(ema[k], hand_ema[k], rtol=1e-5)
    assert ema[k].dtype == jnp.float32


def test_parameter_ema_advances_only_on_applied_updates():
  """With accumulate_steps=2 the EMA stays put on the first micro-step and moves on the second."""
  tx = jdl.make_optimizer({"name": "sgd", "learning_rate": 1.0, "ema_decay": 0.5,
                           "accumulate_steps": 2})
  params = {"w": jnp.array([[4.0]])}
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.array([[1.0]])}, state, params)
  np.testing.assert_array_equal(updates["w"], [[0.0]])
  np.testing.assert_array_equal(optim.ema_parameters(state)["w"], [[4.0]])
  updates, state = tx.update({"w": jnp.array([[3.0]])}, state, params)
  np.testing.assert_array_equal(updates["w"], [[-2.0]])  # mean gradient 2, lr 1
  np.testing.assert_array_equal(optim.ema_parameters(state)["w"], [[0.5 * 4.0 + 0.5 * 2.0]])


def test_parameter_ema_is_none_when_off_and_needs_params():
  """No EMA without ema_decay; the wrapper says so when update is called without params."""
  tx = jdl.make_optimizer({"name": "sgd", "learning_rate": 0.1})
  assert optim.ema_parameters(tx.init({"w": jnp.zeros(2)})) is None
  tx = optim.with_parameter_ema(optax.sgd(0.1), 0.9)
  state = tx.init({"w": jnp.zeros(2)})
  with pytest.raises(ValueError, match=r"needs them: call tx.update\(grads, opt_state, params\)"):
    tx.update({"w": jnp.ones(2)}, state)
  with pytest.raises(ValueError, match=r"decay in \[0, 1\); got 1.5"):
    optim.with_parameter_ema(optax.sgd(0.1), 1.5)


# ---------------------------------------------------------------------------------------------
# Weight decay on kernels only.


class _Normalised(nn.Module):
  """Dense kernels and biases, LayerNorm and BatchNorm scales and offsets: every kind of leaf."""

  @nn.compact
  def __call__(self, x, *, train):
    x = nn.LayerNorm()(nn.Dense(4)(x))
    x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
    return nn.Dense(3)(x)


def _normalised_params():
  """`_Normalised`'s params (shapes from tracing its init, no compile) filled with nonzero values,
  so biases, scales and offsets would visibly move if they were decayed."""
  shapes = jax.eval_shape(functools.partial(_Normalised().init, train=False),
                          jax.random.PRNGKey(0), jnp.ones((2, 5)))["params"]
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 2.0, s.shape), s.dtype), shapes)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_weight_decay_shrinks_kernels_and_spares_biases_and_normalisation(name):
  """One update on zero gradients: kernels shrink by lr * wd * w; biases and LayerNorm / BatchNorm
  scales and offsets (all rank 1) do not move."""
  lr, wd = 0.1, 0.5
  params = _normalised_params()
  tx = jdl.make_optimizer({"name": name, "learning_rate": lr, "weight_decay": wd})
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new_params = optax.apply_updates(params, updates)
  kinds = set()
  for path, old in jax.tree_util.tree_leaves_with_path(params):
    new = functools.reduce(lambda tree, key: tree[key.key], path, new_params)
    leaf = path[-1].key
    kinds.add((path[0].key.split("_")[0], leaf))
    if leaf == "kernel":
      np.testing.assert_allclose(new, old - lr * wd * old, rtol=1e-6)
    else:
      np.testing.assert_array_equal(new, old, err_msg=str(path))
  assert {("LayerNorm", "scale"), ("BatchNorm", "scale"), ("BatchNorm", "bias"),
          ("Dense", "bias")} <= kinds
