"""GPTQ for slimquant."""

from slimquant_gptq.gptq import GPTQSettings, gptq_quantize, inverse_hessian_factor
from slimquant_gptq.layer import GPTQ
from slimquant_gptq.plugin import GPTQPlugin

__all__ = ["GPTQ", "GPTQPlugin", "GPTQSettings", "gptq_quantize", "inverse_hessian_factor"]
