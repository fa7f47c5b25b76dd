"""The uniform integer grid the surviving weights are rounded onto: scales, rounding, the QuantizedWeight."""

from __future__ import annotations

import torch

from slimquant.sdk import QuantizedWeight, WeightOutliers, qrange, weight_qparams
from slimquant_sparse.settings import SparseSettings


def static_qparams(w: torch.Tensor, s: SparseSettings) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scale and zero [out, groups] of `w`, per tensor (repeated per row), channel or group.

    The range always includes 0 and an asymmetric zero point is an integer code in range
    (`slimquant.quant.math.range_to_qparams`), so a pruned weight, rounded to its zero point, dequantizes to 0."""
    if not s.per_tensor:
        return weight_qparams(w, s.bits, s.symmetric, s.group_size, signed=s.signed)
    scale, zero = weight_qparams(w.reshape(1, -1), s.bits, s.symmetric, None, signed=s.signed)
    return scale.expand(w.shape[0], 1).contiguous(), None if zero is None else zero.expand(w.shape[0], 1).contiguous()


def round_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                pruned: torch.Tensor) -> torch.Tensor:
    """Codes of `x` (elementwise scale and zero), the pruned ones at the zero point."""
    lo, hi = qrange(bits)
    q = torch.round(x / scale)
    if zero is not None:
        q = q.add_(zero)
    q = q.clamp_(lo, hi)
    return torch.where(pruned, torch.zeros_like(q) if zero is None else zero.expand_as(q), q)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    return q * scale if zero is None else (q - zero) * scale


def sparse_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, s: SparseSettings,
                  outliers: WeightOutliers | None) -> QuantizedWeight:
    return QuantizedWeight(codes=codes.to(torch.int8).contiguous(), scale=scale.float().contiguous(),
                           zero=None if zero is None else zero.float().contiguous(), bits=s.bits,
                           group_size=s.group_size, outliers=outliers,
                           sparsity=s.pattern if s.prunes else None)
