"""bitsandbytes' double quantization of the absmax scales: minus their mean, then 8 bits per scale with one
float32 absmax per block of 256 consecutive scales (row-major over [out, groups]).

bitsandbytes rounds onto its non-linear "dynamic" 8-bit map; ours is the linear one (code / 127), which its
QuantState holds as well (state2.code: any 256-entry table). 0.5 + 1/64 + 1/(64 * 64) byte per weight at block 64.
"""

from __future__ import annotations

import torch

from slimquant.sdk import QuantizedScale

SCALE_BLOCK = 256
LEVELS = 127


def double_quantize(scale: torch.Tensor, block_size: int = SCALE_BLOCK) -> QuantizedScale:
    flat = scale.float().reshape(-1)
    offset = flat.mean().reshape(1)
    deviation = flat - offset
    blocks = -(-flat.numel() // block_size)
    padded = torch.zeros(blocks * block_size, device=flat.device)
    padded[:flat.numel()] = deviation.abs()
    block_scale = (padded.view(blocks, block_size).amax(-1) / LEVELS).clamp_min(1e-30)
    step = block_scale[torch.arange(flat.numel(), device=flat.device) // block_size]
    codes = torch.round(deviation / step).clamp_(-LEVELS, LEVELS).to(torch.int8)
    return QuantizedScale(codes.view(scale.shape), block_scale, offset, block_size)
