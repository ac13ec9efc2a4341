"""PNG figures of a run and its evaluation, drawn headless.

Every function draws one figure, writes it to `path` (folders are created) and returns `path`.
Figures are `matplotlib.figure.Figure` objects on the Agg canvas, outside pyplot: no display is
needed, the caller's pyplot backend is left alone, and no figure outlives its function.

Inputs are drawn by their per-example shape: `[H, W]` and `[H, W, C]` as images, `[length]` and
`[length, channels <= MAX_SIGNAL_CHANNELS]` as 1-D signals; only floating inputs can be drawn.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from jdl.analysis.evaluation import ReliabilityBins

MAX_SIGNAL_CHANNELS = 4
"""A `[length, channels]` input with at most this many channels is a signal, wider is an image."""

MAX_ANNOTATED_CLASSES = 30
"""Confusion matrices up to this many classes get a count written in every cell."""


def _check_drawable(inputs: np.ndarray) -> str:
  """"image" or "signal", the kind of the examples of a batch `[N, ...]` of floating inputs."""
  if not np.issubdtype(inputs.dtype, np.floating):
    raise ValueError(f"inputs of dtype {inputs.dtype} look like token ids or raw pixels; only "
                     "floating images and signals can be drawn (decode tokens to text instead).")
  shape = inputs.shape[1:]
  if len(shape) == 1 or (len(shape) == 2 and shape[1] <= MAX_SIGNAL_CHANNELS):
    return "signal"
  if len(shape) in (2, 3):
    return "image"
  raise ValueError(f"cannot draw an input of per-example shape {shape}: expected an image "
                   "[H, W] or [H, W, C], or a signal [length] or [length, channels].")


def _displayable_image(image: np.ndarray) -> np.ndarray:
  """An `[H, W]` or `[H, W, 3|4]` array in [0, 1] for `imshow`."""
  image = np.asarray(image, np.float64)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  elif image.ndim == 3 and image.shape[-1] not in (3, 4):
    image = image.mean(axis=-1)  # no colour mapping for other channel counts: show their mean
  low, high = float(np.min(image)), float(np.max(image))
  if low < 0.0 or high > 1.0:  # normalised or standardised inputs: stretch to the display range
    image = (image - low) / (high - low) if high > low else np.zeros_like(image)
  return image


def _as_columns(signal: np.ndarray) -> np.ndarray:
  """A `[length]` or `[length, channels]` signal as float64 `[length, channels]`."""
  signal = np.asarray(signal, np.float64)
  return signal[:, None] if signal.ndim == 1 else signal


def _draw_input(axis: Any, kind: str, example: np.ndarray, **line_options: Any) -> None:
  """An image (grey for one channel) or a signal's channels as lines."""
  if kind == "image":
    image = _displayable_image(example)
    axis.imshow(image, cmap="gray" if image.ndim == 2 else None)
  else:
    axis.plot(_as_columns(example), **{"linewidth": 1.0, **line_options})


def _figure(size: tuple[float, float], *args: Any, **subplots_options: Any) -> tuple[Figure, Any]:
  """A new figure on its own Agg canvas, outside pyplot, and its `subplots(*args, ...)`."""
  figure = Figure(figsize=size)
  FigureCanvasAgg(figure)
  return figure, figure.subplots(*args, **subplots_options)


def _grid(count: int, *, panel_size: float = 2.0, max_columns: int = 8,
          columns: int | None = None) -> tuple[Figure, np.ndarray]:
  """`count` tickless panels (small ones' ticks are unreadable and slow to lay out): `columns`
  per row, or a near-square grid of at most `max_columns`; the grid's spare panels are hidden."""
  columns = columns or max(1, min(max_columns, math.ceil(math.sqrt(count))))
  rows = max(1, math.ceil(count / columns))
  figure, axes = _figure((panel_size * columns, panel_size * rows + 0.4), rows, columns,
                         squeeze=False)
  axes = axes.reshape(-1)
  for axis in axes[count:]:
    axis.axis("off")
  for axis in axes[:count]:
    axis.set(xticks=[], yticks=[])
  return figure, axes[:count]


