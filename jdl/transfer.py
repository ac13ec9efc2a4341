"""Transfer learning: start from another model's parameters, freeze parts, group optimizers.

Parameters are named by their "/"-joined path ("ResNetBlock_3/BatchNorm_0/scale"). Patterns
(`skip`, `freeze`, optimizer groups) are case-sensitive `fnmatch` globs over these paths, `*`
matching "/" too, and cover everything below the module they name ("Dense_0" means "Dense_0"
and "Dense_0/*", not "Dense_01/..."). A pattern that matches nothing is an error listing the
paths, so a misspelt name never silently does nothing. See docs/transfer.md.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from ml_collections import config_dict

from jdl import optim
from jdl.state import TrainState

Params = Any  # a pytree of arrays
Patterns = str | Sequence[str]
Renames = Mapping[str, str] | Sequence[tuple[str, str]]
OptimizerConfig = Mapping[str, Any] | None

FROZEN = "frozen"
TRAINABLE = "trainable"
DEFAULT_GROUP = "default"
# Applied once around all of `per_group_optimizer`'s groups (as `jdl.make_optimizer` nests them),
# so every group updates on the same steps and the EMA covers every parameter.
WHOLE_OPTIMIZER_KEYS = ("accumulate_steps", "ema_decay")
_LISTED_PATHS = 40  # how many available paths an error message lists


def parameter_paths(params: Params) -> list[str]:
  """The "/"-joined paths of the leaves of `params`, in tree order ("Dense_0/kernel", ...)."""
  return [path for path, _ in _flatten(params)[0]]


def named_leaves(tree: Any) -> dict[str, Any]:
  """`{path: leaf}` of a pytree, paths as `parameter_paths` writes them, in tree order."""
  return dict(_flatten(tree)[0])


def _flatten(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
  """`([(path, leaf), ...], treedef)` of a pytree."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(tuple(key_path), simple=True, separator="/"), leaf)
          for key_path, leaf in leaves], treedef


def as_patterns(patterns: Patterns | None, what: str) -> tuple[str, ...]:
  """`patterns` as a tuple of non-empty strings; a lone string is one pattern, not its letters."""
  patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns or ())
  for pattern in patterns:
    if not isinstance(pattern, str) or not pattern:
      raise ValueError(f"{what} must be glob patterns of parameter paths (non-empty strings such "
                       f"as 'Dense_0/*'); got {pattern!r} in {patterns!r}.")
  return patterns


def path_matches(path: str, pattern: str) -> bool:
  """Whether parameter `path` matches glob `pattern`, or lies below the module it names."""
  return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern + "/*")


def _listing(paths: Sequence[str]) -> str:
  shown = ", ".join(paths[:_LISTED_PATHS])
  more = len(paths) - _LISTED_PATHS
  return shown + (f", ... and {more} more" if more > 0 else "") if paths else "(none)"


def _check_all_match(patterns: Iterable[str], paths: Sequence[str], what: str) -> None:
  """Raises when a pattern of `what` matches none of `paths` (typo safety)."""
  if unmatched := [p for p in patterns if not any(path_matches(path, p) for path in paths)]:
    raise ValueError(f"{what} pattern(s) {unmatched} match no parameter; the parameter paths are: "
                     f"{_listing(list(paths))}.")


class LeafSpec(NamedTuple):
  """The shape and dtype of one parameter."""

  shape: tuple[int, ...]
  dtype: str

  def __str__(self) -> str:
    return f"{self.dtype}{list(self.shape)}"


@dataclasses.dataclass(frozen=True)
class ShapeMismatch:
  """A parameter present in both models whose shape or dtype differs, so it was not copied."""

  path: str  # the target's path
  source: LeafSpec
  target: LeafSpec
  source_path: str  # the source's own path (differs from `path` under `rename`)


