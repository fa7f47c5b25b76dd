"""slimquant: post-training quantization of large language models, built from plugins."""

from slimquant.api import quantize, smooth_only
from slimquant.config import PRESETS, ActArgs, Recipe, Scheme, WeightArgs
from slimquant.errors import SlimquantError
from slimquant.hookspecs import hookimpl
from slimquant.quant.actparams import ActQParams
from slimquant.quant.qweight import QuantizedWeight

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "ActArgs", "ActQParams", "QuantizedWeight", "Recipe", "Scheme", "SlimquantError", "WeightArgs",
    "hookimpl", "quantize", "smooth_only",
]
