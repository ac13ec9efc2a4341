"""Model-agnostic explanations of any jdl classifier: SHAP (`shap_values`) and LIME
(`lime_explanations`), from the optional `shap` and `lime` packages (`pip install -e
".[explain]"`).

Both treat the model as a black box: every element of an input (a pixel channel, a signal point)
is one feature, and the model is queried on perturbed copies. Unlike the gradient methods of
`jdl.analysis.attribution` they need no gradient, and cost many forward passes.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jdl.analysis import evaluation

ApplyFn = Callable[..., Any]

PREDICT_BATCH = 512
"""Rows per compiled forward pass of the black-box predictions (padded: the model compiles once)."""


def _require(module: str) -> Any:
  try:
    return importlib.import_module(module)
  except ImportError as error:
    raise ImportError(f"{module} is not installed ({error}); install jdl's optional explanations "
                      'with pip install -e ".[explain]" (the shap and lime packages).') from None


def _black_box(apply_fn: ApplyFn, variables: Any, example_shape: Sequence[int], dtype: np.dtype,
               *, softmax: bool = False) -> Callable[[np.ndarray], np.ndarray]:
  """`[n, features] -> [n, outputs]` float64 outputs (softmax probabilities with `softmax`)."""

  def predict(flat: np.ndarray) -> np.ndarray:
    count = len(flat)
    inputs = np.zeros((-(-count // PREDICT_BATCH) * PREDICT_BATCH, *example_shape), dtype)
    inputs[:count] = np.reshape(flat, (count, *example_shape))
    outputs = evaluation.apply_in_batches(apply_fn, variables, inputs, batch_size=PREDICT_BATCH)
    outputs = np.asarray(outputs[:count], np.float64)
    return evaluation.softmax_probabilities(outputs) if softmax else outputs

  return predict


def _checked(inputs: Any, target_classes: Any, name: str) -> tuple[np.ndarray, np.ndarray | None]:
  inputs = np.asarray(inputs)
  if inputs.ndim < 2 or inputs.shape[0] == 0 or not np.issubdtype(inputs.dtype, np.floating):
    raise ValueError(f"{name} needs a non-empty float batch [num_examples, ...] (images or "
                     f"signals; token ids have no meaningful perturbation); got {inputs.dtype} "
                     f"of shape {inputs.shape}.")
  if target_classes is None:
    return inputs, None
  targets = np.asarray(target_classes).reshape(-1)
  if targets.shape[0] != inputs.shape[0] or not np.issubdtype(targets.dtype, np.integer):
    raise ValueError(f"{name} needs one integer target class per example: {inputs.shape[0]}; got "
                     f"{targets.dtype} of shape {targets.shape}.")
  return inputs, targets


@dataclasses.dataclass(frozen=True)
class ShapResult:
  """SHAP values of the target class's output; an example's `values` sum to `outputs -
  expected_values` (local accuracy)."""

  values: np.ndarray  # [num_examples, *input_shape]: each feature's SHAP value
  expected_values: np.ndarray  # [num_examples]: the mean output over the background (all masked)
  outputs: np.ndarray  # [num_examples]: the model's output for the target class
  targets: np.ndarray  # [num_examples]: the explained classes


def shap_values(apply_fn: ApplyFn, variables: Any, inputs: Any, background: Any,
                target_classes: Any = None, *, max_evals: int | None = None,
                seed: int = 0) -> ShapResult:
  """SHAP values of a class's output (logits, or probabilities for a model that outputs them)
  for each example, from `shap`'s permutation explainer with an independent masker: a masked
  feature takes the background examples' values (the output averaged over them). Local accuracy
  holds exactly (to float rounding) however few permutations are drawn; more lower the variance.

  `background` (`[num_background, *input_shape]`) stands for "feature unknown": a few dozen
  training examples (the cost grows with their number). `target_classes` (`[num_examples]`)
  defaults to the predicted classes. `max_evals` per example is at least 2 * features + 1 (one
  permutation forward and back), each over the whole background; None: that, or 500 if larger."""
  shap = _require("shap")
  inputs, targets = _checked(inputs, target_classes, "shap_values")
  background = _reference_examples(background, inputs, "background", minimum=1)
  features = int(np.prod(inputs.shape[1:]))
  max_evals = max(500, 2 * features + 1) if max_evals is None else max_evals
  if max_evals < 2 * features + 1:
    raise ValueError(f"max_evals must be at least 2 * features + 1 = {2 * features + 1} for "
                     f"{features} features (one permutation forward and back); got {max_evals}.")
  predict = _black_box(apply_fn, variables, inputs.shape[1:], inputs.dtype)
  flat = inputs.reshape(inputs.shape[0], features)
  outputs = predict(flat)
  targets = outputs.argmax(axis=1) if targets is None else targets
  masker = shap.maskers.Independent(background, max_samples=len(background))
  explainer = shap.PermutationExplainer(predict, masker, seed=seed)
  explanation = explainer(flat, max_evals=max_evals, silent=True)
  rows = np.arange(inputs.shape[0])
  values = np.asarray(explanation.values)[rows, :, targets]  # [examples, features]
  expected = np.asarray(explanation.base_values).reshape(inputs.shape[0], -1)[rows, targets]
  return ShapResult(values=values.reshape(inputs.shape), expected_values=expected,
                    outputs=outputs[rows, targets], targets=targets)


@dataclasses.dataclass(frozen=True)
class LimeResult:
  """LIME's local linear explanations of the target class's probability. A feature's weight is
  the change in probability when it is in the example's quartile bin; `rules` are, per example,
  LIME's `(feature condition, weight)` pairs, largest weight first (`("x[17] <= -0.52", 0.08)`)."""

  weights: np.ndarray  # [num_examples, *input_shape]
  intercepts: np.ndarray  # [num_examples]
  scores: np.ndarray  # [num_examples]: the local model's R^2 on the perturbed samples
  targets: np.ndarray  # [num_examples]: the explained classes
  rules: list[list[tuple[str, float]]]


