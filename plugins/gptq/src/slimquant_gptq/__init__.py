"""GPTQ for slimquant: the `gptq` algorithm plugin, the pure sweep, and the PaddleSlim-style `GPTQ` block."""

from slimquant_gptq.gptq import GPTQSettings, gptq_quantize
from slimquant_gptq.layer import GPTQ
from slimquant_gptq.plugin import GPTQPlugin

__all__ = ["GPTQ", "GPTQPlugin", "GPTQSettings", "gptq_quantize"]
