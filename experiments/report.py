"""An HTML report of a trained run: what it learned, where it fails, how sure it is.

  python -m experiments.mnist1d --workdir=runs/mnist1d
  python -m experiments.report --workdir=runs/mnist1d                  # runs/mnist1d/report.html
  python -m experiments.report --workdir=runs/mnist1d --checkpoint=best --out=/tmp/mnist1d.html

The run is loaded from its workdir (`jdl.runs.load_run`), its dataset's eval split is read again
(from the run's config: dataset, data_dir, eval_split) and the restored model is evaluated on all
of it (`jdl.analysis.evaluation.evaluate_classifier`). The page leads with a summary (accuracy,
loss, calibration error), the learning curves and the confusion matrix, then per-class accuracy, a
grid of misclassified examples and the reliability diagram with the expected calibration error;
the last metrics record, the config and the versions come last, folded. The command also adds
integrated-gradients overlays (`jdl.analysis.attribution`) and robust accuracy against the attack
size for FGSM and PGD (`jdl.analysis.adversarial`) when those modules are installed.

The PNGs are written to a folder beside the page (`report/` for `report.html`) and embedded in the
page as data URIs, so the HTML is one self-contained file to copy or mail. A task without class
labels per example (`language_model`) or without pictures (token ids) gets the parts that apply
and a note saying what was left out.

Other analyses add sections with `build_report(workdir, extra_sections=[(title, png_or_html)])`,
or with `section_builders`: functions of a `ReportContext` (the run, the eval split, the
evaluation, the figure folder) that return such sections.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import importlib.util
import inspect
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jdl import data as data_lib
from jdl import losses as losses_lib
from jdl import runs, tasks
from jdl.analysis import evaluation as evaluation_lib
from jdl.analysis import plots
from jdl.writers import JSONL_NAME, VERSIONS_NAME, read_jsonl

SectionContent = str | Sequence[str]
Section = tuple[str, SectionContent]
"""`(title, content)`: content is a picture's path (a PNG, shown as an image), an HTML fragment,
or a sequence of these, shown one after the other."""

IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                  ".svg": "image/svg+xml", ".gif": "image/gif"}

ATTRIBUTION_EXAMPLES = 8
"""Examples of the eval split shown with their integrated-gradients attribution."""

EXPLAINED_EXAMPLES = 4
"""Examples explained side by side by integrated gradients, SHAP and LIME (the first ones)."""

SHAP_BACKGROUND = 50
"""Eval-split examples (after the explained ones) that stand for a masked feature in SHAP (10 for
inputs of more than 256 values, such as images)."""

LIME_TRAINING = 500
"""Eval-split examples (after the explained ones) that give LIME its feature quartiles."""

ROBUSTNESS_EXAMPLES = 500
"""Examples of the eval split attacked for the robust accuracy curve (the first ones)."""

EPSILON_FRACTIONS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
"""Attack sizes (L-infinity) as fractions of the inputs' value range."""


@dataclasses.dataclass(frozen=True)
class ReportContext:
  """What a section builder gets: the loaded run and its evaluation.

  Attributes:
    run: the restored run (`state`, `config`, `meta`, `vocabulary`, `step`).
    inputs: the eval split's inputs, or None when the task or the data gave none.
    labels: the eval split's labels, or None.
    evaluation: the evaluation of the run on them, or None.
    figure_dir: the folder for the section's PNGs.
    log: where a section's messages go (what went wrong, beside the note on the page).
  """

  run: runs.Run
  inputs: np.ndarray | None
  labels: np.ndarray | None
  evaluation: evaluation_lib.EvaluationReport | None
  figure_dir: str
  log: Callable[[str], None] = print


SectionBuilder = Callable[[ReportContext], Sequence[Section]]


# ---------------------------------------------------------------------------------------------
# Data and evaluation.


