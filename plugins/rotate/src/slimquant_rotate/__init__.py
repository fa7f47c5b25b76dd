"""slimquant's `rotate` plugin: orthogonal (Hadamard) rotations of the residual stream and the attention heads,
fused into the weights before any quantizer runs."""

from slimquant_rotate.plugin import RotateConfig, RotatePlugin

__all__ = ["RotateConfig", "RotatePlugin"]
