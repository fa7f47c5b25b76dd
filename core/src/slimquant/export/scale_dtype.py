"""The weight-scale float type an output format stores, given to a recipe that names none.

A format whose files hold float16 scales (gguf, GPTQ) declares ``scale_dtype = "float16"``; its ``check`` refuses
a plan quantized with float32 scales, which the file could not hold exactly. A user who asks for such a format and
sets no ``weights.scale_dtype`` gets the format's type, when the plan then passes every check and did not before;
the plan says so.
"""

from __future__ import annotations

from slimquant.config.recipe import Recipe
from slimquant.errors import PluginError, RecipeError
from slimquant.plugins import EXPORTERS, load_plugin_class, plan_algorithms


def declared_scale_dtype(formats: list[str]) -> str | None:
    """The one scale type the formats declare, or None (none declared, several, or a format not installed)."""
    try:
        declared = {getattr(load_plugin_class(f, EXPORTERS), "scale_dtype", None) for f in formats} - {None}
    except PluginError:
        return None
    return declared.pop() if len(declared) == 1 else None


def _names_scale_dtype(recipe: Recipe) -> bool:
    blocks = [recipe.weights, *(o.weights for o in recipe.overrides)]
    return any(b is not None and "scale_dtype" in b.model_fields_set for b in blocks)


def _with_scale_dtype(recipe: Recipe, dtype: str) -> Recipe:
    data = recipe.model_dump(mode="json", exclude_unset=True)
    data["weights"] = {**data.get("weights", {}), "scale_dtype": dtype}
    for override in data.get("overrides", []):
        if override.get("weights") is not None:
            override["weights"] = {**override["weights"], "scale_dtype": dtype}
    return Recipe.parse(data, source="recipe with the format's scale_dtype")


def _passes(recipe: Recipe, formats: list[str]) -> bool:
    try:
        plan_algorithms(recipe, formats)
    except RecipeError:
        return False
    return True


def fit_scale_dtype(recipe: Recipe, formats: list[str]) -> tuple[Recipe, str | None]:
    """`recipe`, or a copy with the formats' scale type and a line for the plan saying why."""
    dtype = declared_scale_dtype(formats)
    if dtype is None or _names_scale_dtype(recipe) or _passes(recipe, formats):
        return recipe, None
    try:
        adapted = _with_scale_dtype(recipe, dtype)
    except RecipeError:
        return recipe, None
    if not _passes(adapted, formats):
        return recipe, None
    return adapted, f"weights.scale_dtype {dtype}: {', '.join(formats)} stores {dtype} scales"