@dataclasses.dataclass(frozen=True)
class TransferReport:
  """What a partial restore did with each parameter: the target paths it copied from the source,
  and those that keep their initial values and why. Paths are the target's, but the source's own
  (before renaming) in `unused_in_source` and `source_leaves`; a model-state leaf has its
  collection in front: "batch_stats/BatchNorm_0/mean"."""

  loaded: tuple[str, ...]
  skipped_shape_mismatch: tuple[ShapeMismatch, ...]  # e.g. a new head with another class count
  skipped_by_pattern: tuple[str, ...]  # matched by `skip`
  missing_in_source: tuple[str, ...]
  unused_in_source: tuple[str, ...]  # source paths no target parameter has
  target_leaves: Mapping[str, LeafSpec] = dataclasses.field(repr=False)  # every path's spec
  source_leaves: Mapping[str, LeafSpec] = dataclasses.field(repr=False)

  @property
  def kept_initialised(self) -> tuple[str, ...]:
    """Every target path that keeps its initial value (mismatched, skipped or missing)."""
    return (tuple(m.path for m in self.skipped_shape_mismatch) + self.skipped_by_pattern
            + self.missing_in_source)

  def summary(self) -> str:
    """One line: how many parameters (and scalar values) were loaded, and the other counts."""
    sizes = {path: math.prod(spec.shape) for path, spec in self.target_leaves.items()}
    return (f"loaded {len(self.loaded)} of {len(self.target_leaves)} parameters "
            f"({sum(sizes[path] for path in self.loaded):,} of {sum(sizes.values()):,} values); "
            f"kept initialised: {len(self.skipped_shape_mismatch)} shape mismatch, "
            f"{len(self.skipped_by_pattern)} skipped by pattern, {len(self.missing_in_source)} "
            f"missing in the source; {len(self.unused_in_source)} source parameters unused")

  def __str__(self) -> str:
    """The summary line, a table of every parameter not loaded, and the loaded ones by module."""
    rows = [("status", "parameter", "target", "source")]
    rows += [("shape mismatch", m.path, str(m.target), str(m.source))
             for m in self.skipped_shape_mismatch]
    rows += [("skipped (pattern)", path, str(self.target_leaves[path]), "")
             for path in self.skipped_by_pattern]
    rows += [("missing in source", path, str(self.target_leaves[path]), "-")
             for path in self.missing_in_source]
    rows += [("unused in source", path, "-", str(self.source_leaves[path]))
             for path in self.unused_in_source]
    lines = [self.summary()]
    if len(rows) > 1:
      widths = [max(len(row[column]) for row in rows) for column in range(4)]
      lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                for row in rows]
    if self.loaded:
      modules = collections.Counter(path.rsplit("/", 1)[0] for path in self.loaded)
      lines.append("  loaded: " + ", ".join(f"{m} ({n})" for m, n in modules.items()))
    return "\n".join(lines)


def _spec(leaf: Any, path: str, side: str) -> LeafSpec:
  if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
    raise TypeError(f"{side} parameter {path!r} is a {type(leaf).__name__}; expected an array.")
  return LeafSpec(tuple(int(d) for d in leaf.shape), str(np.dtype(leaf.dtype)))


def _as_renames(rename: Renames | None) -> list[tuple[str, str]]:
  if rename is None:
    return []
  pairs = list(rename.items()) if isinstance(rename, Mapping) else [tuple(p) for p in rename]
  for pair in pairs:
    if len(pair) != 2 or not all(isinstance(part, str) for part in pair):
      raise ValueError(f"rename must map source path prefixes to target path prefixes, e.g. "
                       f"{{'backbone/': ''}}; got the entry {pair!r}.")
  return pairs


def _renamed(path: str, renames: Sequence[tuple[str, str]]) -> tuple[str, str | None]:
  """`(new_path, prefix used)`: the longest matching source prefix is rewritten, once."""
  best = max((pair for pair in renames if path.startswith(pair[0])), key=lambda p: len(p[0]),
             default=None)
  return (path, None) if best is None else (best[1] + path[len(best[0]):], best[0])


