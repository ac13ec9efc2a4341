"""Attention, transformers and sampling: causality, padding, weight tying, counts, generation."""

import contextlib
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental.compilation_cache import compilation_cache

import jdl
from jdl import count_params, models
from jdl import metrics as metrics_lib
from jdl.generate import generate, sample_next, top_k_logits
from jdl.models import attention, transformer


def _param_count(model, x):
  """Parameters of `model` on inputs like `x`, from shapes alone (nothing is computed)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  return count_params(shapes["params"])


def _random_variables(model, x, seed=0, scale=0.3):
  """Variables of `model` on inputs like `x`, drawn N(0, scale^2) with numpy. The properties
  tested here hold for any parameter values, and this skips compiling the random initialisers
  (seconds per model on a small CPU)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), s.dtype), shapes)


def _tiny_lm(**overrides):
  settings = {"num_classes": 11, "block_size": 8, "num_layers": 2, "num_heads": 2, "width": 8}
  return models.TransformerLM(**{**settings, **overrides})


def _tokens(shape, vocab_size, seed=0, low=0):
  return np.random.default_rng(seed).integers(low, vocab_size, shape).astype(np.int32)


def _normal(shape, seed=0, scale=1.0):
  return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


# Every computation below runs under one jax.jit per test (or a few): on a small CPU, compiling
# op by op in eager mode costs more than the computation itself.


def test_masks_have_the_documented_shapes_and_values():
  np.testing.assert_array_equal(attention.causal_mask(3), np.tril(np.ones((3, 3), bool)))
  np.testing.assert_array_equal(attention.padding_mask(np.array([2, 0, 3]), length=3),
                                [[1, 1, 0], [0, 0, 0], [1, 1, 1]])
  np.testing.assert_array_equal(attention.padding_mask(np.array([[5, 0, 2], [0, 0, 0]])),
                                [[1, 0, 1], [0, 0, 0]])
  combined = attention.attention_mask(jnp.array([[True, True, False]]), causal=True, length=3)
  assert combined.shape == (1, 1, 3, 3)
  np.testing.assert_array_equal(combined[0, 0], [[1, 0, 0], [1, 1, 0], [1, 1, 0]])
  assert attention.attention_mask(None, causal=False, length=3) is None
  with pytest.raises(ValueError, match="needs `length`"):
    attention.padding_mask(np.array([1, 2]))
  with pytest.raises(ValueError, match="integer lengths"):
    attention.padding_mask(np.ones((2, 3)))
  with pytest.raises(ValueError, match=r"padding mask must have shape \[batch, 4\]"):
    attention.attention_mask(jnp.ones((2, 3), bool), causal=False, length=4)


def test_masked_softmax_gives_zero_weight_and_no_nan_to_fully_masked_rows():
  """A row with nothing to attend to is all zeros (not NaN), with finite gradients; other rows
  are the softmax over their allowed entries."""
  scores = _normal((2, 3), scale=50.0)
  mask = np.array([[True, False, True], [False, False, False]])

  @jax.jit
  def weights_and_grads(s):
    loss = lambda s: jnp.sum(attention.masked_softmax(s, mask) * jnp.arange(3.0)[None, :])
    return attention.masked_softmax(s, mask), jax.grad(loss)(s)

  weights, grads = map(np.asarray, weights_and_grads(scores))
  np.testing.assert_array_equal(weights[1], 0.0)
  assert weights[0, 1] == 0.0
  expected = np.exp(scores[0, ::2] - scores[0, ::2].max())
  np.testing.assert_allclose(weights[0, ::2], expected / expected.sum(), rtol=1e-5)
  assert np.all(np.isfinite(grads)) and np.all(grads[1] == 0.0) and grads[0, 1] == 0.0


# Causality: gradients never reach the future.


def _sensitivity(fn, x_TxD):
  """|d out[t] / d x[s]| summed over features: a [T, T] matrix (one jit of the Jacobian)."""
  jac = jax.jit(jax.jacrev(fn))(x_TxD)  # [T, out, T, D]
  return np.abs(np.asarray(jac)).sum(axis=(1, 3))


