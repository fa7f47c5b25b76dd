"""Per-Linear quantization error (PaddleSlim's LayerWiseQuantError): on the same input, how far the
fake-quantized Linear's output is from the float Linear's, as ||y_q - y||^2 / ||y||^2."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def _difference(module: nn.Module, float_twin: nn.Linear, x: torch.Tensor, output: torch.Tensor,
                reference: torch.Tensor) -> torch.Tensor:
    """output - reference, computed so that its rounding is relative to itself: in calibration passes under
    half-precision autocast, two rounded outputs would differ by their own rounding (about 1e-5 of the output's
    energy, the size of an 8-bit weight error)."""
    if not torch.is_autocast_enabled(x.device.type):
        return output - reference
    if getattr(module, "act", None) is None:  # weight-only: x (Wq - W)^T, the biases cancel
        return F.linear(x, module.weight - float_twin.weight)
    with torch.autocast(x.device.type, enabled=False):
        x = x.to(float_twin.weight.dtype)
        return module.forward(x) - float_twin(x)  # .forward: not through the measuring hook again


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
            difference = _difference(module, floats[name], x, output, reference)
            sums[name][0] += float(difference.float().pow(2).sum())
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
