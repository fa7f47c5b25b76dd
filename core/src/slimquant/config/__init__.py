from slimquant.config.recipe import CalibrationSpec, LayerOverride, ModelSpec, Recipe, RuntimeSpec
from slimquant.config.scheme import PRESETS, ActArgs, Scheme, Strategy, WeightArgs

__all__ = [
    "PRESETS", "ActArgs", "CalibrationSpec", "LayerOverride", "ModelSpec", "Recipe", "RuntimeSpec",
    "Scheme", "Strategy", "WeightArgs",
]