@pytest.mark.parametrize("causal", [True, False])
def test_self_attention_is_exactly_causal_when_asked(causal):
  """Causal: d out[t] / d x[s] is exactly zero for every s > t and non-zero for s <= t.
  Bidirectional: every position depends on every other."""
  layer = attention.MultiHeadSelfAttention(num_heads=2, causal=causal)
  x = _normal((5, 8))
  variables = _random_variables(layer, x[None])
  sensitivity = _sensitivity(lambda v: layer.apply(variables, v[None], train=False)[0], x)
  future = np.triu(np.ones((5, 5), bool), k=1)
  if causal:
    assert np.all(sensitivity[future] == 0.0)  # exactly, not approximately
    assert np.all(sensitivity[~future] > 0.0)
  else:
    assert np.all(sensitivity > 0.0)


@pytest.mark.parametrize("train", [False, True])
def test_language_model_logits_do_not_depend_on_future_tokens(train):
  """The logits at t have an exactly zero Jacobian with respect to the token embedding vectors at
  every t' > t, through the whole TransformerLM (with dropout active in training too)."""
  model = _tiny_lm(dropout_rate=0.1 if train else 0.0, num_classes=7)
  length = 6
  variables = _random_variables(model, np.zeros((1, length), np.int32))
  x = _normal((length, model.width), seed=1)
  rngs = {"dropout": jax.random.PRNGKey(2)}

  def logits(v):
    return model.apply(variables, v[None], train=train, rngs=rngs,
                       method=models.TransformerLM.logits_from_embeddings)[0]

  sensitivity = _sensitivity(logits, x)
  future = np.triu(np.ones((length, length), bool), k=1)
  assert np.all(sensitivity[future] == 0.0)
  assert np.all(np.diag(sensitivity) > 0.0) and sensitivity[-1, 0] > 0.0
  if not train:  # the method is the model after its token lookup
    tokens = _tokens((2, length), 7)
    embedding = variables["params"]["token_embedding"]["embedding"]
    from_tokens, from_vectors = jax.jit(lambda t: (
        model.apply(variables, t, train=False),
        model.apply(variables, embedding[t], train=False,
                    method=models.TransformerLM.logits_from_embeddings)))(tokens)
    # Two computations of the same logits (the lookup fused into the first layer, or not), which
    # XLA may vectorise differently: a few float32 ulps through one block, logits of order 1.
    np.testing.assert_allclose(from_tokens, from_vectors, rtol=1e-5, atol=1e-6)


# Padding changes nothing for the real tokens.


