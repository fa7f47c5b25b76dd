"""Activation quantization parameters returned by the `quantize_act` hook."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ActQParams:
    """A Linear's input quantization, what ``quantize_act`` returns: ``bits``, ``symmetric``, and either ``dynamic``
    (scales computed per token at run time, no tensors) or a static ``scale`` ([1] per tensor, [in_features] per
    channel) with, when asymmetric, an integer-valued ``zero`` of the same shape. Inputs are quantized as
    ``round(x / scale + zero)`` clamped to ``qrange(bits)``."""

    bits: int
    symmetric: bool
    dynamic: bool  # per token at run time: no stored scale
    scale: torch.Tensor | None = None  # static: [1] per tensor or [in_features] per channel
    zero: torch.Tensor | None = None  # static asymmetric only, integer-valued

    def __post_init__(self):
        if not self.dynamic and self.scale is None:
            raise ValueError("static activation quantization needs a scale")
        if self.scale is not None and not torch.isfinite(self.scale).all():
            raise ValueError("activation scale is not finite")

    def to(self, device) -> ActQParams:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ActQParams(self.bits, self.symmetric, self.dynamic, move(self.scale), move(self.zero))
