"""Evaluation metrics, plots and the HTML report (jdl.analysis.evaluation, jdl.analysis.plots,
experiments.report)."""

import importlib.util
import os
import re
import shutil
import subprocess

import jax
import matplotlib.image
import numpy as np
import optax
import pytest

import jdl
from jdl import models, runs
from jdl.analysis import evaluation, plots
from jdl.writers import read_jsonl

from experiments import mnist1d, report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPORT_FIGURES = ("learning_curves", "confusion_matrix", "misclassified", "reliability_diagram")


def _is_png(path):
  with open(path, "rb") as f:
    head = f.read(len(PNG_SIGNATURE))
  return head == PNG_SIGNATURE and os.path.getsize(path) > 1000


def _random_logits(num_examples=500, num_classes=7, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
  logits = rng.normal(size=(num_examples, num_classes)).astype(np.float32)
  logits[np.arange(num_examples), labels] += 1.0  # better than chance, far from perfect
  return logits, labels


# ---------------------------------------------------------------------------------------------
# Metrics.


def test_confusion_matrix_sums_to_the_split_and_its_trace_is_the_accuracy():
  logits, labels = _random_logits()
  result = evaluation.evaluate_outputs(logits, labels)
  predictions = logits.argmax(axis=1)
  assert result.confusion.shape == (7, 7)
  assert result.confusion.sum() == len(labels)
  np.testing.assert_array_equal(result.confusion.sum(axis=1), np.bincount(labels, minlength=7))
  assert np.trace(result.confusion) / len(labels) == pytest.approx(np.mean(predictions == labels))
  assert result.accuracy == pytest.approx(np.mean(predictions == labels))
  np.testing.assert_array_equal(result.misclassified, np.flatnonzero(predictions != labels))
  assert 0.3 < result.accuracy < 0.9


def test_confusion_matrix_and_per_class_accuracy_by_hand():
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
  predictions = np.array([0, 1, 0, 1, 1, 0, 2, 1, 2])
  matrix = evaluation.confusion_matrix(labels, predictions, num_classes=4)
  expected = np.array([[2, 1, 0, 0], [0, 2, 0, 0], [1, 1, 2, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(matrix, expected)
  per_class = evaluation.per_class_accuracy(matrix)
  np.testing.assert_allclose(per_class[:3], [2 / 3, 1.0, 2 / 4])
  assert np.isnan(per_class[3])  # no examples: undefined, not 0
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
    evaluation.confusion_matrix(labels, predictions, num_classes=2)


def test_top_k_accuracy_top1_is_accuracy_and_grows_with_k():
  logits, labels = _random_logits(num_classes=10)
  accuracy = np.mean(logits.argmax(axis=1) == labels)
  values = [evaluation.top_k_accuracy(logits, labels, k) for k in range(1, 11)]
  assert values[0] == pytest.approx(accuracy)
  assert all(a <= b for a, b in zip(values, values[1:]))
  assert values[-1] == 1.0
  # Ties are broken as argmax breaks them, so top-1 is still the accuracy.
  tied = np.zeros((4, 3), np.float32)
  assert evaluation.top_k_accuracy(tied, np.array([0, 1, 2, 0]), 1) == 0.5
  assert evaluation.top_k_accuracy(tied, np.array([0, 1, 2, 0]), 2) == 0.75
  result = evaluation.evaluate_outputs(logits, labels, top_k=(1, 3, 5, 10))
  assert set(result.top_k_accuracy) == {1, 3, 5}  # k >= num_classes is always 1: left out
  assert result.top_k_accuracy[5] == pytest.approx(values[4])


def test_probabilities_or_logits_are_told_apart():
  logits, labels = _random_logits()
  probabilities = evaluation.softmax_probabilities(logits)
  assert not evaluation.outputs_are_probabilities(logits)
  assert evaluation.outputs_are_probabilities(probabilities.astype(np.float32))
  np.testing.assert_allclose(evaluation.softmax_probabilities(probabilities), probabilities)
  from_logits = evaluation.evaluate_outputs(logits, labels)
  from_probabilities = evaluation.evaluate_outputs(probabilities.astype(np.float32), labels)
  assert not from_logits.outputs_were_probabilities
  assert from_probabilities.outputs_were_probabilities
  assert from_probabilities.expected_calibration_error == pytest.approx(
      from_logits.expected_calibration_error, abs=1e-6)
  assert from_probabilities.log_loss == pytest.approx(from_logits.log_loss, rel=1e-5)
  with pytest.raises(ValueError, match="look like logits"):
    evaluation.expected_calibration_error(logits, labels)


def test_expected_calibration_error_by_hand():
  # Two bins: (0, 0.5] and (0.5, 1]. Confidences 0.9, 0.8 (correct, wrong) land in the upper bin,
  # 0.4 (correct; three classes) in the lower one.
  probabilities = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.4, 0.3, 0.3]])
  labels = np.array([0, 0, 0])
  bins = evaluation.reliability_diagram_data(probabilities, labels, num_bins=2)
  np.testing.assert_array_equal(bins.count, [1, 2])
  np.testing.assert_allclose(bins.confidence, [0.4, 0.85])
  np.testing.assert_allclose(bins.accuracy, [1.0, 0.5])
  expected = 1 / 3 * abs(1.0 - 0.4) + 2 / 3 * abs(0.5 - 0.85)
  assert evaluation.expected_calibration_error(probabilities, labels, num_bins=2) == pytest.approx(
      expected)


def test_expected_calibration_error_is_zero_when_calibrated():
  # Confidence 0.8 and right on 8 of 10; confidence 0.6 and right on 3 of 5.
  high = np.tile([[0.8, 0.2]], (10, 1))
  low = np.tile([[0.6, 0.4]], (5, 1))
  probabilities = np.concatenate([high, low])
  labels = np.array([0] * 8 + [1] * 2 + [0] * 3 + [1] * 2)
  ece = evaluation.expected_calibration_error(probabilities, labels)
  assert ece == pytest.approx(0.0, abs=1e-12)
  bins = evaluation.reliability_diagram_data(probabilities, labels)
  assert bins.count.sum() == 15 and np.sum(bins.count > 0) == 2


def test_predict_batches_pad_and_match_one_call():
  """Outputs do not depend on the batch size (the last batch is padded), in eval mode."""
  model = models.MLP(hidden=(8,), num_classes=3, dropout_rate=0.5)
  inputs = np.random.default_rng(0).normal(size=(23, 5)).astype(np.float32)
  state = jdl.create_train_state(model, optax.sgd(0.1), inputs[:1], jax.random.PRNGKey(0))
  whole = evaluation.predict(state, inputs, batch_size=100)
  # Other batch sizes (and the eager apply) are other programs: the matmuls may round the logits
  # (of order 1, sums of a handful of products) a few float32 ulps differently.
  close = dict(rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(evaluation.predict(state, inputs, batch_size=5), whole, **close)
  np.testing.assert_allclose(whole, model.apply(state.variables(), inputs, train=False), **close)
  with pytest.raises(ValueError, match=r"per-example shape \(4,\).*built for \(5,\)"):
    evaluation.predict(state, inputs[:, :4])


# ---------------------------------------------------------------------------------------------
# Plots.


def test_every_plot_writes_a_png(tmp_path):
  logits, labels = _random_logits(num_examples=60, num_classes=4)
  result = evaluation.evaluate_outputs(logits, labels, class_names=["a", "b", "c", "d"])
  rng = np.random.default_rng(0)
  signals = rng.normal(size=(60, 40)).astype(np.float32)
  images = rng.uniform(size=(60, 8, 8, 1)).astype(np.float32)
  records = [{"step": 10 * i, "train_loss": 1.0 / (i + 1), "train_accuracy": 0.1 * i,
              "validation_loss": 1.2 / (i + 1), "validation_accuracy": None if i == 1 else 0.09 * i}
             for i in range(5)]
  paths = [
      plots.plot_learning_curves(records, str(tmp_path / "curves.png")),
      plots.plot_confusion_matrix(result.confusion, result.class_names, str(tmp_path / "cm.png")),
      plots.plot_misclassified(signals, labels, result.predictions, result.misclassified,
                               result.class_names, str(tmp_path / "wrong_signals.png")),
      plots.plot_misclassified(images, labels, result.predictions, result.misclassified, None,
                               str(tmp_path / "wrong_images.png"), max_examples=6),
      plots.plot_misclassified(images, labels, labels, [], None, str(tmp_path / "none.png")),
      plots.plot_reliability_diagram(result.reliability, str(tmp_path / "sub" / "rel.png")),
      plots.plot_attribution_overlays(images[:3], rng.normal(size=images[:3].shape),
                                      str(tmp_path / "overlay_images.png"), titles=["x", "y", "z"]),
      plots.plot_attribution_overlays(signals[:2], rng.normal(size=(2, 40)),
                                      str(tmp_path / "overlay_signals.png")),
      plots.plot_curve([0.0, 0.1, 0.2], {"FGSM": [0.9, 0.5, 0.2], "PGD": [0.9, 0.3, 0.1]},
                       str(tmp_path / "curve.png"), "epsilon", "accuracy", "robust accuracy"),
  ]
  for path in paths:
    assert _is_png(path), path
  assert plots.metric_prefixes(records) == ["train", "validation"]
  with pytest.raises(ValueError, match="token ids"):
    plots.plot_misclassified(np.zeros((3, 5), np.int32), labels[:3], labels[:3], [0], None,
                             str(tmp_path / "tokens.png"))


# ---------------------------------------------------------------------------------------------
# The report of a tiny MNIST-1D run.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, mnist1d_data_dir):
  workdir = str(tmp_path_factory.mktemp("tiny_mnist1d_run"))
  config = jdl.apply_overrides(mnist1d.get_config(), [
      f"data_dir={mnist1d_data_dir}", "model.name=mlp", "model.mlp.hidden=(32,)", "num_steps=40",
      "eval_every_steps=20", "progress=false", "batch_size=100", "eval_batch_size=500",
      "layout=none"])
  jdl.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def tiny_report(tiny_run):
  return report.build_report(tiny_run, log=lambda message: None)


def test_report_shows_every_plot_the_config_and_the_final_accuracy(tiny_run, tiny_report):
  assert tiny_report == os.path.join(tiny_run, "report.html")
  page = open(tiny_report, encoding="utf-8").read()
  for figure in REPORT_FIGURES:
    match = re.search(rf'<img src="data:image/png;base64,([^"]+)"[^>]*data-figure="{figure}"', page)
    assert match, figure
    assert _is_png(os.path.join(tiny_run, "report", f"{figure}.png"))
  assert '"dataset": "mnist1d"' in page and '"num_steps": 40' in page  # the config
  last = read_jsonl(tiny_run)[-1]
  assert f"<td>test_accuracy</td><td>{last['test_accuracy']:.6g}</td>" in page
  # The report's own evaluation of the latest checkpoint agrees with the run's last record.
  run = runs.load_run(tiny_run, log=lambda message: None)
  inputs, labels = report.load_eval_split(run)
  result = evaluation.evaluate_classifier(run.state, inputs, labels)
  assert result.confusion.sum() == len(labels) == 1000
  # Two programs (fit's compiled evaluation loop, the report's batched predictions): they may
  # disagree on an example whose logits tie to rounding, one of 1000.
  assert result.accuracy == pytest.approx(last["test_accuracy"], abs=1.01e-3)
  assert f"<td>accuracy</td><td>{result.accuracy:.6g}</td>" in page
  assert "Per-class accuracy" in page and page.count("<tr>") > 10


def test_report_takes_extra_sections_and_builders(tiny_run, tmp_path):
  png = plots.plot_curve([0, 1], {"a": [0, 1]}, str(tmp_path / "extra.png"), "x", "y", "extra")

  def failing(ctx):
    raise RuntimeError(f"broken analysis of step {ctx.run.step}")

  def builder(ctx):
    return [("Built", f"<p>{ctx.evaluation.num_examples} examples</p>")]

  out = report.build_report(tiny_run, out=str(tmp_path / "page.html"), embed=False,
                            extra_sections=[("Extra figure", png), ("Extra html", "<p>hi</p>")],
                            section_builders=[builder, failing], log=lambda message: None)
  page = open(out, encoding="utf-8").read()
  assert '<img src="extra.png"' in page and "<p>hi</p>" in page
  assert '<img src="page/confusion_matrix.png"' in page
  assert "<p>1000 examples</p>" in page
  assert "this section failed: RuntimeError: broken analysis of step 40" in page


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def _chromium():
  """The headless browser; under CI (CI=true, where .ci/run installs Debian's chromium) a missing
  one fails the test instead of skipping it."""
  for name in CHROMIUM_NAMES:
    if shutil.which(name):
      return shutil.which(name)
  if os.environ.get("CI") == "true":
    pytest.fail(f"CI=true but none of {CHROMIUM_NAMES} is on PATH; .ci/run installs Debian's "
                "chromium with apt-get.")
  pytest.skip(f"none of {CHROMIUM_NAMES} on PATH (Debian: apt-get install chromium)")


def _headless(browser, *arguments):
  command = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage",
             "--hide-scrollbars", "--virtual-time-budget=10000", *arguments]
  return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def test_report_renders_in_a_headless_browser_leading_with_the_results(tiny_report, tmp_path):
  """Chromium loads the page: its inline check marks <body> once every <img> has decoded; the
  sections run summary, curves, confusion matrix ... with the config folded at the end; and a
  screenshot of the first screen is not blank and shows a plot (coloured pixels)."""
  browser = _chromium()
  url = f"file://{os.path.abspath(tiny_report)}"
  dom = _headless(browser, "--dump-dom", url)
  count = dom.count("<img ")
  assert count >= len(REPORT_FIGURES)
  assert f'data-images="loaded {count}/{count}"' in dom, re.findall(r'data-images="[^"]*"', dom)
  headings = re.findall(r"<h2>([^<]*)</h2>", dom)
  assert headings[:3] == ["Summary", "Learning curves", "Confusion matrix"], headings
  assert headings[-2:] == ["Final metrics", "Config and versions"], headings
  config = dom.index('<pre class="config">')
  assert dom.rfind("<details>", 0, config) > dom.rfind("</details>", 0, config)  # folded

  shot = tmp_path / "first_screen.png"
  _headless(browser, "--window-size=1280,1600", f"--screenshot={shot}", url)
  pixels = matplotlib.image.imread(str(shot))[..., :3]
  assert pixels.shape[:2] == (1600, 1280)
  ink = np.mean(pixels.min(axis=-1) < 0.9)  # anything but white and the lightest greys
  colour = np.sum(pixels.max(axis=-1) - pixels.min(axis=-1) > 0.3)  # the plots' blue and orange
  assert ink > 0.02 and colour > 2000, (ink, colour)


def test_optional_sections_draw_attribution_and_robustness(tiny_run, tmp_path):
  """With jdl.analysis.attribution and .adversarial present, the command's extra sections draw
  integrated-gradients overlays and FGSM/PGD robust accuracy (which starts at the accuracy)."""
  pytest.importorskip("jdl.analysis.attribution")
  pytest.importorskip("jdl.analysis.adversarial")
  run = runs.load_run(tiny_run, log=lambda message: None)
  inputs, labels = report.load_eval_split(run)
  inputs, labels = inputs[:200], labels[:200]
  ctx = report.ReportContext(run, inputs, labels, evaluation.evaluate_classifier(
      run.state, inputs, labels), str(tmp_path), log=lambda message: None)
  builders = report.optional_section_builders(log=lambda message: None)
  explained = any(importlib.util.find_spec(package) for package in ("shap", "lime"))
  assert builders == [report.attribution_section, *[report.explanation_section] * explained,
                      report.robustness_section]
  (title, (overlay, _)), = report.attribution_section(ctx)
  assert "integrated gradients" in title and _is_png(overlay)
  (_, (curve, table, *notes)), = report.robustness_section(ctx)
  assert not any("failed" in note for note in notes), notes
  assert _is_png(curve)
  clean = re.search(r"<tr><td>0</td><td>([0-9.]+)</td><td>([0-9.]+)</td></tr>", table)
  # The attack at epsilon 0 and the plain predictions are two programs: within one example of 200.
  assert clean and float(clean.group(1)) == float(clean.group(2)) == pytest.approx(
      ctx.evaluation.accuracy, abs=1.01 / 200)


def test_report_explains_mnist1d_signals_with_shap_and_lime_beside_integrated_gradients(
    tiny_run, tmp_path, monkeypatch, request):
  """With the shap and lime packages, the report explains the first MNIST-1D signals' predicted
  classes three ways side by side; SHAP's values add up to the output, and LIME's rules for the
  first signal are on the page."""
  for package in ("shap", "lime"):
    pytest.importorskip(package, reason=f"the {package} package is not installed: pip install -e "
                        '".[explain]"')
  request.getfixturevalue("shap_without_numba")  # after the skips: it imports shap
  from jdl.analysis import explain  # pylint: disable=import-outside-toplevel

  # The report's sizes and the explainers' evaluation counts, cut to the least that exercises
  # every part of the section: two examples side by side, a background of 10 for SHAP and one
  # permutation forward and back (2 * 40 + 1 evaluations; local accuracy holds exactly for any
  # number of permutations), 100 examples for LIME's quartiles and 300 samples per example.
  monkeypatch.setattr(report, "EXPLAINED_EXAMPLES", 2)
  monkeypatch.setattr(report, "SHAP_BACKGROUND", 10)
  monkeypatch.setattr(report, "LIME_TRAINING", 100)
  shap_values, lime_explanations = explain.shap_values, explain.lime_explanations
  monkeypatch.setattr(explain, "shap_values", lambda *args, **kwargs: shap_values(
      *args, **{"max_evals": 81, **kwargs}))
  monkeypatch.setattr(explain, "lime_explanations", lambda *args, **kwargs: lime_explanations(
      *args, **{"num_samples": 300, **kwargs}))
  run = runs.load_run(tiny_run, log=lambda message: None)
  inputs, labels = report.load_eval_split(run)
  inputs, labels = inputs[:120], labels[:120]
  ctx = report.ReportContext(run, inputs, labels, evaluation.evaluate_classifier(
      run.state, inputs, labels), str(tmp_path), log=lambda message: None)
  sections = report.explanation_section(ctx)
  (title, (figure, shap_note, lime_note, lime_table)), = sections
  assert "SHAP and LIME" in title and _is_png(figure)
  assert figure.endswith("explanations.png")
  residual = float(re.search(r"equal the output to ([0-9.e+-]+)", shap_note).group(1))
  assert residual < 1e-4
  rules = re.findall(r"<tr><td>([^<]*x\[\d+\][^<]*)</td><td>(-?[0-9.e-]+)</td></tr>", lime_table)
  assert len(rules) == 8, lime_table
  assert abs(float(rules[0][1])) >= abs(float(rules[-1][1])) > 0
  out = report.build_report(tiny_run, out=str(tmp_path / "page.html"), extra_sections=sections,
                            log=lambda message: None)
  page = open(out, encoding="utf-8").read()
  assert 'data-figure="explanations"' in page and "LIME: a linear model" in page
  assert rules[0][0] in page
