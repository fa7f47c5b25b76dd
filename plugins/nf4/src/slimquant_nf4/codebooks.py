"""The 16 values of bitsandbytes' two 4-bit data types, sorted: code c stands for VALUES[c + 8].

NF4 (NormalFloat4, QLoRA, Dettmers et al. 2023): quantiles of N(0, 1), normalised to [-1, 1], from two halves so
that 0 is exact: 8 positive values (the top one 1.0) and 7 negative ones (the bottom one -1.0), plus 0. The
constants are bitsandbytes' float32 table; `normal_float_values` rebuilds them from the quantiles (tests compare).

FP4: bitsandbytes' e2m1 table (sign, 2 exponent bits, 1 mantissa bit, its own bias) normalised by its largest
magnitude 12: magnitudes 0, 0.0625, 2, 3, 4, 6, 8, 12 over 12. It holds both +0 and -0, so two codes mean 0.
"""

from __future__ import annotations

import torch

NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

_FP4_MAGNITUDES = torch.tensor([0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]) / 12.0
FP4 = torch.cat([-_FP4_MAGNITUDES.flip(0), _FP4_MAGNITUDES]).float()  # -1 ... -0, 0 ... 1

CODEBOOKS = {"nf4": NF4, "fp4": FP4}

# The nibble bitsandbytes stores for each of our codes' values (index c + 8), for converting saved codes:
# NF4's table is ours in the same order; FP4's is ordered by bit pattern (sign bit 3, then exponent, mantissa).
BITSANDBYTES_NIBBLE = {
    "nf4": list(range(16)),
    "fp4": [11, 10, 13, 12, 15, 14, 9, 8, 0, 1, 6, 7, 4, 5, 2, 3],
}


def normal_float_values(offset: float = 0.9677083) -> torch.Tensor:
    """NF4 from its definition: 8 positive quantiles of N(0, 1) between `offset` and 1/2 (exclusive), 7 negative
    ones, and 0; normalised by the largest (QLoRA's offset (1 - 1/(2*15) + 1 - 1/(2*16)) / 2)."""
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (values / values.abs().max()).float()