def test_bidirectional_attention_ignores_padded_keys():
  """Appending padded positions (holding garbage) leaves the outputs at the real positions as
  they were without them."""
  layer = attention.MultiHeadSelfAttention(num_heads=2)
  x = _normal((2, 4, 8))
  variables = _random_variables(layer, x)
  padded = np.concatenate([x, _normal((2, 3, 8), seed=2, scale=100.0)], axis=1)

  @jax.jit
  def outputs(x, padded):
    mask = attention.padding_mask(jnp.array([4, 4]), length=7)
    return (layer.apply(variables, x, train=False),
            layer.apply(variables, padded, train=False, padding_mask=mask),
            layer.apply(variables, padded, train=False))

  short, masked, unmasked = outputs(x, padded)
  np.testing.assert_allclose(masked[:, :4], short, rtol=1e-5, atol=1e-6)
  assert not np.allclose(unmasked[:, :4], short, atol=1e-3)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_encoder_classifier_logits_do_not_change_when_padding_is_appended(scan_layers):
  """The padding mask reaches every block, unrolled or scanned (broadcast to each layer)."""
  model = models.TransformerEncoderClassifier(num_classes=3, vocab_size=20, max_length=12,
                                              num_layers=2, num_heads=2, width=8,
                                              scan_layers=scan_layers)
  tokens = _tokens((3, 6), 20, low=1)
  tokens[1, 4:] = 0  # row 1 is already padded
  variables = _random_variables(model, tokens)
  padded = np.concatenate([tokens, np.zeros((3, 5), np.int32)], axis=1)

  @jax.jit
  def logits(tokens, padded):
    apply = lambda t: model.apply(variables, t, train=False)
    return apply(tokens), apply(padded), apply(tokens[1:2, :4]), apply(jnp.zeros_like(tokens))

  short, long, alone, empty = logits(tokens, padded)
  assert short.shape == (3, 3)
  np.testing.assert_allclose(long, short, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(alone, short[1:2], rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(empty))  # all padding pools to zeros, not NaN


# Weight tying, shapes and parameter counts.


def test_weight_tying_shares_the_embedding_with_the_output_projection():
  tokens = np.zeros((1, 4), np.int32)
  tied, untied = _tiny_lm(tie_weights=True), _tiny_lm(tie_weights=False)
  tied_params = _random_variables(tied, tokens)["params"]
  untied_params = _random_variables(untied, tokens)["params"]
  assert "head" not in tied_params and untied_params["head"]["kernel"].shape == (8, 11)
  assert "bias" not in untied_params["head"]
  assert count_params(untied_params) - count_params(tied_params) == 11 * 8
  # Zero the embedding matrix: the tied logits are all zero, the untied ones are not.
  zero = lambda params: {**params, "token_embedding": {"embedding": jnp.zeros((11, 8))}}
  tied_logits, untied_logits = jax.jit(lambda: (
      tied.apply({"params": zero(tied_params)}, tokens, train=False),
      untied.apply({"params": zero(untied_params)}, tokens, train=False)))()
  np.testing.assert_array_equal(tied_logits, 0.0)
  assert np.all(untied_logits != 0.0)


def test_output_shapes():
  shape = lambda model, x: jax.eval_shape(
      lambda: model.apply(_random_variables(model, x), x, train=False)).shape
  assert shape(_tiny_lm(), np.zeros((3, 5), np.int32)) == (3, 5, 11)
  vit = models.ViT(num_classes=4, patch_size=4, width=8, num_layers=1, num_heads=2, pool="mean")
  assert shape(vit, np.zeros((2, 8, 12, 3), np.float32)) == (2, 4)
  assert shape(vit, np.zeros((2, 8, 12), np.float32)) == (2, 4)  # grey images gain a channel
  classifier = models.TransformerEncoderClassifier(num_classes=2, vocab_size=9, max_length=6,
                                                   num_layers=1, num_heads=2, width=8)
  assert shape(classifier, np.zeros((4, 6), np.int32)) == (4, 2)


def test_documented_parameter_counts():
  tokens, images = np.zeros((1, 8), np.int32), np.zeros((1, 32, 32, 3))
  assert _param_count(attention.MultiHeadSelfAttention(4), np.zeros((1, 3, 64))) == 16_640
  assert _param_count(transformer.TransformerBlock(4), np.zeros((1, 3, 64))) == 49_984
  assert _param_count(models.TransformerLM(num_classes=65), tokens) == 818_048
  assert _param_count(models.TransformerLM(num_classes=65, tie_weights=False), tokens) == 826_368
  assert _param_count(models.TransformerEncoderClassifier(num_classes=2), tokens) == 640_898
  assert _param_count(models.ViT(num_classes=10), images) == 208_074
  assert _param_count(models.ViT(num_classes=10, pool="mean"), images) == 208_074 - 2 * 64
  assert _param_count(transformer.vit_tiny(10), images) == 5_362_762


def test_build_model_knows_the_transformers():
  lm = models.build_model({"name": "transformer_lm", "transformer_lm": {"width": 32}},
                          num_classes=65)
  assert isinstance(lm, models.TransformerLM) and lm.vocab_size == 65 and lm.width == 32
  assert isinstance(models.build_model({"name": "transformer_classifier"}, num_classes=2),
                    models.TransformerEncoderClassifier)
  tiny = models.build_model({"name": "vit_tiny", "vit_tiny": {"num_layers": 2}}, num_classes=10)
  assert (tiny.width, tiny.num_layers, tiny.num_heads, tiny.patch_size) == (192, 2, 3, 4)
  assert isinstance(models.build_model({"name": "vit"}, num_classes=10), models.ViT)


def test_bad_shapes_and_configs_fail_loudly():
  lm = _tiny_lm()
  variables = _random_variables(lm, np.zeros((1, 8), np.int32))
  with pytest.raises(ValueError, match=r"sequence length 9 must be in \[1, block_size=8\]"):
    lm.apply(variables, np.zeros((1, 9), np.int32), train=False)
  with pytest.raises(ValueError, match="integer token ids; got dtype float"):
    lm.apply(variables, np.zeros((1, 4)), train=False)
  with pytest.raises(ValueError, match="expects token ids"):
    lm.apply(variables, np.zeros((4,), np.int32), train=False)
  with pytest.raises(ValueError, match="width 10 must be a positive multiple of num_heads 4"):
    models.TransformerLM(num_classes=5, width=10, num_heads=4)
  with pytest.raises(ValueError, match="num_layers must be >= 1"):
    models.TransformerEncoderClassifier(num_classes=2, num_layers=0)
  with pytest.raises(ValueError, match="unknown pool 'max'"):
    models.ViT(num_classes=10, pool="max")
  vit = models.ViT(num_classes=10, patch_size=4, width=8, num_layers=1, num_heads=2)
  with pytest.raises(ValueError, match="image size 30x32 must be divisible by patch_size 4"):
    _random_variables(vit, np.zeros((1, 30, 32, 3)))
  with pytest.raises(ValueError, match="width 6 must be divisible by num_heads 4"):
    _random_variables(attention.MultiHeadSelfAttention(4), np.zeros((1, 2, 6)))


# Sampling.


def test_top_k_logits_keeps_exactly_the_k_largest():
  logits = _normal((4, 10))
  kept = top_k_logits(logits, 3)
  finite = np.isfinite(kept)
  assert np.all(finite.sum(-1) == 3)
  largest = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
  assert np.all(np.take_along_axis(finite, largest, axis=-1))
  np.testing.assert_array_equal(kept[finite], np.asarray(logits)[finite])
  np.testing.assert_array_equal(top_k_logits(logits, 10), logits)
  for bad in (0, 11):
    with pytest.raises(ValueError, match=r"top_k must be in \[1, vocabulary size 10\]"):
      top_k_logits(logits, bad)
  with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
    sample_next(logits, jax.random.PRNGKey(0), temperature=-1.0)
  np.testing.assert_array_equal(sample_next(logits, jax.random.PRNGKey(0), temperature=0.0),
                                np.argmax(logits, -1))


def _bigram_apply(variables, tokens, *, train):
  """A causal "model" whose next-token logits are a fixed row of a table, chosen by the token."""
  del train
  return variables["table"][tokens]


def _bigram_table(vocab_size=9):
  return {"table": jnp.asarray(_normal((vocab_size, vocab_size), seed=5, scale=3.0))}


def test_generation_is_deterministic_per_key_keeps_the_prompt_and_stays_in_the_vocabulary():
  variables = _bigram_table()
  prompt = _tokens((4, 3), 9)
  run = functools.partial(generate, _bigram_apply, variables, prompt, num_new_tokens=20,
                          block_size=8)
  first, again, other = run(key=jax.random.PRNGKey(0)), run(key=jax.random.PRNGKey(0)), run(
      key=jax.random.PRNGKey(1))
  assert first.shape == (4, 23) and first.dtype == jnp.int32
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  np.testing.assert_array_equal(first[:, :3], prompt)
  assert np.all((first >= 0) & (first < 9))


def test_top_k_sampling_draws_only_from_the_k_most_likely_tokens():
  variables = _bigram_table()
  table = np.asarray(variables["table"])
  prompt = _tokens((16, 1), 9)
  out = np.asarray(generate(_bigram_apply, variables, prompt, num_new_tokens=30, block_size=4,
                            key=jax.random.PRNGKey(3), top_k=3, temperature=2.0))
  top3 = np.argsort(-table, axis=-1)[:, :3]
  previous, sampled = out[:, :-1], out[:, 1:]
  assert np.all(np.any(top3[previous] == sampled[..., None], axis=-1))
  assert len(np.unique(sampled[previous == previous[0, 0]])) > 1  # it samples, not argmax

  greedy = generate(_bigram_apply, variables, prompt, num_new_tokens=10, block_size=4,
                    key=jax.random.PRNGKey(0), greedy=True)
  for key in range(3):
    np.testing.assert_array_equal(
        generate(_bigram_apply, variables, prompt, num_new_tokens=10, block_size=4,
                 key=jax.random.PRNGKey(key), top_k=1), greedy)
  np.testing.assert_array_equal(
      generate(_bigram_apply, variables, prompt, num_new_tokens=10, block_size=4,
               key=jax.random.PRNGKey(0), temperature=0.0), greedy)


def test_generation_crops_the_context_and_compiles_once():
  """Greedy generation past block_size picks, at every step, the most likely token given the last
  block_size tokens (as a plain Python loop would); the jitted loop traces the model once for all
  the new tokens."""
  model = _tiny_lm(block_size=4)
  variables = _random_variables(model, np.zeros((1, 4), np.int32))
  prompt = _tokens((2, 3), 11, seed=1)
  traces = []

  def apply_fn(v, tokens, *, train):
    traces.append(tokens.shape)
    return model.apply(v, tokens, train=train)

  out = generate(apply_fn, variables, prompt, num_new_tokens=7, block_size=4,
                 key=jax.random.PRNGKey(0), greedy=True)
  last_logits = jax.jit(lambda tokens: model.apply(variables, tokens, train=False)[:, -1])
  out = np.asarray(out)
  assert out.shape == (2, 10)
  np.testing.assert_array_equal(out[:, :3], prompt)
  for t in range(3, 10):
    logits = np.asarray(last_logits(out[:, max(t - 4, 0):t]))
    chosen = np.take_along_axis(logits, out[:, t:t + 1], axis=1)[:, 0]
    # The loop and this check are two programs: the chosen logit is the largest up to a few
    # float32 ulps (a near tie may go either way in either program).
    np.testing.assert_allclose(chosen, logits.max(axis=1), rtol=1e-5, atol=1e-6)
  assert traces == [(2, 4)]
  generate(apply_fn, variables, prompt, num_new_tokens=7, block_size=4,
           key=jax.random.PRNGKey(1), greedy=True)
  assert traces == [(2, 4)]  # same static arguments: no new trace


def test_generate_rejects_bad_arguments():
  variables = _bigram_table()
  prompt = _tokens((2, 3), 9)
  run = functools.partial(generate, _bigram_apply, variables, key=jax.random.PRNGKey(0),
                          block_size=8)
  with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
    run(prompt, num_new_tokens=2, temperature=-0.5)
  with pytest.raises(ValueError, match=r"top_k must be in \[1, vocabulary size 9\]"):
    run(prompt, num_new_tokens=2, top_k=10)
  with pytest.raises(ValueError, match="top_k must be in"):
    run(prompt, num_new_tokens=2, top_k=0)
  with pytest.raises(ValueError, match="prompt_tokens is empty"):
    run(np.zeros((2, 0), np.int32), num_new_tokens=2)
  with pytest.raises(ValueError, match="integer token ids"):
    run(np.zeros((2, 3)), num_new_tokens=2)
  with pytest.raises(ValueError, match="num_new_tokens must be an integer >= 0"):
    run(prompt, num_new_tokens=-1)
  with pytest.raises(ValueError, match="needs block_size"):
    generate(_bigram_apply, variables, prompt, num_new_tokens=2, key=jax.random.PRNGKey(0))
  np.testing.assert_array_equal(run(prompt, num_new_tokens=0), prompt)


# Training.


def test_tiny_language_model_learns_a_repeated_pattern_with_the_library_step():
  """Next-token prediction on "0 1 2 3 0 1 2 3 ..." (random phase): the loss falls from ~log V to
  near zero in a few dozen Adam steps. The library step takes [B, T] labels once the loss reduces
  over T (a per-sequence loss) and the metrics are loss-only."""
  vocab_size, length = 6, 8
  model = models.TransformerLM(num_classes=vocab_size, block_size=length, num_layers=1,
                               num_heads=2, width=16)
  phase = np.random.default_rng(0).integers(0, 4, size=(32, 1))
  sequences = ((phase + np.arange(length + 1)[None, :]) % 4).astype(np.int32)
  batch = {"input": sequences[:, :-1], "label": sequences[:, 1:]}

  def sequence_loss(logits_BxTxV, labels_BxT):
    return jnp.mean(jdl.softmax_cross_entropy(logits_BxTxV, labels_BxT), axis=-1)

  create = jax.jit(jdl.create_train_state, static_argnums=(0, 1))  # one compile, not op by op
  state = create(model, optax.adam(3e-2), batch["input"][:1], jax.random.PRNGKey(0))
  task = jdl.Task(loss=lambda outputs, batch: sequence_loss(outputs, batch["label"]))
  train_step = jax.jit(jdl.make_train_step(task))
  losses = []
  for _ in range(40):
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss_sum"] / metrics["count"]))
  assert losses[0] > 1.0 and losses[-1] < 0.1, losses
  # A Module gives generate its own block_size.
  continuation = generate(model, {"params": state.params}, np.array([[0, 1]], np.int32),
                          num_new_tokens=6, key=jax.random.PRNGKey(0), greedy=True)
  np.testing.assert_array_equal(continuation, [[0, 1, 2, 3, 0, 1, 2, 3]])


@pytest.mark.parametrize("query_chunk", [0, 3])
@pytest.mark.parametrize("causal, padded", [(True, False), (False, True), (True, True)])
def test_fused_attention_equals_the_explicit_path_in_outputs_and_gradients(causal, padded,
                                                                           query_chunk):
  """The default path (`attention.dot_product_attention` off GPUs), and attention 3 queries at a
  time (the last chunk padded), against the einsum path with its masked softmax: outputs and gradients with
  respect to inputs and parameters within float32 error, with causal and padding masks; asking
  for the weights takes the explicit path and sows them."""
  x = _normal((3, 7, 8))
  mask = attention.padding_mask(jnp.array([7, 4, 2]), length=7) if padded else None
  fused = attention.MultiHeadSelfAttention(num_heads=2, causal=causal, query_chunk=query_chunk)
  explicit = attention.MultiHeadSelfAttention(num_heads=2, causal=causal, fused=False)
  variables = _random_variables(fused, x)

  def loss(layer, variables, x):
    out = layer.apply(variables, x, train=False, padding_mask=mask)
    real = np.ones((3, 7, 1), bool) if mask is None else np.asarray(mask)[..., None]
    return jnp.sum(jnp.where(real, jnp.sin(out), 0.0)), out

  (_, out_f), grads_f = jax.value_and_grad(lambda v, x: loss(fused, v, x), argnums=(0, 1),
                                           has_aux=True)(variables, x)
  (_, out_e), grads_e = jax.value_and_grad(lambda v, x: loss(explicit, v, x), argnums=(0, 1),
                                           has_aux=True)(variables, x)
  real = np.ones((3, 7), bool) if mask is None else np.asarray(mask)
  np.testing.assert_allclose(np.asarray(out_f)[real], np.asarray(out_e)[real], rtol=1e-5,
                             atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads_f,
               grads_e)
  _, sown = fused.apply(variables, x, train=False, padding_mask=mask, mutable=["intermediates"])
  assert sown["intermediates"]["attention_weights"][0].shape == (3, 2, 7, 7)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_with_its_written_backward_pass_equals_jax_dot_product_attention(causal, dtype):
  """`attention.dot_product_attention` (a backward pass of its own) against JAX's: outputs and
  gradients of queries, keys and values within float32 error (bfloat16: its rounding), with
  padded keys, a row whose every key is masked (left padding under the causal mask) included."""
  q, k, v = (_normal((3, 7, 2, 4), seed=seed).astype(dtype) for seed in range(3))
  keys = jnp.array([[True] * 7, [True] * 5 + [False] * 2, [False] * 2 + [True] * 5])

  def ours(q, k, v):
    return attention.dot_product_attention(q, k, v, scale=0.5, causal=causal, key_mask_BxS=keys)

  def theirs(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, scale=0.5, is_causal=causal,
                                        mask=keys[:, None, None, :])

  def value_and_grads(attend):
    loss = lambda *qkv: jnp.sum(jnp.sin(attend(*qkv).astype(jnp.float32)))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v), attend(q, k, v)

  (ours_values, ours_out), (their_values, _) = jax.jit(
      lambda: (value_and_grads(ours), value_and_grads(theirs)))()
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tolerance, atol=tolerance),
      ours_values, their_values)
  assert ours_out.dtype == dtype


