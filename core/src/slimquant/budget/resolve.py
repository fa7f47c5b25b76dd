"""From a recipe with a `budget` to a plain mixed-precision recipe: one `overrides` entry per chosen candidate."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from slimquant.budget.cost import describe, storage_bits
from slimquant.budget.knapsack import choose_options
from slimquant.budget.sensitivity import kl_sensitivity, proxy_sensitivity
from slimquant.config.recipe import LayerOverride, Recipe
from slimquant.config.scheme import WeightArgs
from slimquant.errors import CalibrationError, RecipeError
from slimquant.model.structure import find_decoder_layers, float_module_names, layer_linears, normalize_linears
from slimquant.plugins import plan_algorithms
from slimquant.runtime.plan import plan_linears

log = logging.getLogger(__name__)


@dataclass
class LinearChoice:
    name: str
    layer: int
    kind: str  # the name inside its decoder layer, e.g. self_attn.q_proj
    weights: int
    costs: list[int]  # stored bits per candidate, scales included
    sensitivity: list[float]  # predicted loss per candidate
    chosen: int

    @property
    def bits(self) -> int:
        return self.costs[self.chosen]


@dataclass
class BudgetReport:
    method: str
    candidates: list[str]  # labels, e.g. 'w4 g128 asym'
    budget_bits: int
    used_bits: int
    weights: int
    linears: list[LinearChoice] = field(default_factory=list)

    @property
    def budget_avg_bits(self) -> float:
        return self.budget_bits / self.weights

    @property
    def avg_bits(self) -> float:
        return self.used_bits / self.weights

    @property
    def predicted_loss(self) -> float:
        return sum(c.sensitivity[c.chosen] for c in self.linears)

    def to_dict(self) -> dict:
        return {**asdict(self), "avg_bits": self.avg_bits, "budget_avg_bits": self.budget_avg_bits,
                "predicted_loss": self.predicted_loss}


def budgeted_linears(model: nn.Module, recipe: Recipe, algorithms) -> dict[str, tuple[int, str, nn.Linear]]:
    """name -> (layer index, name within the layer, module) of every Linear the recipe quantizes."""
    normalize_linears(model)
    prefix, layers = find_decoder_layers(model)
    found = {}
    for i, layer in enumerate(layers):
        for name, module in layer_linears(layer, f"{prefix}.{i}").items():
            found[name] = (i, name[len(f"{prefix}.{i}") + 1:], module)
    plans = plan_linears(recipe, algorithms, list(found), float_module_names(model))
    return {name: entry for name, entry in found.items() if plans[name] is not None}


def every_field_set(args: WeightArgs) -> WeightArgs:
    """The candidate with every field explicit, so that an override takes nothing from the scheme beneath it."""
    return WeightArgs.model_validate(args.model_dump())


def resolve_budget(model: nn.Module, recipe: Recipe, samples: list[torch.Tensor] | None,
                   algorithms=None) -> tuple[Recipe, BudgetReport]:
    """Measure, choose, and return the recipe without `budget` but with the choice as overrides."""
    spec = recipe.budget
    if not samples:
        raise CalibrationError("a budget needs calibration samples to measure each Linear's sensitivity on")
    linears = budgeted_linears(model, recipe, algorithms or plan_algorithms(recipe))
    if not linears:
        raise RecipeError("budget: every Linear is ignored, nothing to budget; leave out `budget` or `ignore`")
    modules = {name: module for name, (_, _, module) in linears.items()}
    costs = {name: [storage_bits(args, m.out_features, m.in_features) for args in spec.candidates]
             for name, m in modules.items()}
    weights = sum(m.out_features * m.in_features for m in modules.values())
    budget_bits = spec.bytes * 8 if spec.bytes is not None else int(spec.avg_bits * weights)
    floor = sum(min(c) for c in costs.values())
    if floor > budget_bits:
        asked = f"bytes={spec.bytes}" if spec.bytes is not None else f"avg_bits={spec.avg_bits}"
        raise RecipeError(f"budget.{asked} is below the smallest possible size: every Linear at its cheapest "
                          f"candidate takes {floor // 8} bytes, {floor / weights:.3f} bits per weight with scales")
    measure = kl_sensitivity if spec.method == "kl" else proxy_sensitivity
    log.info("budget: measuring %d Linears x %d candidates (%s)", len(modules), len(spec.candidates), spec.method)
    sensitivity = measure(model, modules, spec.candidates, samples[:spec.samples])
    names = list(modules)
    chosen = choose_options([costs[n] for n in names], [sensitivity[n] for n in names], budget_bits)
    report = BudgetReport(spec.method, [describe(a) for a in spec.candidates], budget_bits, 0, weights)
    for name, pick in zip(names, chosen, strict=True):
        layer, kind, module = linears[name]
        report.linears.append(LinearChoice(name, layer, kind, module.out_features * module.in_features,
                                           costs[name], sensitivity[name], pick))
    report.used_bits = sum(c.bits for c in report.linears)
    overrides = [LayerOverride(targets=targets, weights=every_field_set(args)) for args, targets in
                 ((args, [n for n, pick in zip(names, chosen, strict=True) if pick == j])
                  for j, args in enumerate(spec.candidates)) if targets]
    resolved = recipe.model_copy(update={"budget": None, "overrides": [*recipe.overrides, *overrides]})
    return resolved, report