def _restore(trees: Sequence[tuple[Any, Any, str]], rename: Renames | None,
             skip: Patterns) -> tuple[list[Any], TransferReport]:
  """The partial restore of `(target, source, report prefix)` trees, with one report. Renames and
  skip patterns see the bare paths and are checked over all trees: each need match in one."""
  renames, skip = _as_renames(rename), as_patterns(skip, "skip")
  loaded, mismatched, skipped, missing, unused = [], [], [], [], []
  target_leaves: dict[str, LeafSpec] = {}
  source_leaves: dict[str, LeafSpec] = {}
  used_renames, source_paths, target_paths, results = set(), [], [], []
  for target, source, prefix in trees:
    target_items, treedef = _flatten(target)
    source_items, _ = _flatten(source)
    source_paths += [path for path, _ in source_items]
    target_paths += [path for path, _ in target_items]
    by_target_path: dict[str, tuple[str, Any]] = {}  # the source leaves not yet matched
    for path, leaf in source_items:
      source_leaves[prefix + path] = _spec(leaf, prefix + path, "source")
      new_path, used = _renamed(path, renames)
      used_renames.add(used)
      if new_path in by_target_path:
        raise ValueError(f"source parameters {prefix}{by_target_path[new_path][0]!r} and "
                         f"{prefix}{path!r} are both renamed to {prefix}{new_path!r}; rename must "
                         "give every source parameter its own path.")
      by_target_path[new_path] = (path, leaf)
    leaves = []
    for path, leaf in target_items:
      spec = target_leaves[prefix + path] = _spec(leaf, prefix + path, "target")
      source_path, source_leaf = by_target_path.pop(path, (None, None))
      if any(path_matches(path, pattern) for pattern in skip):
        skipped.append(prefix + path)
      elif source_path is None:
        missing.append(prefix + path)
      elif source_leaves[prefix + source_path] != spec:
        mismatched.append(ShapeMismatch(prefix + path, source_leaves[prefix + source_path], spec,
                                        prefix + source_path))
      else:
        # A copy: donating the new state to a compiled step must not delete the source's arrays.
        leaf = jnp.array(source_leaf, copy=True)
        loaded.append(prefix + path)
      leaves.append(leaf)
    unused += [prefix + path for path, _ in by_target_path.values()]
    results.append(jax.tree_util.tree_unflatten(treedef, leaves))
  if unused_renames := [old for old, _ in renames if old not in used_renames]:
    raise ValueError(f"rename prefix(es) {unused_renames} start no source parameter path; the "
                     f"source paths are: {_listing(source_paths)}.")
  _check_all_match(skip, target_paths, "skip")
  if not loaded:
    raise ValueError(
        "no source parameter matches a target parameter by path, shape and dtype, so nothing "
        f"would be loaded. Source paths: {_listing(source_paths)}. Target paths: "
        f"{_listing(target_paths)}. Use rename to map source prefixes onto target ones.")
  return results, TransferReport(tuple(loaded), tuple(mismatched), tuple(skipped), tuple(missing),
                                 tuple(unused), target_leaves, source_leaves)


def load_pretrained(target_params: Params, source_params: Params, *, rename: Renames | None = None,
                    skip: Patterns = ()) -> tuple[Params, TransferReport]:
  """Copies the source parameters that fit into the target model's parameters (partial restore).

  A source leaf is copied (as a fresh array) when its path, after `rename`, is a target path and
  shape and dtype agree; every other target leaf keeps its initialisation, and the report says
  why. `rename` rewrites source path prefixes, longest first: `{"backbone/": ""}` loads
  "backbone/Dense_0/kernel" into "Dense_0/kernel" (also `(old, new)` pairs). `skip` leaves target
  paths initialised even where the source fits (a same-shaped head whose classes differ). A
  rename or skip that matches nothing, two source paths renamed to one, or nothing loaded at all
  is a ValueError listing both models' paths."""
  (params,), report = _restore([(target_params, source_params, "")], rename, skip)
  return params, report


def load_pretrained_state(target_state: TrainState, source_state: TrainState, *,
                          rename: Renames | None = None, skip: Patterns = ()
                          ) -> tuple[TrainState, TransferReport]:
  """`load_pretrained` for the params and every model-state collection ("batch_stats"), whose
  leaves appear in the report as "<collection>/<path>". The optimizer state is fresh
  (`target_state.tx.init` of the new params), and `step` and `rng` stay the target's."""
  targets, sources = dict(target_state.model_state), dict(source_state.model_state)
  names = sorted(set(targets) | set(sources))
  trees = [(targets.get(name, {}), sources.get(name, {}), f"{name}/") for name in names]
  (params, *collections), report = _restore(
      [(target_state.params, source_state.params, "")] + trees, rename, skip)
  collections = dict(zip(names, collections))
  model_state = {name: collections[name] for name in targets}  # the target's, in its order
  return target_state.replace(params=params, model_state=model_state,
                              opt_state=target_state.tx.init(params)), report