# Rematerialisation and scanned layers: the same function, computed another way.


def _lm_loss_and_grads(model, params, tokens, labels, *, train, method=None):
  """The mean next-token cross-entropy and its gradient with respect to `params`."""

  def loss(params):
    inputs = tokens
    if method is not None:  # the model after its token lookup
      inputs = params["token_embedding"]["embedding"][tokens]
    logits = model.apply({"params": params}, inputs, train=train, method=method,
                         rngs={"dropout": jax.random.PRNGKey(3)})
    return jnp.mean(jdl.softmax_cross_entropy(logits, labels))

  return jax.value_and_grad(loss)(params)


def _stack_blocks(params, num_layers):
  """The scanned layout of unrolled LM parameters: blocks_0 .. blocks_{L-1} stacked, leaf by leaf,
  along a new leading layer axis under "blocks"; everything else as it was."""
  blocks = [params[f"blocks_{index}"] for index in range(num_layers)]
  rest = {name: value for name, value in params.items() if not name.startswith("blocks_")}
  return {**rest, "blocks": jax.tree.map(lambda *layers: jnp.stack(layers), *blocks)}


def test_remat_policies_give_the_loss_and_gradients_of_no_remat():
  """"full" and "matmuls" recompute in the backward pass what "none" keeps: the same operations
  on the same values, so the same numbers up to XLA fusing the recomputed copy differently, a
  few float32 ulps: rtol 1e-6 on gradients of order 0.01-1 (float32's epsilon is 1.2e-7), atol
  1e-7 for the entries that nearly cancel. The attention's score products have batch dimensions
  (recomputed under "matmuls"), its projections and the MLP's do not (kept). Dropout's masks
  under remat are checked by the scanned test below (one compile with dropout is seconds here)."""
  tokens, labels = _tokens((2, 8), 11, seed=1), _tokens((2, 8), 11, seed=2)
  models_by_remat = {remat: _tiny_lm(num_layers=1, remat=remat)
                     for remat in transformer.REMAT_POLICIES}
  params = _random_variables(models_by_remat["none"], tokens)["params"]
  results = jax.jit(lambda params: {
      remat: _lm_loss_and_grads(model, params, tokens, labels, train=True)
      for remat, model in models_by_remat.items()})(params)
  for remat in ("full", "matmuls"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 results[remat], results["none"])


