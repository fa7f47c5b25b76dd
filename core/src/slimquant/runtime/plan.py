"""Which scheme and algorithm each Linear gets: recipe defaults, ignored names, per-layer overrides."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, replace

from slimquant.config.recipe import LayerOverride, Recipe
from slimquant.config.scheme import PRESETS, Scheme, merge_args
from slimquant.errors import RecipeError
from slimquant.features import Feature


@dataclass(frozen=True)
class LinearPlan:
    """How one Linear is quantized, decided before any model is loaded: what a plugin's ``check`` is given as
    ``plan`` and what ``ctx.plan(name)`` returns (None for a Linear left in float). Frozen.

    Fields:

    - ``scheme``: the ``Scheme`` after the recipe's overrides: ``scheme.weights`` (``WeightArgs``: ``bits``,
      ``symmetric``, ``strategy``, ``group_size``, ...) is the ``args`` of ``quantize_weight`` and ``weight_grid``;
      ``scheme.activations`` (``ActArgs``, None when weight-only) the ``args`` of ``quantize_act``.
    - ``weight_algorithm``: the plugin whose ``quantize_weight`` quantizes this Linear (an override's ``algorithm``,
      else the recipe's).
    - ``act_algorithm``: the plugin whose ``quantize_act`` gives its input's ``ActQParams`` (``minmax`` unless the
      recipe names another); used only when ``scheme.activations`` is set.
    - ``grid_algorithm``: the plugin whose ``weight_grid`` the codes are rounded onto (``ctx.grid(name)``); None for
      the uniform integer grid. It may equal ``weight_algorithm`` (a grid provider named alone quantizes too).
    - ``features``: what the Linear's quantized output will have beyond plain uniform codes (slimquant.features),
      as ``(Feature, plugin, setting)`` triples: who produces each and why; ``feature_map()`` gives them as a dict,
      ``has(feature)`` tests one. The core checks them against the grid's and each exporter's ``holds``.
    """

    scheme: Scheme
    weight_algorithm: str
    act_algorithm: str
    grid_algorithm: str | None = None  # the plugin whose weight_grid the codes are rounded onto (None: uniform)
    features: tuple[tuple[Feature, str, str], ...] = ()

    def feature_map(self) -> dict[Feature, tuple[str, str]]:
        return {feature: (plugin, setting) for feature, plugin, setting in self.features}

    def has(self, feature: Feature) -> bool:
        return any(f == feature for f, _, _ in self.features)

    def with_features(self, features: dict[Feature, tuple[str, str]]) -> LinearPlan:
        triples = tuple(sorted(((f, p, s) for f, (p, s) in features.items()), key=lambda t: t[0].value))
        return replace(self, features=triples)


def name_matches(pattern: str, name: str) -> bool:
    """Exact name, 're:<regex>' (full match), or a glob such as '*.down_proj'."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern == name


def _check_patterns(patterns: list[str], names: list[str], where: str) -> None:
    for i, pattern in enumerate(patterns):
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise RecipeError(f"{where}[{i}]: bad regular expression {pattern!r}: {exc}") from None
        if not any(name_matches(pattern, n) for n in names):
            close = [n for n in names if pattern.split(".")[-1] in n][:3]
            hint = f" (similar: {', '.join(close)})" if close else ""
            raise RecipeError(f"{where}[{i}]: {pattern!r} matches no layer of the model{hint}")


def override_scheme(scheme: Scheme, override: LayerOverride) -> Scheme:
    """An override's blocks complete its own `scheme` preset field by field; without a preset they stand alone, as
    an explicit block for the Linears it targets (W4A16 with an override `weights: {bits: 8}` is 8-bit symmetric per
    channel there, not 8-bit in groups of 128)."""
    if override.scheme:
        preset = PRESETS[override.scheme]
        weights = merge_args(override.weights, preset.weights)
        activations = merge_args(override.activations, preset.activations)
    else:
        weights = override.weights or scheme.weights
        activations = override.activations or scheme.activations
    if override.weight_only:
        activations = None
    return Scheme(weights=weights, activations=activations)


def plan_linears(recipe: Recipe, algorithms, linear_names: list[str],
                 float_names: list[str] = ()) -> dict[str, LinearPlan | None]:
    """A plan per quantizable Linear; None means it stays in float. Unmatched names fail loudly."""
    _check_patterns(recipe.ignore, list(linear_names) + list(float_names), "ignore")
    for i, override in enumerate(recipe.overrides):
        _check_patterns(override.targets, list(linear_names), f"overrides[{i}].targets")
    base = recipe.base_scheme()
    plans: dict[str, LinearPlan | None] = {}
    for name in linear_names:
        if any(name_matches(p, name) for p in recipe.ignore):
            plans[name] = None
            continue
        scheme, algorithm, grid = base, algorithms.weight_algorithm, None
        for override in recipe.overrides:
            if any(name_matches(p, name) for p in override.targets):
                scheme = override_scheme(scheme, override)
                algorithm = override.algorithm or algorithm
                grid = override.grid or grid
        plans[name] = algorithms.linear_plan(scheme, algorithm, grid)
    return plans


def check_group_sizes(recipe: Recipe, plans: dict[str, LinearPlan | None], linears: dict) -> None:
    """A group size the user wrote that is wider than a Linear's input is a mistake (a typo, or a scheme meant for
    another model). A preset's group (W4A16: 128) on a narrower Linear is one shorter group, i.e. per channel."""
    explicit = {w.group_size for w in [recipe.weights, *(o.weights for o in recipe.overrides)]
                if w is not None and "group_size" in w.model_fields_set}
    for name, plan in plans.items():
        if plan is None or plan.scheme.weights.group_size not in explicit:
            continue
        group, in_features = plan.scheme.weights.group_size, linears[name].in_features
        if group and group > in_features:
            raise RecipeError(f"weights.group_size={group} is larger than {name}'s {in_features} input channels; "
                              f"use at most {in_features}, per-channel, or leave this Linear out with `ignore`")