def trainable_mask(params: Params, freeze: Patterns) -> Params:
  """Bools like `params`: False where `freeze`'s patterns match (each pattern must match one)."""
  patterns, paths = as_patterns(freeze, "freeze"), parameter_paths(params)
  _check_all_match(patterns, paths, "freeze")
  return jax.tree.unflatten(jax.tree.structure(params),
                            [not any(path_matches(path, p) for p in patterns) for path in paths])


def freeze(tx: optax.GradientTransformation, params: Params,
           patterns: Patterns) -> optax.GradientTransformation:
  """`tx` for the parameters `patterns` do not match; the matched ones get `optax.set_to_zero()`
  updates under `optax.multi_transform`, so no weight decay or momentum reaches them and `tx`
  keeps state only for the trainable ones (a frozen BatchNorm's running statistics, model state,
  still update in training). Raises ValueError for a pattern matching nothing, or an EMA `tx`."""
  labels = jax.tree.map(lambda trainable: TRAINABLE if trainable else FROZEN,
                        trainable_mask(params, patterns))
  if optim.ema_parameters(jax.eval_shape(tx.init, params)) is not None:
    raise ValueError(
        "freeze() cannot wrap an optimizer that keeps a parameter EMA (ema_decay): the EMA would "
        "cover only the trainable parameters. Build it with per_group_optimizer([(patterns, "
        "None)], params, default=<optimizer config with ema_decay>), which averages them all.")
  return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)


def _is_frozen(config: OptimizerConfig) -> bool:
  if config is None:
    return True
  frozen = config.get("frozen", False)
  if frozen and set(config) != {"frozen"}:
    raise ValueError(f"a frozen group takes no optimizer settings; got {dict(config)}.")
  learning_rate = config.get("learning_rate")
  return bool(frozen) or (learning_rate is not None and float(learning_rate) == 0.0)


def _parse_group(index: int, group: Sequence[Any]) -> tuple[str, tuple[str, ...], OptimizerConfig]:
  if not isinstance(group, (tuple, list)) or len(group) not in (2, 3):
    raise ValueError(f"group {index} must be (patterns, optimizer config) or (name, patterns, "
                     f"optimizer config); got {group!r}.")
  name, patterns, config = group if len(group) == 3 else (f"group_{index}", *group)
  if not isinstance(name, str) or not name:
    raise ValueError(f"group {index}'s name must be a non-empty string; got {name!r}.")
  if config is not None and not isinstance(config, Mapping):
    raise ValueError(f"group {name!r}'s optimizer config must be a mapping or None (frozen); got "
                     f"{type(config).__name__}.")
  return name, as_patterns(patterns, f"group {name!r}"), config


