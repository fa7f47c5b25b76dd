"""NF4 / FP4 for slimquant: the codebooks, the blockwise-absmax grid with optional double quantization, the plugin."""

from slimquant_nf4.codebooks import CODEBOOKS, FP4, NF4
from slimquant_nf4.double_quant import double_quantize
from slimquant_nf4.grid import NF4Grid
from slimquant_nf4.plugin import NF4Plugin

__all__ = ["CODEBOOKS", "FP4", "NF4", "NF4Grid", "NF4Plugin", "double_quantize"]