def _save(figure: Figure, path: str) -> str:
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  try:
    figure.savefig(path, format="png", dpi=100, bbox_inches="tight")
  finally:
    figure.clear()  # drops the artists at once rather than at the next garbage collection
  return path


def _class_name(class_names: Sequence[str] | None, index: int) -> str:
  return str(class_names[index]) if class_names is not None else str(index)


def metric_prefixes(records: Sequence[Mapping[str, Any]]) -> list[str]:
  """Every `P` with a `P_loss` key in `records`: `train` first, then the others sorted."""
  prefixes = {key[:-len("_loss")] for record in records for key in record
              if key.endswith("_loss") and len(key) > len("_loss")}
  return sorted(prefixes, key=lambda prefix: (prefix != "train", prefix))


def plot_learning_curves(records: Sequence[Mapping[str, Any]], path: str) -> str:
  """Every metric the task reports (loss, accuracy, a regression's errors, an ELBO's terms, ...)
  against the step, one panel each, for training and every evaluation split, from a run's
  `metrics.jsonl` records (`step`, `<prefix>_loss`, `<prefix>_<metric>`; a missing one: a gap)."""
  records = [record for record in records if "step" in record]
  if not (prefixes := metric_prefixes(records)):
    raise ValueError("records hold no `<prefix>_loss` values with a `step`: expected "
                     "metrics.jsonl records such as {'step': 100, 'train_loss': 0.5, ...}.")
  names = {key.removeprefix(f"{prefix}_") for record in records for key in record
           for prefix in prefixes if key.startswith(f"{prefix}_")}
  names = {name for name in names if not name.endswith(("_max", "_min", "_norm"))
           and not any(name.startswith(f"{prefix}_") for prefix in prefixes)}
  # At most six panels, loss and accuracy first.
  panels = sorted(names, key=lambda name: (name != "loss", name != "accuracy", name))[:6]
  figure, axes = _figure((6 * len(panels), 4), 1, len(panels), squeeze=False)
  for axis, metric in zip(axes[0], panels):
    for prefix in prefixes:
      points = [(record["step"], record.get(f"{prefix}_{metric}")) for record in records]
      points = [(step, value) for step, value in points
                if value is not None and math.isfinite(float(value))]
      if points:
        axis.plot(*zip(*points), marker="o", markersize=3, label=prefix)
    axis.set(xlabel="step", ylabel=metric, title=metric)
    axis.grid(True, alpha=0.3)
    if axis.get_lines():
      axis.legend()
  return _save(figure, path)


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str] | None, path: str) -> str:
  """A heatmap of a confusion matrix (rows true classes, columns predictions) with its counts,
  cells coloured by their share of the row, so rare classes are as visible as common ones."""
  matrix = np.asarray(matrix)
  if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
    raise ValueError(f"matrix must be square [num_classes, num_classes]; got shape {matrix.shape}.")
  num_classes = matrix.shape[0]
  if class_names is not None and len(class_names) != num_classes:
    raise ValueError(f"class_names has {len(class_names)} names for a {num_classes}-class matrix.")
  shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True).astype(np.float64), 1.0)
  side = min(4.0 + 0.45 * num_classes, 20.0)
  figure, axis = _figure((side + 1.5, side))
  image = axis.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
  figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="share of the true class")
  if num_classes <= MAX_ANNOTATED_CLASSES:
    for (row, column), count in np.ndenumerate(matrix):
      axis.text(column, row, str(int(count)), ha="center", va="center", fontsize=8,
                color="white" if shares[row, column] > 0.5 else "black")
  if num_classes <= 2 * MAX_ANNOTATED_CLASSES:
    names = [_class_name(class_names, index) for index in range(num_classes)]
    axis.set_xticks(range(num_classes), names, rotation=45, ha="right")
    axis.set_yticks(range(num_classes), names)
  else:
    axis.set(xticks=[], yticks=[])
  axis.set(xlabel="predicted class", ylabel="true class",
           title=f"confusion matrix ({int(matrix.sum())} examples)")
  return _save(figure, path)


