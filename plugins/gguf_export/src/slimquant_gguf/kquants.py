"""llama.cpp's K-quant grids, Q4_K and Q6_K, as slimquant weight grids: each row is cut into super-blocks of 256
columns, and a super-block's group scales (and Q4_K's group minimums) are small integers times one float16 number.

- Q4_K: groups of 32; x = d * sc * q - dmin * m with q in 0..15, sc and m in 0..63, d and dmin float16.
  As slimquant codes: scale = d * sc, code = q - 8, zero = dmin * m / scale - 8 (fractional).
- Q6_K: groups of 16; x = d * sc * q with q in -32..31, sc in -128..127, d float16. scale = d * sc.

`qparams` takes each group's min-max range (shrunk by a clip ratio: GPTQ's mse search), then puts the group scales
(and minimums) on their super-block's integers as llama.cpp's quantizer does: the largest scale of a super-block is
sc 63 (Q4_K) or -128 (Q6_K, sign kept). The scales the weight algorithm rounds the codes with are then exactly
d * sc, so the gguf file holds these codes and integers (slimquant_gguf.kblocks recovers the integers).
The super-block needs the whole row: a weight algorithm that asks for one group's scale during a sweep (GPTQ
without static_groups, output feature `sweep_groups`) is refused: the kquant grid's `holds` is empty.
"""

from __future__ import annotations

import torch

from slimquant.sdk import WeightGrid, contiguous_group_minmax

SUPER_BLOCK = 256
HALF_TINY = 2.0 ** -24  # the smallest float16 (subnormal): a super-block's d never rounds to 0


def _half(t: torch.Tensor) -> torch.Tensor:
    return t.half().float().clamp_min(HALF_TINY)


class KQuantGrid(WeightGrid):
    type_name = ""
    group = 0

    def group_size(self, args) -> int:
        return self.group

    def groups(self, w: torch.Tensor, group_size, g_idx, clip_ratio) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group min and max [rows, super-blocks, groups per super-block], shrunk by clip_ratio."""
        rows, cols = w.shape
        if g_idx is not None or group_size != self.group or cols % SUPER_BLOCK:
            raise ValueError(f"{self.type_name}: a row's {SUPER_BLOCK}-column super-blocks share their scales, so the "
                             f"grid needs whole rows in groups of {self.group} (got {cols} columns in groups of "
                             f"{group_size}{', permuted' if g_idx is not None else ''}; gptq: static_groups: true)")
        xmin, xmax = contiguous_group_minmax(w.float(), group_size)
        shape = (rows, cols // SUPER_BLOCK, SUPER_BLOCK // self.group)
        return (xmin * clip_ratio).view(shape), (xmax * clip_ratio).view(shape)

    def quantize_scales(self, scale):
        return None  # qparams already put the scales on the super-block's integers; float32 holds them exactly


class Q4KGrid(KQuantGrid):
    type_name, group = "q4_k", 32

    def __init__(self):
        super().__init__(bits=4, symmetric=False)

    def qparams(self, w, group_size, g_idx=None, clip_ratio=1.0):
        xmin, xmax = self.groups(w, group_size, g_idx, clip_ratio)
        low = xmin.clamp(max=0)
        step = (xmax - low).clamp_min(0) / 15
        offset = -low  # the group's minimum, stored positive: x = d * sc * q - dmin * m
        d, sc = _unsigned_six_bit(step, at_least=1, empty=63)
        dmin, m = _unsigned_six_bit(offset, at_least=0, empty=0)
        scale = (d * sc).flatten(1)
        zero = (dmin * m).flatten(1) / scale - 8
        return scale, zero


class Q6KGrid(KQuantGrid):
    type_name, group = "q6_k", 16

    def __init__(self):
        super().__init__(bits=6, symmetric=True, signed=True)

    def qparams(self, w, group_size, g_idx=None, clip_ratio=1.0):
        xmin, xmax = self.groups(w, group_size, g_idx, clip_ratio)
        step = torch.where(-xmin >= xmax, xmin, xmax) / -32  # the signed extreme is code -32
        extreme = step.gather(-1, step.abs().argmax(-1, keepdim=True))
        tiny = extreme.abs() < 128 * HALF_TINY  # d would round to 0: the smallest d, every sc -128
        extreme = torch.where(tiny, -128 * HALF_TINY, extreme)
        d = (extreme / -128).half().float()  # signed, so that the extreme group's sc is -128
        sc = torch.round(step * (-128 / extreme)).clamp_(-128, 127)
        sc = torch.where(tiny, -128.0, torch.where(sc == 0, 1.0, sc))  # sc 0 would divide by 0; 1 keeps 0s at 0
        return (d * sc).flatten(1), None


def _unsigned_six_bit(values: torch.Tensor, at_least: int, empty: int) -> tuple[torch.Tensor, torch.Tensor]:
    """values [rows, super-blocks, groups] >= 0 as dmin * m: m = round(63 * value / the super-block's largest) in
    at_least..63 and dmin = that largest / 63 in float16 (llama.cpp's rule: the largest is m 63); m = `empty` for
    a super-block of zeros."""
    top = values.amax(-1, keepdim=True)
    m = torch.where(top > 0, torch.round(values * (63 / top.clamp_min(HALF_TINY))), float(empty))
    return _half(top / 63), m.clamp_(at_least, 63)


GRIDS = {4: Q4KGrid, 6: Q6KGrid}
