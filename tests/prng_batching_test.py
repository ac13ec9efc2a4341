"""`batch_random_hashes`: the same bits as `jax.jit(fn)`, from fewer Threefry calls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdl import prng_batching

pytestmark = pytest.mark.skipif(not prng_batching.available(),
                                reason="this JAX lacks the random primitives that are batched")


def _hash_loops(fn, *args) -> int:
  """The hash loops XLA would compile for `fn` on the CPU (where each Threefry call lowers to a
  rolled loop; calls of equal shapes share one)."""
  return jax.jit(fn).lower(*args).as_text().count("stablehlo.while")


def _draws(key):
  """Independent draws of several shapes and kinds, keys split and folded, a nested jit and a
  batch of keys: the hashes sit at five dependency levels."""
  k1, k2, k3 = jax.random.split(key, 3)
  a = jax.random.normal(jax.random.fold_in(k1, 7), (5, 3))
  b = jax.random.uniform(jax.random.fold_in(k2, 11), (4,))
  c = jax.jit(lambda k: jax.random.truncated_normal(k, -2.0, 2.0, (3, 2, 2)))(k3)
  d = jax.vmap(lambda k: jax.random.bernoulli(k, 0.3, (6,)))(jax.random.split(k1, 4))
  e = jax.random.randint(jax.random.fold_in(jax.random.fold_in(k2, 1), 2), (7,), 0, 100)
  return {"a": a, "b": b, "c": c, "d": d, "e": e, "scaled": a.sum() * b}


def test_the_batched_function_gives_the_bits_of_the_plain_one():
  key = jax.random.PRNGKey(3)
  want = jax.jit(_draws)(key)
  got = jax.jit(prng_batching.batch_random_hashes(_draws))(key)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_independent_hashes_share_one_call_per_level():
  """The plain program hashes once per split, fold_in and draw; the batched one once per
  dependency level."""
  key = jax.random.PRNGKey(0)
  expanded = jax.make_jaxpr(prng_batching.batch_random_hashes(_draws))(key)
  assert sum(e.primitive.name == "threefry2x32" for e in expanded.jaxpr.eqns) == 5
  if jax.default_backend() == "cpu":
    assert _hash_loops(prng_batching.batch_random_hashes(_draws), key) == 5
    assert _hash_loops(_draws, key) == 8  # one per distinct call; more calls than that


def test_big_draws_get_calls_of_their_own(monkeypatch):
  """Merged calls hash at most `MAX_BATCHED_SIZE` counters: with a limit of 16, the levels are
  cut into more calls, hashing the same counters, and only a single hash larger than the limit
  (the vmapped Bernoulli draw: 4 keys x 6) exceeds it; the bits stay the same."""
  key = jax.random.PRNGKey(0)

  def call_sizes():
    expanded = jax.make_jaxpr(prng_batching.batch_random_hashes(_draws))(key)
    return [int(np.prod(e.outvars[0].aval.shape)) for e in expanded.jaxpr.eqns
            if e.primitive.name == "threefry2x32"]

  unlimited = call_sizes()
  monkeypatch.setattr(prng_batching, "MAX_BATCHED_SIZE", 16)
  limited = call_sizes()
  assert len(limited) > len(unlimited) and sum(limited) == sum(unlimited)
  assert [size for size in limited if size > 16] == [24]
  got = jax.jit(prng_batching.batch_random_hashes(_draws))(key)
  jax.tree.map(np.testing.assert_array_equal, got, jax.jit(_draws)(key))


def test_typed_keys_and_pytrees_pass_through():
  def init(keys, scale):
    return {"w": jax.random.normal(keys["w"], (3,)) * scale["s"],
            "v": jax.random.uniform(keys["v"], (2, 2))}

  keys = {"w": jax.random.key(1), "v": jax.random.key(2)}
  scale = {"s": jnp.float32(2.0)}
  want = jax.jit(init)(keys, scale)
  got = jax.jit(prng_batching.batch_random_hashes(init))(keys, scale)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_side_effects_keep_their_order_and_hashes_inside_control_flow_stay():
  """A function with a callback runs as it is; a draw inside `scan` stays inside it."""
  seen = []

  def with_effect(key):
    jax.debug.callback(lambda: seen.append("first"))
    x = jax.random.normal(key, (3,))
    jax.debug.callback(lambda: seen.append("second"))
    return x

  def with_scan(key):
    def body(carry, i):
      return carry, jax.random.normal(jax.random.fold_in(key, i), (2,))
    return jax.lax.scan(body, 0, jnp.arange(3))[1], jax.random.normal(key, (4,))

  key = jax.random.PRNGKey(4)
  want = jax.jit(with_effect)(key)
  seen.clear()
  np.testing.assert_array_equal(jax.jit(prng_batching.batch_random_hashes(with_effect))(key), want)
  assert seen == ["first", "second"]
  jax.tree.map(np.testing.assert_array_equal,
               jax.jit(prng_batching.batch_random_hashes(with_scan))(key), jax.jit(with_scan)(key))


def test_errors_of_the_function_itself_surface_unchanged():
  def bad(key):
    return jax.random.normal(key, (2,)) + jnp.ones((3,))

  with pytest.raises(TypeError, match="add got incompatible shapes"):
    jax.jit(prng_batching.batch_random_hashes(bad))(jax.random.PRNGKey(0))


def test_a_jax_whose_internals_differ_gets_the_function_as_it_is(monkeypatch, caplog):
  """Where JAX's random primitives are not what the batching reads, `fn` runs unbatched: the
  same values, and a log line that says why."""

  def unreadable(eqn):
    raise AttributeError(f"no implementation for {eqn.primitive.name}")

  monkeypatch.setattr(prng_batching, "_hash_rule", unreadable)
  key = jax.random.PRNGKey(2)
  with caplog.at_level("INFO", logger="jdl.prng_batching"):
    got = jax.jit(prng_batching.batch_random_hashes(_draws))(key)
  jax.tree.map(np.testing.assert_array_equal, got, jax.jit(_draws)(key))
  assert "random hashes not batched (AttributeError" in caplog.text