def test_scanned_layers_compute_what_the_unrolled_blocks_compute():
  """With its stacked parameters the unrolled ones stacked, the scanned model gives the unrolled
  model's loss and (stacked) gradients, and logits_from_embeddings its logits. The scan runs the
  same block body, but XLA compiles a loop body apart from its neighbours, so results may differ
  by float32 rounding: rtol 1e-5, atol 1e-6."""
  tokens, labels = _tokens((2, 8), 11, seed=1), _tokens((2, 8), 11, seed=2)
  unrolled, scanned = _tiny_lm(num_layers=3), _tiny_lm(num_layers=3, scan_layers=True)
  params = _random_variables(unrolled, tokens)["params"]
  stacked = _stack_blocks(params, 3)
  assert jax.tree.map(jnp.shape, _random_variables(scanned, tokens)["params"]) == jax.tree.map(
      jnp.shape, stacked)

  @jax.jit
  def run(params, stacked):
    embedded = stacked["token_embedding"]["embedding"][tokens]
    return (_lm_loss_and_grads(unrolled, params, tokens, labels, train=True),
            _lm_loss_and_grads(scanned, stacked, tokens, labels, train=True),
            unrolled.apply({"params": params}, tokens, train=False),
            scanned.apply({"params": stacked}, embedded, train=False,
                          method=models.TransformerLM.logits_from_embeddings))

  (loss, grads), (scanned_loss, scanned_grads), logits, scanned_logits = run(params, stacked)
  np.testing.assert_allclose(scanned_loss, loss, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               scanned_grads, _stack_blocks(grads, 3))
  np.testing.assert_allclose(scanned_logits, logits, rtol=1e-5, atol=1e-6)