def plot_misclassified(inputs: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                       indices: Sequence[int], class_names: Sequence[str] | None, path: str,
                       max_examples: int = 25) -> str:
  """A grid of the examples at `indices` (e.g. `EvaluationReport.misclassified`, at most
  `max_examples` of them) of the whole split's floating images or signals, each titled with its
  index, true and predicted class (named by `class_names`, or by index)."""
  inputs, labels, predictions = np.asarray(inputs), np.asarray(labels), np.asarray(predictions)
  kind = _check_drawable(inputs)
  if labels.shape != inputs.shape[:1] or predictions.shape != inputs.shape[:1]:
    raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} must be "
                     f"[num_examples] = {inputs.shape[:1]}, one per input.")
  if max_examples < 1:
    raise ValueError(f"max_examples must be >= 1; got {max_examples}.")
  chosen = [int(index) for index in np.asarray(indices, np.int64).reshape(-1)[:max_examples]]
  for index in chosen:
    if not 0 <= index < inputs.shape[0]:
      raise ValueError(f"index {index} is outside the {inputs.shape[0]} inputs.")
  if not chosen:
    figure, axis = _figure((4, 1.5))
    axis.text(0.5, 0.5, "no misclassified examples", ha="center", va="center")
    axis.axis("off")
    return _save(figure, path)
  figure, axes = _grid(len(chosen))
  for axis, index in zip(axes, chosen):
    _draw_input(axis, kind, inputs[index])
    axis.set_title(f"#{index} true {_class_name(class_names, int(labels[index]))}\n"
                   f"pred {_class_name(class_names, int(predictions[index]))}", fontsize=8)
  figure.suptitle(f"misclassified examples ({len(chosen)} of {len(indices)} shown)")
  figure.subplots_adjust(hspace=0.55, wspace=0.1)
  return _save(figure, path)


def plot_examples(examples: np.ndarray, path: str, *, title: str | None = None,
                  references: np.ndarray | None = None) -> str:
  """A grid of floating images or signals, e.g. a generative model's samples or reconstructions,
  over `references` (signals shaped like `examples`, a reconstruction's inputs say) in grey."""
  examples = np.asarray(examples)
  kind = _check_drawable(examples)
  if references is not None and (kind != "signal" or np.shape(references) != examples.shape):
    raise ValueError(f"references must be signals shaped like the examples {examples.shape}; got "
                     f"{np.shape(references)} with {kind} examples.")
  figure, axes = _grid(len(examples))
  for index, axis in enumerate(axes):
    if references is not None:
      _draw_input(axis, kind, references[index], color="0.7")
    _draw_input(axis, kind, examples[index])
  if title:
    figure.suptitle(title)
  return _save(figure, path)


def plot_reliability_diagram(bins: ReliabilityBins, path: str) -> str:
  """Each confidence bin's accuracy against the diagonal, the ECE in the title, bin counts below."""
  ece = bins.expected_calibration_error()  # a ValueError for bins without examples
  width = bins.upper - bins.lower
  filled = bins.count > 0
  accuracy, confidence = bins.accuracy[filled], bins.confidence[filled]
  figure, (top, bottom) = _figure((5.5, 6.5), 2, 1, sharex=True,
                                  gridspec_kw={"height_ratios": (3, 1)})
  top.bar(bins.lower[filled], accuracy, width=width[filled], align="edge", edgecolor="black",
          color="tab:blue", label="accuracy")
  top.bar(bins.lower[filled], np.abs(accuracy - confidence),
          bottom=np.minimum(accuracy, confidence), width=width[filled], align="edge",
          color="tab:red", alpha=0.35, label="gap to confidence")
  top.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="gray", label="perfect calibration")
  top.set(xlim=(0.0, 1.0), ylim=(0.0, 1.0), ylabel="accuracy",
          title=f"reliability diagram (ECE {ece:.4f})")
  top.legend(loc="upper left")
  bottom.bar(bins.lower, bins.count, width=width, align="edge", edgecolor="black", color="gray")
  bottom.set(xlabel="confidence (highest class probability)", ylabel="examples")
  return _save(figure, path)


