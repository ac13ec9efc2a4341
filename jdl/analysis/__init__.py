"""Seeing inside a trained model: `evaluation` (metrics, calibration), `plots` (PNG figures),
`attribution` (saliency, integrated gradients, occlusion) and `adversarial` (attacks, robust
accuracy, adversarial training).

Each is a function of a `TrainState` (or an apply function and variables) and data, and works on a
finished run loaded with `jdl.runs.load_run(workdir)`. `explain` (SHAP and LIME) needs the
`explain` extra and is imported on its own: `from jdl.analysis import explain`.
"""

from jdl.analysis import adversarial, attribution, evaluation, plots

__all__ = ["adversarial", "attribution", "evaluation", "plots"]
