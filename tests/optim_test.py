"""The optimizer factory: each rule, each schedule, clipping, and config mistakes."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdl


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
  assert jdl.optim.OPTIMIZER_DEFAULTS["eps"] == 1e-7


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
  """AdamW's update on a zero gradient is -lr * weight_decay * w."""
  update = _one_update({"name": "adamw", "learning_rate": 0.1, "weight_decay": 0.5}, grad=0.0, param=2.0)
  assert update == pytest.approx(-0.1 * 0.5 * 2.0)


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
    ],
)
def test_config_mistakes_fail_with_clear_messages(config, kwargs, message):
  """Each mistake names what was wrong."""
  with pytest.raises(ValueError, match=message):
    jdl.make_optimizer(config, **kwargs)


def test_returns_an_optax_transformation():
  """The factory's result is a plain optax GradientTransformation."""
  assert isinstance(jdl.make_optimizer({}), optax.GradientTransformation)
