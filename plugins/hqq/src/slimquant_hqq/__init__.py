"""HQQ for slimquant: the `hqq` plugin and its half-quadratic zero-point solver."""

from slimquant_hqq.plugin import HQQPlugin
from slimquant_hqq.solver import HQQSettings, hqq_quantize

__all__ = ["HQQPlugin", "HQQSettings", "hqq_quantize"]
