"""Seeing inside a trained model: evaluation, plots, attribution, adversarial robustness.

Each piece is a function of a `TrainState` (or an apply function and variables) and data, and
works on a finished run loaded with `jdl.runs.load_run(workdir)`:

  `evaluation`: predictions, confusion matrix, per-class and top-k accuracy, calibration (ECE);
  `plots`: learning curves, confusion heatmap, misclassified examples, reliability diagram,
    attribution overlays, curves (PNG, headless);
  `attribution`: saliency, SmoothGrad, integrated gradients, occlusion;
  `adversarial`: FGSM and PGD attacks, robust accuracy, adversaries for adversarial training;
  `explain` (import it yourself; needs the `explain` extra): SHAP and LIME.
"""

from jdl.analysis import adversarial, attribution, evaluation, plots

__all__ = ["adversarial", "attribution", "evaluation", "plots"]