def load_eval_split(run: runs.Run) -> tuple[np.ndarray, np.ndarray]:
  """The whole eval split of the run's dataset as `(inputs, labels)` arrays, read the way the run
  read it (`config.dataset`, `config.data_dir`, `config.eval_split`), the inputs as the model
  takes them: uint8 pixels scaled to float32 in [0, 1] on the device, as in training.

  Raises:
    ValueError: the task has no per-example class labels (a language model), or the data do not
      have the shape the model was trained on.
    jdl.data.DatasetUnavailableError: the dataset is not on disk and cannot be prepared.
  """
  config = run.config
  pixels = False
  if config.task == "classification":
    builder = data_lib.get_builder(config.dataset, config.data_dir)
    data_lib.prepare(builder, download=config.download, manual_dir=config.manual_dir)
    inputs, labels = data_lib.load_split_arrays(builder, config.eval_split)
    pixels = data_lib.dataset_meta(builder).pixels
  elif config.task == "text_classification":
    # The words are numbered with the vocabulary built from the training texts, as in training.
    _, eval_source, _, vocabulary = runs.load_task_data(config)
    if run.vocabulary is not None and vocabulary != run.vocabulary:
      raise ValueError("the vocabulary rebuilt from the training texts differs from the run's "
                       f"{runs.VOCAB_NAME}; the word ids would not be the ones the model learned.")
    inputs, labels = np.asarray(eval_source.inputs), np.asarray(eval_source.labels)
  else:
    raise ValueError(f"task {config.task!r} has no per-example class labels to evaluate a "
                     "classifier on.")
  if tuple(inputs.shape[1:]) != tuple(run.state.input_shape):
    raise ValueError(f"split {config.eval_split!r} of {config.dataset!r} has inputs of shape "
                     f"{tuple(inputs.shape[1:])}, but the run's model takes "
                     f"{tuple(run.state.input_shape)}.")
  if pixels:
    return np.asarray(jax.jit(tasks.unit_pixels)(inputs)), labels
  return inputs.astype(run.state.input_dtype), labels


# ---------------------------------------------------------------------------------------------
# HTML pieces.


def _escape(value: Any) -> str:
  """`value` as HTML text (quotes stay as they are: this is for element text, not attributes)."""
  return html.escape(str(value), quote=False)


def _attribute(value: Any) -> str:
  """`value` escaped for a double-quoted attribute."""
  return html.escape(str(value), quote=True)


def _number(value: Any) -> str:
  if isinstance(value, bool) or value is None:
    return _escape(value)
  if isinstance(value, float):
    return "nan" if math.isnan(value) else f"{value:.6g}"
  return _escape(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, css_class: str = "") -> str:
  head = "".join(f"<th>{_escape(cell)}</th>" for cell in header)
  body = "".join("<tr>" + "".join(f"<td>{_number(cell)}</td>" for cell in row) + "</tr>"
                 for row in rows)
  return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _note(text: str) -> str:
  return f'<p class="note">{_escape(text)}</p>'


def image_tag(path: str, *, alt: str, embed: bool = True, relative_to: str | None = None) -> str:
  """An `<img>` of the picture at `path`: embedded as a data URI, or referenced by its path
  relative to the folder `relative_to` (the page's)."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in IMAGE_SUFFIXES:
    raise ValueError(f"{path!r} is not a picture the page can show; expected one of "
                     f"{sorted(IMAGE_SUFFIXES)}.")
  if embed:
    with open(path, "rb") as f:
      source = f"data:{IMAGE_SUFFIXES[suffix]};base64," + base64.b64encode(f.read()).decode("ascii")
  else:
    source = os.path.relpath(path, relative_to or os.getcwd()).replace(os.sep, "/")
  name = os.path.splitext(os.path.basename(path))[0]
  return (f'<img src="{_attribute(source)}" alt="{_attribute(alt)}" '
          f'data-figure="{_attribute(name)}">')


def _section_body(content: SectionContent, title: str, page_dir: str, embed: bool) -> str:
  """An extra section's content: a picture file becomes an `<img>`, anything else is HTML; a
  sequence of parts is each of them in turn."""
  if not isinstance(content, str):
    return "\n".join(_section_body(part, title, page_dir, embed) for part in content)
  if os.path.splitext(content)[1].lower() in IMAGE_SUFFIXES and os.path.isfile(content):
    return image_tag(content, alt=title, embed=embed, relative_to=page_dir)
  return content


# Sets `data-images` on <body> to "loaded N/N" once every picture has decoded, or to "broken ..."
# naming the ones that did not, so a headless browser's dumped DOM shows whether every plot shows.
_IMAGE_CHECK = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (image) {
    return !image.complete || image.naturalWidth === 0;
  });
  var names = broken.map(function (image) { return image.getAttribute("data-figure"); });
  document.body.setAttribute("data-images", broken.length === 0 ?
      "loaded " + images.length + "/" + images.length : "broken " + names.join(","));
  document.title = document.title + " [" + document.body.getAttribute("data-images") + "]";
});
</script>"""

