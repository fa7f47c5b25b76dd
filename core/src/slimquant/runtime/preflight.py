"""Everything about a run that the model's configuration decides, checked on a weightless copy of the model.

`check_before_loading` builds the model from its config with every parameter on the meta device (about a second
for SmolLM2; no weight is read) and runs the checks the runtime would otherwise run after loading: names in
`ignore` and `overrides` that match no Linear, explicit group sizes wider than a Linear, every plugin's and
output format's per-Linear check with the Linear's real shape, the attention-cache plan, and a `budget` that
cannot fit even with every Linear at its cheapest candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimquant.config.recipe import ModelSpec, Recipe
from slimquant.config.scheme import Scheme
from slimquant.errors import RecipeError
from slimquant.model.structure import find_decoder_layers, float_module_names, layer_linears, normalize_linears
from slimquant.runtime.cache_pass import check_cache_plan
from slimquant.runtime.model_context import ModelContext
from slimquant.runtime.plan import LinearPlan, check_group_sizes, plan_linears

MAX_LISTED = 8
LINEAR = "<Linear>"  # stands for the Linear's name while identical problems are grouped


@dataclass
class PlannedModel:
    prefix: str
    layers: nn.ModuleList
    linears: dict[str, nn.Linear]
    plans: dict[str, LinearPlan | None]


def weightless_model(spec: ModelSpec, config) -> nn.Module:
    """The model `config` describes, its parameters on the meta device (buffers are real and small)."""
    from transformers import AutoModelForCausalLM

    from slimquant.model.lazy import parameters_on_meta

    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec.dtype),
                                                 trust_remote_code=spec.trust_remote_code)
    return model.eval()


def plan_model(model: nn.Module, recipe: Recipe, algorithms) -> PlannedModel:
    """Each decoder-layer Linear's plan, with every check that needs only the model's structure."""
    normalize_linears(model)
    prefix, layers = find_decoder_layers(model)
    linears: dict[str, nn.Linear] = {}
    for i, layer in enumerate(layers):
        linears.update(layer_linears(layer, f"{prefix}.{i}"))
    plans = plan_linears(recipe, algorithms, list(linears), float_module_names(model))
    check_group_sizes(recipe, plans, linears)
    if algorithms.cache is not None:
        check_cache_plan(model, layers, prefix, algorithms)
    check_linear_plans(algorithms, plans, linears)
    check_models(model, prefix, layers, plans, algorithms)
    return PlannedModel(prefix, layers, linears, plans)


def check_models(model: nn.Module, prefix: str, layers: nn.ModuleList, plans: dict, algorithms) -> None:
    """Each model transform's and output format's `check_model` on the model's structure (weightless before
    loading)."""
    problems = []
    for name in algorithms.transforms:
        ctx = ModelContext(model, prefix, layers, dict(plans), torch.device("meta"), current=name)
        problems += [f"{name}: {p}" for p in algorithms.plugins.call(name, "check_model", ctx=ctx) or []]
    if problems:
        raise RecipeError("the model transforms cannot rewrite this model: " + "; ".join(problems))
    for fmt in algorithms.exporters.plugins:
        ctx = ModelContext(model, prefix, layers, dict(plans), torch.device("meta"), current=fmt)
        problems += [f"save_type {fmt}: {p}" for p in algorithms.exporters.call(fmt, "check_model", ctx=ctx) or []]
    if problems:
        raise RecipeError("the output formats cannot hold this model: " + "; ".join(problems))


def check_linear_plans(algorithms, plans: dict[str, LinearPlan | None], linears: dict[str, nn.Linear]) -> None:
    """Each plugin's and output format's plan-time check on every Linear it will handle, with its real shape.
    The same problem on many Linears is reported once, with their count."""
    by_problem: dict[str, list[str]] = {}
    for name, plan in plans.items():
        if plan is not None:
            shape = (linears[name].out_features, linears[name].in_features)
            for problem in algorithms.check(plan, name, shape):
                named = problem if name in problem else f"{name}: {problem}"
                by_problem.setdefault(named.replace(name, LINEAR), []).append(name)
    if not by_problem:
        return
    lines = [_counted(problem, names) for problem, names in by_problem.items()]
    more = f"; ... and {len(lines) - MAX_LISTED} more problems" if len(lines) > MAX_LISTED else ""
    raise RecipeError("the plugins cannot quantize these Linears as planned: " + "; ".join(lines[:MAX_LISTED]) + more)


def _counted(problem: str, names: list[str]) -> str:
    first = problem.replace(LINEAR, names[0])
    if len(names) == 1:
        return first
    shown = ", ".join(names[1:3]) + (", ..." if len(names) > 3 else "")
    return f"{first} (and {len(names) - 1} more Linear(s) alike: {shown})"


def check_budget_fits(recipe: Recipe, planned: PlannedModel) -> None:
    """A budget needs at least one Linear to spend it on and must hold every Linear at its cheapest candidate."""
    from slimquant.budget.cost import storage_bits

    spec = recipe.budget
    if spec is None:
        return
    modules = [planned.linears[n] for n, plan in planned.plans.items() if plan is not None]
    if not modules:
        raise RecipeError("budget: every Linear is ignored, so there is nothing to spend the budget on; leave out "
                          "`budget` or `ignore`")
    weights = sum(m.out_features * m.in_features for m in modules)
    floor = sum(min(storage_bits(args, m.out_features, m.in_features) for args in spec.candidates) for m in modules)
    budget_bits = spec.bytes * 8 if spec.bytes is not None else spec.avg_bits * weights
    if floor > budget_bits:
        asked = f"bytes={spec.bytes}" if spec.bytes is not None else f"avg_bits={spec.avg_bits}"
        raise RecipeError(f"budget.{asked} is below the smallest possible size: every Linear at its cheapest "
                          f"candidate takes {floor // 8} bytes, {floor / weights:.3f} bits per weight with scales")


def check_budget_candidates(recipe: Recipe, algorithms) -> None:
    """Each budget candidate is a scheme the budget may give any Linear: the plugins and formats must take it."""
    if recipe.budget is None:
        return
    activations = recipe.base_scheme().activations
    problems = []
    for i, args in enumerate(recipe.budget.candidates):
        plan = algorithms.linear_plan(Scheme(weights=args, activations=activations), algorithms.weight_algorithm)
        problems += [f"budget.candidates[{i}]: {p}" for p in algorithms.check(plan)]
    if problems:
        raise RecipeError("the budget offers what its plugins or formats cannot do: " + "; ".join(problems))


def check_before_loading(recipe: Recipe, algorithms, config) -> None:
    """The run's plan on a weightless model built from `config`: refused here, before any weight is read."""
    check_budget_candidates(recipe, algorithms)
    planned = plan_model(weightless_model(recipe.model, config), recipe, algorithms)
    check_budget_fits(recipe, planned)