def lime_explanations(apply_fn: ApplyFn, variables: Any, inputs: Any, training_inputs: Any,
                      target_classes: Any = None, *, num_samples: int = 2000,
                      seed: int = 0) -> LimeResult:
  """LIME (the `lime` package's tabular explainer, every input element a feature) for each
  example: a linear model of the target class's probability fitted to `num_samples` perturbed
  copies, whose features draw quartile bins of `training_inputs` (`[num_training,
  *input_shape]`), weighted by their closeness to the example. Otherwise as `shap_values`."""
  lime_tabular = _require("lime.lime_tabular")
  inputs, targets = _checked(inputs, target_classes, "lime_explanations")
  training = _reference_examples(training_inputs, inputs, "training_inputs", minimum=4,
                                 why=" (LIME bins features into quartiles)")
  features = int(np.prod(inputs.shape[1:]))
  probabilities = _black_box(apply_fn, variables, inputs.shape[1:], inputs.dtype, softmax=True)
  flat = inputs.reshape(inputs.shape[0], features)
  targets = probabilities(flat).argmax(axis=1) if targets is None else targets
  names = [f"x[{', '.join(map(str, np.unravel_index(i, inputs.shape[1:])))}]"
           for i in range(features)]
  explainer = lime_tabular.LimeTabularExplainer(training, mode="classification",
                                                feature_names=names, random_state=seed)
  weights = np.zeros((inputs.shape[0], features))
  intercepts, scores, rules = [], [], []
  for index, (row, target) in enumerate(zip(flat, targets)):
    explanation = explainer.explain_instance(row, probabilities, labels=(int(target),),
                                             num_features=features, num_samples=num_samples)
    for feature, weight in explanation.as_map()[int(target)]:
      weights[index, feature] = weight
    intercepts.append(float(explanation.intercept[int(target)]))
    scores.append(float(explanation.score))
    rules.append([(text, float(weight)) for text, weight in explanation.as_list(int(target))])
  return LimeResult(weights=weights.reshape(inputs.shape), intercepts=np.asarray(intercepts),
                    scores=np.asarray(scores), targets=np.asarray(targets), rules=rules)


def _reference_examples(examples: Any, inputs: np.ndarray, name: str, *, minimum: int,
                        why: str = "") -> np.ndarray:
  """`examples`, at least `minimum` of the inputs' shape, as `[count, features]` of their dtype."""
  examples = np.asarray(examples, inputs.dtype)
  if (examples.ndim != inputs.ndim or examples.shape[1:] != inputs.shape[1:]
      or examples.shape[0] < minimum):
    raise ValueError(f"{name} must be at least {minimum} example(s) of the inputs' shape "
                     f"{inputs.shape[1:]}{why}; got {examples.shape}.")
  return examples.reshape(len(examples), -1)