def test_scanned_rematerialised_layers_train_with_dropout():
  """Dropout under the scan (a key per layer) and remat (the masks recomputed): the loss is finite
  and every block parameter gets a gradient in every layer."""
  tokens, labels = _tokens((2, 8), 11, seed=1), _tokens((2, 8), 11, seed=2)
  model = _tiny_lm(num_layers=2, scan_layers=True, remat="full", dropout_rate=0.2)
  params = _random_variables(model, tokens)["params"]
  loss, grads = jax.jit(lambda p: _lm_loss_and_grads(model, p, tokens, labels, train=True))(params)
  assert np.isfinite(loss)
  for path, grad in jax.tree_util.tree_leaves_with_path(grads["blocks"]):
    per_layer = np.abs(np.asarray(grad)).reshape(2, -1).max(axis=1)
    assert np.all(per_layer > 0.0), jax.tree_util.keystr(path)


def _compile_seconds(num_layers):
  """CPU seconds to trace, lower and compile a fresh SGD train step of a scanned 32-wide LM.

  Process CPU time, not wall time: other processes on the machine slow the wall clock but do not
  add to this process's CPU time (XLA's compiler threads do, so parallel work is counted)."""
  model = models.TransformerLM(num_classes=11, block_size=16, num_layers=num_layers, num_heads=2,
                               width=32, scan_layers=True)
  tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, train=False))["params"]

  def train_step(params, tokens):
    loss = lambda p: jnp.mean(jdl.softmax_cross_entropy(
        model.apply({"params": p}, tokens, train=True), tokens))
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, jax.grad(loss)(params))

  start = time.process_time()
  jax.jit(train_step).lower(params, tokens).compile()
  return time.process_time() - start


