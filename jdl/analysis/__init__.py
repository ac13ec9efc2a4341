"""Seeing inside a trained model: evaluation, plots, attribution, adversarial robustness.

Each piece is a function of a `TrainState` (or an apply function and variables) and data, and
works on a finished run loaded with `jdl.runs.load_run(workdir)`.
"""