_STYLE = """<style>
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f3f3f3; text-align: left; }
td { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }
details { margin: 0.5em 0; } summary { cursor: pointer; color: #345; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.note { color: #865; font-style: italic; }
</style>"""


def render_page(title: str, sections: Sequence[tuple[str, str]]) -> str:
  """The HTML document: `title` and `(heading, html body)` sections, with the image check."""
  parts = [f"<section><h2>{_escape(heading)}</h2>\n{body}\n</section>"
           for heading, body in sections]
  return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
          f"<title>{_escape(title)}</title>\n{_STYLE}\n</head>\n<body>\n<h1>{_escape(title)}</h1>\n"
          + "\n".join(parts) + f"\n{_IMAGE_CHECK}\n</body>\n</html>\n")


# ---------------------------------------------------------------------------------------------
# The standard sections.


def _summary_rows(run: runs.Run, report: evaluation_lib.EvaluationReport | None) -> list[list[Any]]:
  rows: list[list[Any]] = [["dataset", run.config.dataset], ["task", run.config.task],
                           ["model", run.config.model.name], ["eval split", run.config.eval_split],
                           ["checkpoint step", run.step]]
  if report is not None:
    rows += [["examples evaluated", report.num_examples], ["accuracy", report.accuracy]]
    rows += [[f"top-{k} accuracy", value] for k, value in report.top_k_accuracy.items() if k > 1]
    rows += [["log loss (nats)", report.log_loss],
             ["expected calibration error", report.expected_calibration_error],
             ["misclassified", len(report.misclassified)],
             ["model outputs", "probabilities" if report.outputs_were_probabilities else "logits"]]
  return rows


def _per_class_table(report: evaluation_lib.EvaluationReport) -> str:
  totals = report.confusion.sum(axis=1)
  rows = [[index, name, int(totals[index]), int(report.confusion[index, index]),
           float(report.per_class_accuracy[index])]
          for index, name in enumerate(report.class_names)]
  return _table(["class", "name", "examples", "correct", "accuracy"], rows, css_class="per-class")


def _misclassified_texts(ctx: ReportContext, max_examples: int) -> str:
  report = ctx.evaluation
  rows = []
  for index in report.misclassified[:max_examples]:
    text = ctx.run.vocabulary.decode(ctx.inputs[index]) if ctx.run.vocabulary else ctx.inputs[index]
    rows.append([int(index), report.class_names[report.labels[index]],
                 report.class_names[report.predictions[index]], str(text)[:300]])
  return _table(["example", "true", "predicted", "text"], rows)


def _standard_sections(ctx: ReportContext, records: Sequence[Mapping[str, Any]],
                       notes: Sequence[str], max_examples: int, page_dir: str,
                       embed: bool) -> list[tuple[str, str]]:
  run, report, figures = ctx.run, ctx.evaluation, ctx.figure_dir

  def img(path: str, alt: str) -> str:
    return image_tag(path, alt=alt, embed=embed, relative_to=page_dir)

  sections = [("Summary", _table(["", "value"], _summary_rows(run, report), css_class="summary")
               + "".join(_note(note) for note in notes))]
  if records:
    try:
      sections.append(("Learning curves", img(plots.plot_learning_curves(
          records, os.path.join(figures, "learning_curves.png")), "learning curves")))
    except ValueError as error:
      sections.append(("Learning curves", _note(f"no learning curves: {error}")))
  if report is None:
    return sections
  sections.append(("Confusion matrix", img(plots.plot_confusion_matrix(
      report.confusion, report.class_names, os.path.join(figures, "confusion_matrix.png")),
      "confusion matrix")))
  sections.append(("Per-class accuracy", _per_class_table(report)))
  try:
    grid = plots.plot_misclassified(ctx.inputs, report.labels, report.predictions,
                                    report.misclassified, report.class_names,
                                    os.path.join(figures, "misclassified.png"),
                                    max_examples=max_examples)
    misclassified = img(grid, "misclassified examples")
  except ValueError as error:  # token ids: no picture, so their decoded text
    misclassified = _note(f"no picture of these inputs ({error})") + _misclassified_texts(
        ctx, max_examples)
  sections.append((f"Misclassified examples ({len(report.misclassified)} of "
                   f"{report.num_examples})", misclassified))
  sections.append(("Calibration", img(plots.plot_reliability_diagram(
      report.reliability, os.path.join(figures, "reliability_diagram.png")), "reliability diagram")
      + _note(f"expected calibration error {report.expected_calibration_error:.4f} over "
              f"{report.reliability.num_bins} equal-width confidence bins")))
  return sections