def plot_attribution_overlays(inputs: np.ndarray, attributions: np.ndarray, path: str,
                              titles: Sequence[str] | None = None, *,
                              columns: int | None = None) -> str:
  """Each input with where its attribution (saliency, integrated gradients) lies.

  Images are drawn in grey with the attribution's magnitude as a heat overlay; signals as a line
  coloured by the signed attribution of each point (red pushes the output up, blue down).
  `attributions` has the shape of `inputs`; `columns` is the panels per row (the number of
  methods puts each example's attributions side by side), None a near-square grid of at most 5."""
  inputs, attributions = np.asarray(inputs), np.asarray(attributions, np.float64)
  kind = _check_drawable(inputs)
  if attributions.shape != inputs.shape:
    raise ValueError(f"attributions of shape {attributions.shape} must have the inputs' shape "
                     f"{inputs.shape}.")
  if inputs.shape[0] == 0:
    raise ValueError("inputs hold no examples; nothing to draw.")
  if titles is not None and len(titles) != inputs.shape[0]:
    raise ValueError(f"titles has {len(titles)} entries for {inputs.shape[0]} examples.")
  figure, axes = _grid(inputs.shape[0], panel_size=2.6, max_columns=5, columns=columns)
  for index, axis in enumerate(axes):
    if kind == "image":
      image = _displayable_image(inputs[index])
      heat = np.abs(attributions[index])
      heat = heat.sum(axis=-1) if heat.ndim == 3 else heat
      axis.imshow(image if image.ndim == 2 else image[..., :3].mean(axis=-1), cmap="gray")
      axis.imshow(heat / max(float(heat.max()), 1e-12), cmap="inferno", alpha=0.55, vmin=0.0,
                  vmax=1.0)
    else:
      signal, weight = _as_columns(inputs[index]), _as_columns(attributions[index])
      scale = max(float(np.abs(weight).max()), 1e-12)
      positions = np.arange(signal.shape[0], dtype=np.float64)
      for values, colours in zip(signal.T, weight.T):
        points = np.stack([positions, values], axis=1)
        axis.add_collection(LineCollection(  # a segment takes the mean colour of its ends
            np.stack([points[:-1], points[1:]], axis=1), cmap="coolwarm", linewidths=2.0,
            array=0.5 * (colours[:-1] + colours[1:]), clim=(-scale, scale)))
        axis.scatter(positions, values, c=colours, cmap="coolwarm", vmin=-scale, vmax=scale, s=8,
                     zorder=3)
      axis.autoscale_view()
    if titles is not None:
      axis.set_title(str(titles[index]), fontsize=8)
  figure.subplots_adjust(hspace=0.35, wspace=0.1)
  return _save(figure, path)


def plot_curve(xs: Sequence[float], ys_by_name: Mapping[str, Sequence[float]], path: str,
               xlabel: str, ylabel: str, title: str) -> str:
  """One line per named series (`{name: ys}`, each as long as `xs`) over shared x values."""
  xs = np.asarray(xs, np.float64).reshape(-1)
  if not ys_by_name:
    raise ValueError("ys_by_name is empty; give at least one series {name: values}.")
  figure, axis = _figure((6, 4))
  for name, ys in ys_by_name.items():
    ys = np.asarray(ys, np.float64).reshape(-1)
    if ys.shape != xs.shape:
      raise ValueError(f"series {name!r} has {ys.shape[0]} values for {xs.shape[0]} x values.")
    axis.plot(xs, ys, marker="o", label=str(name))
  axis.set(xlabel=xlabel, ylabel=ylabel, title=title)
  axis.grid(True, alpha=0.3)
  axis.legend()
  return _save(figure, path)


