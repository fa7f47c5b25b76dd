"""Two-level weight scales, msModelSlim's W4A8_DYNAMIC per group: each output channel has a scale
(`weight_scale`, [out, 1]) for `channel_bits` integers, and each group a scale on those (`weight_scale_second`,
[out, groups]); a code dequantizes to code * group_scale * channel_scale.

`TwoLevelGrid` is the uniform grid whose scales are stored that way: the weight algorithm chooses each group's
scale as usual (min-max, GPTQ's sweep), then `quantize_scales` factors them, channel_scale = max_g(scale) *
2^(bits-1) / (2^(channel_bits-1) - 1) so that every code * group_scale fits the channel level's integers, and
group_scale = scale / channel_scale. The scale used from then on is exactly group_scale * channel_scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimquant.quant.grid import WeightGrid
from slimquant.quant.math import EPS, signed_scale
from slimquant.quant.qweight import QuantizedWeight


@dataclass
class TwoLevelScale:
    """A weight's scales stored in two levels (see the module docstring): ``group_scale`` [out, groups] times
    ``channel_scale`` [out, 1] is the scale; ``channel_bits`` is the width of the channel level's integers."""

    group_scale: torch.Tensor  # float32 [out, groups]: msModelSlim's weight_scale_second
    channel_scale: torch.Tensor  # float32 [out, 1]: msModelSlim's weight_scale
    channel_bits: int

    def __post_init__(self):
        rows = self.group_scale.shape[0]
        if self.group_scale.dim() != 2 or tuple(self.channel_scale.shape) != (rows, 1):
            raise ValueError(f"two-level scales must be [out, groups] and [out, 1], got "
                             f"{list(self.group_scale.shape)} and {list(self.channel_scale.shape)}")

    def dequantize(self) -> torch.Tensor:
        return self.group_scale.float() * self.channel_scale.float()

    def to(self, device) -> TwoLevelScale:
        return TwoLevelScale(self.group_scale.to(device), self.channel_scale.to(device), self.channel_bits)


class TwoLevelGrid(WeightGrid):
    def __init__(self, bits: int, symmetric: bool, channel_bits: int, signed: bool = True):
        super().__init__(bits, symmetric, signed)
        self.channel_bits = channel_bits

    def quantize_scales(self, scale: torch.Tensor) -> TwoLevelScale:
        scale = scale.float()
        top = 2 ** (self.bits - 1) / (2 ** (self.channel_bits - 1) - 1)
        channel = (scale.abs().amax(dim=1, keepdim=True) * top).clamp_min(EPS)  # group scales may be negative
        return TwoLevelScale((scale / channel).contiguous(), channel.contiguous(), self.channel_bits)

    def quantized_weight(self, codes, scale, zero, group_size, g_idx=None, scale_quant=None) -> QuantizedWeight:
        stored = scale_quant if scale_quant is not None else self.quantize_scales(scale)
        return QuantizedWeight(codes=codes.to(torch.int8), scale=stored.dequantize(),
                               zero=None if zero is None else zero.float(), bits=self.bits, group_size=group_size,
                               g_idx=g_idx, two_level=stored)


def two_level_grid(args) -> TwoLevelGrid | None:
    """The grid of WeightArgs with `channel_bits` (None without)."""
    channel_bits = getattr(args, "channel_bits", None)
    return None if not channel_bits else TwoLevelGrid(args.bits, args.symmetric, channel_bits, signed_scale(args))