def _folded(label: str, body: str) -> str:
  return f"<details><summary>{_escape(label)}</summary>\n{body}\n</details>"


def _appendix_sections(workdir: str, records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
  """What the run was, folded at the end of the page: the last metrics record, the config and
  the versions (a reader wants the results first; these are for checking and reproducing)."""
  if records:
    last = records[-1]
    metrics = _folded(f"the last of {len(records)} records of {JSONL_NAME}, at step "
                      f"{last.get('step')}",
                      _table(["metric", "value"], sorted(last.items()), css_class="final"))
  else:
    metrics = _note(f"{JSONL_NAME} holds no records.")
  with open(os.path.join(workdir, runs.CONFIG_NAME), encoding="utf-8") as f:
    config = json.load(f)
  details = _folded(f"{runs.CONFIG_NAME} ({len(config)} top-level keys)",
                    f'<pre class="config">{_escape(json.dumps(config, indent=2, sort_keys=True))}'
                    "</pre>")
  versions_path = os.path.join(workdir, VERSIONS_NAME)
  if os.path.isfile(versions_path):
    with open(versions_path, encoding="utf-8") as f:
      versions = json.dumps(json.load(f), indent=2, sort_keys=True)
    details += _folded(VERSIONS_NAME, f'<pre class="versions">{_escape(versions)}</pre>')
  return [("Final metrics", metrics), ("Config and versions", details)]


# ---------------------------------------------------------------------------------------------
# The report.


def default_output(workdir: str) -> str:
  """`WORKDIR/report.html`."""
  return os.path.join(workdir, "report.html")


def build_report(
    workdir: str,
    *,
    out: str | None = None,
    checkpoint: str | int = "latest",
    extra_sections: Sequence[Section] = (),
    section_builders: Sequence[SectionBuilder] = (),
    max_examples: int = 25,
    embed: bool = True,
    batch_size: int = 1000,
    log: Callable[[str], None] = print,
) -> str:
  """Writes the HTML report of the run in `workdir` and returns the page's path.

  Args:
    workdir: a workdir written by `jdl.train_and_evaluate` (with checkpoints).
    out: the page's path; default `WORKDIR/report.html`. The PNGs go to the folder of the same
      name without `.html` (`WORKDIR/report/`).
    checkpoint: "latest", "best" or a step number (see `jdl.runs.load_run`).
    extra_sections: `(title, content)` pairs appended to the page; content is a picture's path
      (embedded), an HTML fragment, or a sequence of these.
    section_builders: functions `ctx -> [(title, content), ...]` of a `ReportContext`, run after
      the evaluation (e.g. `optional_section_builders()`); one that fails leaves a note on the
      page instead of stopping the report.
    max_examples: the most misclassified examples drawn.
    embed: embed the PNGs as data URIs (one self-contained file); False links them by relative
      path.
    batch_size: examples per forward pass of the evaluation.
    log: where progress messages go.

  Returns:
    The path of the HTML page.
  """
  out = out or default_output(workdir)
  if os.path.splitext(out)[1].lower() not in (".html", ".htm"):
    raise ValueError(f"out must name an .html file (its PNGs go to the folder of the same name "
                     f"without the suffix); got {out!r}.")
  page_dir = os.path.dirname(os.path.abspath(out))
  figure_dir = os.path.splitext(os.path.abspath(out))[0]
  run = runs.load_run(workdir, checkpoint=checkpoint, log=log)
  os.makedirs(figure_dir, exist_ok=True)
  records = read_jsonl(workdir) if os.path.exists(os.path.join(workdir, JSONL_NAME)) else []
  notes, inputs, labels, report = [], None, None, None
  try:
    inputs, labels = load_eval_split(run)
  except (ValueError, data_lib.DatasetUnavailableError) as error:
    notes.append(f"No evaluation of the eval split: {error} The confusion matrix, per-class "
                 "accuracy, misclassified examples and calibration are left out.")
  if inputs is not None:
    log(f"evaluating step {run.step} on {len(labels)} examples of {run.config.eval_split!r}")
    report = evaluation_lib.evaluate_classifier(
        run.state, inputs, labels, class_names=run.meta.class_names,
        top_k=(1, 5, *tuple(run.config.get("top_k", ()))), batch_size=batch_size)
  ctx = ReportContext(run, inputs, labels, report, figure_dir, log)
  sections = _standard_sections(ctx, records, notes, max_examples, page_dir, embed)
  for builder in section_builders:
    name = getattr(builder, "__name__", repr(builder))
    try:  # one analysis that fails must not sink the rest of the report
      built = list(builder(ctx))
    except Exception as error:  # pylint: disable=broad-except
      log(f"section {name} failed: {type(error).__name__}: {error}")
      built = [(name, _note(f"this section failed: {type(error).__name__}: {error}"))]
    extra_sections = [*extra_sections, *built]
  for title, content in extra_sections:
    sections.append((title, _section_body(content, title, page_dir, embed)))
  sections += _appendix_sections(workdir, records)
  title = f"jdl report: {os.path.basename(os.path.abspath(workdir))} (step {run.step})"
  with open(out, "w", encoding="utf-8") as f:
    f.write(render_page(title, sections))
  log(f"wrote {out}")
  return out


# ---------------------------------------------------------------------------------------------
# Optional analyses: attribution and adversarial robustness, when their modules exist.


def _supported(function: Callable[..., Any], options: Mapping[str, Any]) -> dict[str, Any]:
  """The keyword options `function` takes (an analysis module may not take them all)."""
  parameters = inspect.signature(function).parameters
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
    return dict(options)
  return {key: value for key, value in options.items() if key in parameters}


def _drawable(ctx: ReportContext) -> str | None:
  """Why the eval split's inputs cannot be attributed or attacked, or None when they can."""
  if ctx.evaluation is None or ctx.inputs is None:
    return "there is no evaluated eval split"
  if not np.issubdtype(ctx.inputs.dtype, np.floating):
    return "the inputs are token ids, which have no gradient"
  return None


def attribution_section(ctx: ReportContext) -> list[Section]:
  """Integrated-gradients overlays of the first `ATTRIBUTION_EXAMPLES` examples, attributing the
  predicted class (`jdl.analysis.attribution.integrated_gradients`, zero baseline)."""
  from jdl.analysis import attribution  # pylint: disable=import-outside-toplevel

  title = "Attribution: integrated gradients"
  reason = _drawable(ctx)
  if reason is not None:
    return [(title, _note(f"left out: {reason}."))]
  report, state = ctx.evaluation, ctx.run.state
  count = min(ATTRIBUTION_EXAMPLES, report.num_examples)
  inputs, predicted = ctx.inputs[:count], report.predictions[:count]
  attributions = np.asarray(attribution.integrated_gradients(
      state.apply_fn, state.variables(), inputs, predicted,
      **_supported(attribution.integrated_gradients, {"baseline": None, "steps": 64})))
  titles = [f"#{index} true {report.class_names[report.labels[index]]}, "
            f"pred {report.class_names[predicted[index]]}" for index in range(count)]
  path = plots.plot_attribution_overlays(inputs, attributions, os.path.join(
      ctx.figure_dir, "integrated_gradients.png"), titles=titles)
  return [(title, [path, _note(
      "attribution of the predicted class's score against an all-zero baseline; images: "
      "brighter is more attribution; signals: red raises the score, blue lowers it")])]


def explanation_section(ctx: ReportContext) -> list[Section]:
  """Integrated gradients beside SHAP and LIME (`jdl.analysis.explain`, whichever of the `shap`
  and `lime` packages is installed) for the first `EXPLAINED_EXAMPLES` examples, each explaining
  the predicted class, with LIME's rules for the first example and SHAP's local-accuracy check."""
  from jdl.analysis import attribution, explain  # pylint: disable=import-outside-toplevel

  title = "Attribution: integrated gradients, SHAP and LIME"
  reason = _drawable(ctx)
  if reason is None and ctx.evaluation.num_examples <= EXPLAINED_EXAMPLES + 4:
    reason = "the eval split is too small to give SHAP and LIME their reference examples"
  if reason is not None:
    return [(title, _note(f"left out: {reason}."))]
  report, state, variables = ctx.evaluation, ctx.run.state, ctx.run.state.variables()
  count = EXPLAINED_EXAMPLES
  inputs, predicted = ctx.inputs[:count], report.predictions[:count]
  reference = ctx.inputs[count:]
  methods = {"integrated gradients": np.asarray(attribution.integrated_gradients(
      state.apply_fn, variables, inputs, predicted, steps=64))}
  parts: list[str] = []
  for package in ("shap", "lime"):
    if importlib.util.find_spec(package) is None:
      parts.append(_note(f"{package.upper()} is left out: the {package} package is not installed "
                         '(pip install -e ".[explain]").'))
  if importlib.util.find_spec("shap") is not None:
    # Each evaluation runs the whole background, and images need 2 * pixels + 1 of them.
    background = reference[:SHAP_BACKGROUND if inputs[0].size <= 256 else 10]
    shap = explain.shap_values(state.apply_fn, variables, inputs, background, predicted,
                               seed=int(ctx.run.config.seed))
    methods["SHAP"] = shap.values
    residual = np.abs(shap.values.reshape(count, -1).sum(axis=1) + shap.expected_values
                      - shap.outputs).max()
    parts.append(_note(
        f"SHAP: permutation explainer, {len(background)} eval examples as "
        f"the background; expected output {np.mean(shap.expected_values):.4g}; values plus the "
        f"expected value equal the output to {residual:.2g} (local accuracy)"))
  if importlib.util.find_spec("lime") is not None:
    lime = explain.lime_explanations(state.apply_fn, variables, inputs, reference[:LIME_TRAINING],
                                     predicted, seed=int(ctx.run.config.seed))
    methods["LIME"] = lime.weights
    first = report.class_names[predicted[0]]
    parts.append(_note(
        f"LIME: a linear model of the predicted class's probability on quartile bins of "
        f"{min(LIME_TRAINING, len(reference))} eval examples; example #0 (predicted {first}, "
        f"local fit R^2 {lime.scores[0]:.2f}), its strongest rules:"))
    parts.append(_table(["rule", f"weight for P({first})"], lime.rules[0][:8], css_class="lime"))
  names = list(methods)
  tiles = np.concatenate([np.stack([inputs[i]] * len(names)) for i in range(count)])
  weights = np.concatenate([np.stack([methods[name][i] for name in names]) for i in range(count)])
  titles = [f"#{i} pred {report.class_names[predicted[i]]}: {name}"
            for i in range(count) for name in names]
  path = plots.plot_attribution_overlays(tiles, weights, os.path.join(
      ctx.figure_dir, "explanations.png"), titles=titles, columns=len(names))
  return [(title, [path, *parts])]


def robustness_section(ctx: ReportContext) -> list[Section]:
  """Accuracy under FGSM and PGD L-infinity attacks of growing size, on the first
  `ROBUSTNESS_EXAMPLES` examples (`jdl.analysis.adversarial.robust_accuracy_curve`; PGD with its
  default steps, from a random start keyed by the run's seed). The sizes
  are `EPSILON_FRACTIONS` of the inputs' value range, which is [0, 1] for pixels and the data's
  min to max otherwise (e.g. MNIST-1D's signals)."""
  from jdl.analysis import adversarial  # pylint: disable=import-outside-toplevel

  title = "Robustness: accuracy under attack"
  reason = _drawable(ctx)
  if reason is not None:
    return [(title, _note(f"left out: {reason}."))]
  state = ctx.run.state
  count = min(ROBUSTNESS_EXAMPLES, ctx.evaluation.num_examples)
  inputs, labels = ctx.inputs[:count], ctx.labels[:count]
  low, high = float(np.min(ctx.inputs)), float(np.max(ctx.inputs))
  if low >= 0.0 and high <= 1.0:
    low, high = 0.0, 1.0
  epsilons = [fraction * (high - low) for fraction in EPSILON_FRACTIONS]
  base = {"norm": "linf", "value_range": (low, high)}
  if ctx.evaluation.outputs_were_probabilities:  # the attacks' default loss expects logits
    base["loss"] = losses_lib.cross_entropy_from_probabilities
  curves, failures = {}, []
  for attack in ("fgsm", "pgd"):
    options = {"attack": attack, **base}
    if attack == "pgd":  # its random start; the run's seed makes the report reproducible
      options["key"] = jax.random.PRNGKey(int(ctx.run.config.seed))
    options = _supported(adversarial.robust_accuracy_curve, options)
    try:
      accuracies = adversarial.robust_accuracy_curve(state.apply_fn, state.variables(), inputs,
                                                     labels, epsilons, **options)
    except Exception as error:  # pylint: disable=broad-except  # keep the other attack's curve
      failures.append(_note(f"{attack.upper()} failed: {type(error).__name__}: {error}"))
      ctx.log(f"robustness: {attack} failed: {type(error).__name__}: {error}")
      continue
    curves[attack.upper()] = [float(value) for value in np.asarray(accuracies).reshape(-1)]
  if not curves:
    return [(title, failures)]
  path = plots.plot_curve(epsilons, curves, os.path.join(ctx.figure_dir, "robust_accuracy.png"),
                          xlabel="epsilon (L-infinity)", ylabel="accuracy",
                          title=f"robust accuracy on {count} examples")
  rows = [[epsilon, *[curves[name][index] for name in curves]]
          for index, epsilon in enumerate(epsilons)]
  return [(title, [path, _table(["epsilon", *curves], rows),
                   _note(f"attacked inputs are clipped to [{low:.4g}, {high:.4g}]"), *failures])]


def optional_section_builders(log: Callable[[str], None] = print) -> list[SectionBuilder]:
  """The section builders of the analysis modules that can be imported: `attribution_section`
  with `jdl.analysis.attribution`, then `explanation_section` where the `shap` or `lime` package
  is installed, and `robustness_section` with `jdl.analysis.adversarial`."""
  builders: list[SectionBuilder] = []
  for module, builder in (("attribution", attribution_section),
                          ("adversarial", robustness_section)):
    try:
      __import__(f"jdl.analysis.{module}")
    except ImportError as error:
      log(f"jdl.analysis.{module} is not available ({error}); its section is left out.")
      continue
    builders.append(builder)
  if attribution_section in builders:
    if any(importlib.util.find_spec(package) for package in ("shap", "lime")):
      builders.insert(1, explanation_section)
    else:
      log('neither shap nor lime is installed (pip install -e ".[explain]"); the SHAP and LIME '
          "section is left out.")
  return builders


# ---------------------------------------------------------------------------------------------
# Command line.

USAGE = """usage: python -m experiments.report --workdir=DIR [--out=FILE] [--checkpoint=WHICH]

  --workdir=DIR        a run's workdir (config.json, data.json, metrics.jsonl, checkpoints/)
  --out=FILE           the HTML page (default DIR/report.html; PNGs go to FILE without .html/)
  --checkpoint=WHICH   latest (default), best (by the run's best_metric) or a step number
  --max_examples=N     misclassified examples drawn (default 25)
  --no_optional        leave out the attribution (gradients, SHAP, LIME) and robustness sections
"""


def parse_arguments(argv: Sequence[str]) -> dict[str, Any] | None:
  """`--workdir`, `--out`, `--checkpoint`, `--max_examples` and `--no_optional` as keyword
  arguments; None after `--help`."""
  options: dict[str, Any] = {"out": None, "checkpoint": "latest", "max_examples": 25,
                             "optional": True}
  for arg in argv:
    if arg in ("-h", "--help"):
      print(USAGE)
      return None
    if arg == "--no_optional":
      options["optional"] = False
      continue
    key, _, value = arg.partition("=")
    if key not in ("--workdir", "--out", "--checkpoint", "--max_examples") or not value:
      raise SystemExit(f"error: unexpected argument {arg!r}.\n{USAGE}")
    options[key[2:]] = value
  if "workdir" not in options:
    raise SystemExit(f"error: --workdir=DIR is required.\n{USAGE}")
  checkpoint = options["checkpoint"]
  if checkpoint not in ("latest", "best") and not checkpoint.isdigit():
    raise SystemExit(f"error: --checkpoint must be latest, best or a step number; got "
                     f"{checkpoint!r}.")
  options["checkpoint"] = checkpoint if not checkpoint.isdigit() else int(checkpoint)
  if not str(options["max_examples"]).isdigit() or int(options["max_examples"]) < 1:
    raise SystemExit(f"error: --max_examples must be a positive integer; got "
                     f"{options['max_examples']!r}.")
  options["max_examples"] = int(options["max_examples"])
  return options


def main(argv: Sequence[str] | None = None) -> str | None:
  """Builds the report of `--workdir`, with the optional analyses; returns the page's path."""
  options = parse_arguments(sys.argv[1:] if argv is None else argv)
  if options is None:
    return None
  builders = optional_section_builders() if options.pop("optional") else []
  try:
    return build_report(options.pop("workdir"), section_builders=builders, **options)
  except FileNotFoundError as error:
    raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
  main()