def param_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """The swept keys of sweep rows (`jdl.sweep.study_rows`), in the order they first appear."""
  return list(dict.fromkeys(key for row in rows for key in row["params"]))


def format_value(value: Any) -> str:
  """A swept value, short: floats to 4 significant digits, tuples (and lists) as Python writes
  tuples; for plots and `jdl.sweep`'s tables."""
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float):
    return f"{value:.4g}"
  if isinstance(value, (list, tuple)):
    return "(" + ", ".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str, *, x: str,
               metric: str = "test_accuracy") -> str:
  """`metric` against the swept key `x` for the rows of `jdl.sweep.study_rows`: finished trials
  as dots, pruned ones (at their last value) as crosses, one colour per setting of the other swept
  keys (when there are at most 10). Non-numbers get a tick each; learning rates and positive
  numbers spanning 100x or more a logarithmic axis."""
  params = param_keys(rows)
  if x not in params:
    raise ValueError(f"plot_sweep: x={x!r} is not a swept key; the rows sweep {params}.")
  shown = [r for r in rows if r["status"] in ("ok", "pruned") and x in r["params"]
           and isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
  values = [r["params"][x] for r in shown]
  numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
  categories = [] if numeric else list(dict.fromkeys(map(format_value, values)))
  groups = [", ".join(f"{k.rsplit('.', 1)[-1]}={format_value(r['params'].get(k))}"
                      for k in params if k != x) for r in shown]
  if len(set(groups)) > 10:  # a random search rarely repeats the other keys: one colour
    groups = [""] * len(shown)
  figure, axis = _figure((6.4, 4.4))
  for colour, group in enumerate(dict.fromkeys(groups)):
    for status, marker in (("ok", "o"), ("pruned", "x")):
      points = [(v if numeric else categories.index(format_value(v)), r[metric])
                for r, v, g in zip(shown, values, groups) if r["status"] == status and g == group]
      if points:
        label = " ".join(filter(None, [group, "pruned" if status == "pruned" else ""]))
        axis.scatter(*zip(*points), marker=marker, color=f"C{colour % 10}",
                     label=label or "finished")
  if numeric and values and min(values) > 0 and (
      x.endswith("learning_rate") or max(values) / min(values) >= 100):
    axis.set_xscale("log")
  if not numeric:
    axis.set_xticks(range(len(categories)), categories)
  axis.set(xlabel=x, ylabel=metric, title=f"{metric} vs {x}, {len(shown)} of {len(rows)} trials")
  axis.grid(True, alpha=0.3)
  if shown:
    axis.legend(fontsize="small")
  return _save(figure, path)


def plot_trial_curves(rows: Sequence[Mapping[str, Any]], path: str, *,
                      metric: str = "test_accuracy") -> str:
  """Each trial's `metric` at every evaluation (its `curve`), pruned trials dashed."""
  figure, axis = _figure((6.4, 4.4))
  for row in rows:
    if row["curve"]:
      pruned = row["status"] == "pruned"
      axis.plot(list(row["curve"]), list(row["curve"].values()), marker=".", alpha=0.8,
                linestyle="--" if pruned else "-",
                label=f"trial {row['trial']}" + (" (pruned)" if pruned else ""))
  axis.set(xlabel="step", ylabel=metric, title=f"{metric} at each evaluation")
  axis.grid(True, alpha=0.3)
  if 0 < len(axis.lines) <= 12:
    axis.legend(fontsize="small")
  return _save(figure, path)
