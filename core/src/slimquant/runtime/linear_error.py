"""Per-Linear quantization error (PaddleSlim's LayerWiseQuantError): on the same input, how far the
fake-quantized Linear's output is from the float Linear's, as ||y_q - y||^2 / ||y||^2."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def measure_linear_errors(quantized: dict[str, nn.Module], floats: dict[str, nn.Linear], into: dict[str, float],
                          rows: int | None = None):
    """Within the block, each call of a quantized Linear also runs its float twin on the same input (the first
    `rows` rows of the batch dimension only, when given) and accumulates the relative error into `into`."""
    sums: dict[str, list[float]] = {name: [0.0, 0.0] for name in quantized}

    def hook(name):
        def record(module, inputs, output):
            x, output = (inputs[0], output) if rows is None else (inputs[0][:rows], output[:rows])
            reference = floats[name](x)
            sums[name][0] += float((output - reference).float().pow(2).sum())
            sums[name][1] += float(reference.float().pow(2).sum())
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in quantized.items()]
    try:
        with torch.no_grad():
            yield
    finally:
        for h in handles:
            h.remove()
    for name, (num, den) in sums.items():
        into[name] = num / den if den > 0 else 0.0
