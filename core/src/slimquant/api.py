"""The Python entry point: quantize a loaded model in place with a recipe."""

from __future__ import annotations

import logging

import torch
from torch import nn

from slimquant.budget import resolve_budget
from slimquant.calibration import build_samples, from_user_data
from slimquant.config.recipe import Recipe
from slimquant.errors import CalibrationError, RecipeError
from slimquant.model.checks import check_causal_lm, check_model_finite
from slimquant.model.loading import resolve_device
from slimquant.plugins import plan_algorithms
from slimquant.runtime import distributed
from slimquant.runtime.fingerprint import job_parts
from slimquant.runtime.pipeline import LayerwiseQuantizer, QuantizationReport

log = logging.getLogger(__name__)


def quantize(model: nn.Module, recipe: Recipe | dict, *, tokenizer=None, calib_data=None,
             samples: list[torch.Tensor] | None = None, save_type: str | list[str] | None = None) -> QuantizationReport:
    """Quantize `model` in place: afterwards it is the fake-quantized model.

    Calibration comes from `samples` (token tensors), else `calib_data` (texts or token tensors, the
    msModelSlim way), else the recipe's calibration source (which needs `tokenizer`). When no plugin needs data
    and none is given (no samples, no calib_data, no `calibration` in the recipe), the weights are quantized
    straight away, data-free; errors against float are then not measured. A recipe with a `budget` first measures
    every Linear's sensitivity on the calibration data and chooses its width (`report.budget`). `save_type` names
    the output formats the model will be saved in: what they cannot hold (the architecture, a scheme, a plugin's
    output) is refused before any work, instead of at save.
    """
    formats = [save_type] if isinstance(save_type, str) else list(save_type or [])
    return _run(model, recipe, tokenizer, calib_data, samples, smooth_only=False, formats=formats)


def smooth_only(model: nn.Module, recipe: Recipe | dict, *, tokenizer=None, calib_data=None,
                samples: list[torch.Tensor] | None = None) -> QuantizationReport:
    """Run only the recipe's smoothers (SmoothQuant, Shift, ...) on `model` in place, layer by layer: the model
    stays in float and computes the same function. The recipe's scheme and `ignore` decide which Linears count."""
    recipe = _recipe(recipe)
    if not plan_algorithms(recipe).smoothers:
        raise RecipeError("smooth_only: the recipe names no smoothing algorithm (a Smoother plugin)")
    return _run(model, recipe, tokenizer, calib_data, samples, smooth_only=True)


def _recipe(recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.parse(recipe)
    raise RecipeError(f"recipe must be a slimquant Recipe or a mapping such as {{'scheme': 'W8A16'}}, "
                      f"got {type(recipe).__name__}")


def _run(model, recipe, tokenizer, calib_data, samples, smooth_only: bool, formats=()) -> QuantizationReport:
    recipe = _recipe(recipe)
    check_causal_lm(model)
    if recipe.runtime.check_finite:
        check_model_finite(model)
    algorithms = plan_algorithms(recipe, list(formats))  # validates every plugin argument before any work
    device = resolve_device(recipe.model.device)
    distributed.agree(job_parts(recipe, algorithms), "the recipe and versions", device)  # several processes
    budget = None
    if recipe.budget is not None and not smooth_only:  # the widths are chosen before the runtime plans them
        samples = _samples(model, recipe, tokenizer, calib_data, samples)
        recipe, budget = resolve_budget(model, recipe, samples, algorithms)
        algorithms = plan_algorithms(recipe, list(formats))
    quantizer = LayerwiseQuantizer(model, recipe, device, algorithms, smooth_only=smooth_only)
    if budget is None:
        if (samples is None and calib_data is None and not quantizer.needs_data
                and "calibration" not in recipe.model_fields_set):
            return quantizer.run(None)  # data-free: nothing to calibrate, and no data given to measure errors on
        samples = _samples(model, recipe, tokenizer, calib_data, samples)
    report = quantizer.run(samples)
    report.budget = budget
    return report


def _samples(model, recipe: Recipe, tokenizer, calib_data, samples) -> list[torch.Tensor]:
    if samples is not None:
        return from_user_data(samples, tokenizer)
    if calib_data is not None:
        return from_user_data(calib_data, tokenizer, recipe.calibration.seqlen)
    if tokenizer is None:
        raise CalibrationError("give calibration `samples` or `calib_data`, or a tokenizer for the recipe's source")
    return build_samples(recipe.calibration, tokenizer, model)