@contextlib.contextmanager
def _no_compilation_cache():
  """Turns the tests' persistent compilation cache off (so a compile is timed, not a cache read)
  and back on after; reset_cache makes JAX read the setting again."""
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


def test_scanned_compile_time_does_not_grow_with_depth():
  """The scan traces and compiles one block whatever the depth, so 12 layers compile within 1.5x
  the time of 2 (measured about 1.05x; unrolled, 1.6x at this tiny width, where the fixed cost of
  the rest of the step dominates, and growing with depth). The persistent cache is off and each
  compile traces a fresh step. A second compile of each, keeping the minimum, only when the first
  pair misses the bound: a compile costs seconds here, and noise only ever adds time."""
  with _no_compilation_cache():
    shallow, deep = _compile_seconds(2), _compile_seconds(12)
    if deep >= 1.5 * shallow:
      shallow, deep = min(shallow, _compile_seconds(2)), min(deep, _compile_seconds(12))
  assert deep < 1.5 * shallow, (deep, shallow)


def test_bad_remat_policy_fails_with_the_valid_ones():
  with pytest.raises(ValueError, match=r"unknown remat policy 'dots'; expected one of "
                                       r"\('none', 'full', 'matmuls'\)"):
    _tiny_lm(remat="dots")
  with pytest.raises(ValueError, match="scan_layers must be a bool"):
    models.ViT(num_classes=10, scan_layers="yes")


