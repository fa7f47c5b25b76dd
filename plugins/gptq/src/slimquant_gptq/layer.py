"""PaddleSlim-style building block: `GPTQ(layer)` gathers its Hessian while you run data, then `fasterquant()`.

    gptq = GPTQ(model.layers[0].mlp.down_proj)
    for batch in data:
        model(batch)
    qweight = gptq.fasterquant(act_order=True, bits=4, group_size=128)

Outside slimquant's runtime there is no one else to own the forward hook, so this block registers its own
and removes it in `fasterquant()`.
"""

from __future__ import annotations

import torch
from torch import nn

from slimquant.sdk import HessianAccumulator, QuantizedWeight
from slimquant_gptq.gptq import GPTQSettings, gptq_quantize


class GPTQ:
    """Wrap an nn.Linear: its inputs feed a Hessian until `fasterquant()` quantizes the weight in place."""

    def __init__(self, layer: nn.Linear):
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"GPTQ wraps an nn.Linear, got {type(layer).__name__}")
        self.layer = layer
        self.hessian = HessianAccumulator(layer.in_features, device=layer.weight.device)
        self._handle = layer.register_forward_hook(self._gather)

    def _gather(self, module, inputs, output) -> None:
        self.hessian.add(inputs[0])

    @torch.no_grad()
    def fasterquant(self, act_order: bool = True, bits: int = 4, group_size: int | None = None, sym: bool = False,
                    damp_percent: float = 0.01, block_size: int = 128, static_groups: bool = False,
                    mse: bool = False) -> QuantizedWeight:
        """Quantize the weight; the layer keeps the dequantized weight and stops gathering.

        act_order defaults to True as in PaddleSlim (columns by decreasing input energy).
        """
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.hessian.tokens == 0:
            raise ValueError("GPTQ.fasterquant(): no data went through the layer; run calibration data first")
        settings = GPTQSettings(bits=bits, symmetric=sym, group_size=group_size, damp_percent=damp_percent,
                                block_size=block_size, act_order=act_order, static_groups=static_groups, mse=mse)
        qweight = gptq_quantize(self.layer.weight, self.hessian.hessian, settings)
        self.layer.weight.copy_(qweight.dequantize(self.layer.weight.dtype))
        return qweight
