"""PaddleSlim-style building block: GPTQ(layer) gathers its Hessian while you run data, then fasterquant()."""

from __future__ import annotations

import torch
from torch import nn

from slimquant.quant.hessian import HessianAccumulator
from slimquant.quant.qweight import QuantizedWeight
from slimquant_gptq.gptq import GPTQSettings, gptq_quantize


class GPTQ:
    """Wrap an nn.Linear: its inputs feed a Hessian until `fasterquant()` quantizes the weight in place."""

    def __init__(self, layer: nn.Linear):
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"GPTQ wraps an nn.Linear, got {type(layer).__name__}")
        self.layer = layer
        self.hessian = HessianAccumulator(layer.in_features, device=layer.weight.device)
        self._handle = layer.register_forward_hook(lambda m, inp, out: self.hessian.add(inp[0]))

    @torch.no_grad()
    def fasterquant(self, act_order: bool = False, bits: int = 4, group_size: int | None = None, sym: bool = False,
                    damp_percent: float = 0.01, block_size: int = 128, static_groups: bool = False) -> QuantizedWeight:
        """Quantize the weight (the layer keeps the dequantized weight) and stop gathering."""
        self._handle.remove()
        if self.hessian.tokens == 0:
            raise ValueError("GPTQ.fasterquant(): no data went through the layer; run calibration data first")
        settings = GPTQSettings(bits=bits, symmetric=sym, group_size=group_size, damp_percent=damp_percent,
                                block_size=block_size, act_order=act_order, static_groups=static_groups)
        qweight = gptq_quantize(self.layer.weight, self.hessian.hessian, settings)
        self.layer.weight.copy_(qweight.dequantize(self.layer.weight.dtype))
        return qweight
