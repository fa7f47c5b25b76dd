"""`weights.scale_dtype: float16`: scales that formats storing float16 scales (GGUF's Q4_0 / Q4_1 / Q5_0 / Q5_1 /
Q8_0 `d` and `m`) hold exactly, so that the file and the fake-quantized model dequantize to the same weights.

The codes the algorithm chose are kept; only each group's scale moves, to the nearest value with few enough
significant bits: 11 (float16's) for symmetric weights; for asymmetric ones 11 - bits, so that the offset
scale * (zero + 2^(bits-1)) (GGUF's m, with the unsigned zero point below 2^bits) is exact in float16 as well.
Scales in float16's subnormal range can still fall short; the exporters check and say so.
"""

from __future__ import annotations

import dataclasses

import torch

from slimquant.quant.qweight import QuantizedWeight

FLOAT16_SIGNIFICAND_BITS = 11


def round_significand(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x rounded to `bits` significant binary digits (float32 in, float32 out)."""
    mantissa, exponent = torch.frexp(x.float())
    scaled = torch.round(mantissa * 2.0**bits) / 2.0**bits
    return torch.ldexp(scaled, exponent)


def float16_scales(qweight: QuantizedWeight) -> QuantizedWeight:
    bits = FLOAT16_SIGNIFICAND_BITS - (0 if qweight.zero is None else qweight.bits)
    rounded = round_significand(qweight.scale, max(bits, 1)).half().float()
    scale = torch.where(rounded.abs() < 2.0**-24, 2.0**-24, rounded)  # signed symmetric scales keep their sign
    return dataclasses.replace(qweight, scale=scale.to(qweight.scale.dtype))