def per_group_optimizer(groups: Sequence[tuple[Any, ...]], params: Params, *,
                        default: OptimizerConfig,
                        total_steps: int | None = None) -> optax.GradientTransformation:
  """An optimizer with its own settings per group of parameters (discriminative learning rates).

  `groups` are `(patterns, optimizer config)` or `(name, patterns, optimizer config)` tuples (the
  name labels the group in `group_learning_rates`; default "group_<index>"). Each parameter
  belongs to the first group with a pattern that matches its path; the rest to `default`. A
  group's config is laid over `default`'s (over `jdl.optim.OPTIMIZER_DEFAULTS` when `default` is
  None or `{"frozen": True}`), so it needs only the keys that differ. A group whose config is None,
  `{"frozen": True}` or has `learning_rate` 0 is frozen; `default=None` trains only the groups.
  `accumulate_steps` and `ema_decay` (`WHOLE_OPTIMIZER_KEYS`) are taken from `default` only and
  applied once around all groups. A pattern that matches no parameter, a group that claims none
  (an earlier group has all it matches) and repeated names are ValueErrors."""
  default_frozen = _is_frozen(default)
  base = {} if default is None or default.get("frozen") else dict(default)
  base.pop("frozen", None)
  whole = {key: base.pop(key, optim.OPTIMIZER_DEFAULTS[key]) for key in WHOLE_OPTIMIZER_KEYS}
  optim.make_optimizer(whole)  # checks them as it does its own
  accumulate = int(whole["accumulate_steps"])
  parsed = [_parse_group(index, group) for index, group in enumerate(groups)]
  names = [name for name, _, _ in parsed]
  if len(set(names)) != len(names) or DEFAULT_GROUP in names:
    raise ValueError(f"group names must be unique and not {DEFAULT_GROUP!r}; got {names}.")
  paths = parameter_paths(params)
  for name, patterns, _ in parsed:
    _check_all_match(patterns, paths, f"group {name!r}")
  labels = [next((name for name, patterns, _ in parsed
                  if any(path_matches(path, p) for p in patterns)), DEFAULT_GROUP)
            for path in paths]
  if empty := [name for name in names if name not in labels]:
    raise ValueError(f"group(s) {empty} claim no parameter: every path their patterns match "
                     "belongs to an earlier group (a parameter belongs to the first group that "
                     "matches it).")

  if total_steps is not None and accumulate > 1 and total_steps < accumulate:
    raise ValueError(f"total_steps={total_steps} train steps apply no update with "
                     f"accumulate_steps={accumulate}; need total_steps >= accumulate_steps.")
  # The groups' schedules count applied updates.
  inner_steps = None if total_steps is None else total_steps // accumulate
  configs = {name: config for name, _, config in parsed}
  transforms: dict[str, optax.GradientTransformation] = {}
  for name in dict.fromkeys(labels):  # the groups that own parameters, in order
    if name == DEFAULT_GROUP:
      merged = None if default_frozen else base
    elif _is_frozen(configs[name]):
      merged = None
    else:
      config = {key: value for key, value in configs[name].items() if key != "frozen"}
      for key in WHOLE_OPTIMIZER_KEYS:
        if key in config and config.pop(key) != whole[key]:
          raise ValueError(f"group {name!r} sets {key}, which applies to the whole optimizer; "
                           f"set it in default (now {whole[key]!r}) instead.")
      merged = {**base, **config}
    transforms[name] = (optax.set_to_zero() if _is_frozen(merged)  # also lr 0 from default
                        else optim.make_optimizer(merged, total_steps=inner_steps))
  tx: optax.GradientTransformation = optax.multi_transform(
      transforms, jax.tree.unflatten(jax.tree.structure(params), labels))
  # The same nesting as jdl.make_optimizer: the EMA inside MultiSteps sees applied updates only.
  if whole["ema_decay"]:
    tx = optim.with_parameter_ema(tx, whole["ema_decay"])
  if accumulate > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accumulate).gradient_transformation()
  return tx


def group_learning_rates(opt_state: optax.OptState) -> dict[str, jax.Array]:
  """Each trainable group's `jdl.current_learning_rate`, by name, from a `per_group_optimizer` (or
  `freeze`) state, under `jax.jit` too; a ValueError unless the state holds one multi_transform."""
  def is_multi(node: Any) -> bool:
    return isinstance(node, optax.MultiTransformState)

  found = [leaf for leaf in jax.tree.leaves(opt_state, is_leaf=is_multi) if is_multi(leaf)]
  if len(found) != 1:
    raise ValueError("group_learning_rates needs the state of one per_group_optimizer or freeze "
                     f"optimizer (one optax.multi_transform); found {len(found)} in a state of "
                     f"type {type(opt_state).__name__}. For a plain jdl.make_optimizer state use "
                     "jdl.current_learning_rate.")
  rates = {}
  for name, inner in found[0].inner_states.items():
    try:
      rates[str(name)] = optim.current_learning_rate(inner)
    except ValueError:  # a frozen group (set_to_zero) records no learning rate
      continue
  return rates


def transfer_config() -> ml_collections.ConfigDict:
  """The `config.transfer` block `jdl.runs.apply_transfer_config` reads; all off by default."""
  config = ml_collections.ConfigDict()
  config.init_from = config_dict.placeholder(str)  # workdir of a trained run to start from
  config.checkpoint = "latest"  # its checkpoint: "latest", "best" or a step number
  config.rename = ()  # (source prefix, target prefix) pairs, e.g. (("backbone/", ""),)
  config.skip = ()  # glob patterns of parameters to leave initialised, e.g. ("Dense_0",)
  config.freeze = ()  # glob patterns of parameters never to train, e.g. ("Conv_*",)
  return config


__all__ = [
    "LeafSpec", "ShapeMismatch", "TransferReport", "freeze", "group_learning_rates",
    "load_pretrained", "load_pretrained_state", "named_leaves", "parameter_paths", "path_matches",
    "per_group_optimizer", "trainable_mask", "transfer_config",
]