@pytest.mark.parametrize("tie_weights", [True, False])
def test_hidden_output_with_the_chunked_loss_equals_the_loss_on_full_logits(tie_weights):
  """`output="hidden"` with `tasks.language_model` (logits 5 positions at a time, the last chunk
  padded) gives the per-position losses, accuracy and parameter gradients of the logits model
  with `tasks.classification`, within float32 error; generation from it samples the logits."""
  tokens, labels = _tokens((2, 8), 11, seed=1), _tokens((2, 8), 11, seed=2)
  logits_model = _tiny_lm(tie_weights=tie_weights)
  hidden_model = _tiny_lm(tie_weights=tie_weights, output="hidden")
  params = _random_variables(logits_model, tokens)["params"]
  batch = {"input": tokens, "label": labels}
  chunked = jdl.tasks.language_model(chunk=5)

  def loss(model, task, params):
    outputs = model.apply({"params": params}, tokens, train=False)
    losses, aux = task.loss(outputs, batch) if task is chunked else (task.loss(outputs, batch), {})
    return jnp.mean(losses), (losses, aux, outputs)

  (_, (full, _, logits)), grads = jax.value_and_grad(
      lambda p: loss(logits_model, jdl.tasks.classification(), p), has_aux=True)(params)
  (_, (parts, aux, _)), chunk_grads = jax.value_and_grad(
      lambda p: loss(hidden_model, chunked, p), has_aux=True)(params)
  np.testing.assert_allclose(parts, full, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(aux["accuracy"], np.argmax(logits, -1) == labels)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), chunk_grads,
               grads)
  sample = lambda model: generate(model, {"params": params}, tokens[:, :3], num_new_tokens=4,
                                  key=jax.random.PRNGKey(0))
  np.testing.assert_array_equal(sample(hidden_model), sample(logits_model))
  with pytest.raises(ValueError, match="reads the model's outputs 'hidden'"):
    chunked.loss(jnp.zeros((2, 8, 11)), batch)
