"""A sparse 16-bit residual of a quantized weight: the few weights kept out of the integer grid (SpQR-style outliers).

`index` holds flat row-major positions in the [out, in] weight (int32 or int64, unique, in range), `values` their
float16 or bfloat16 values. Dequantization adds them to what the codes give, so an outlier whose code dequantizes to 0
comes back exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INDEX_DTYPES = (torch.int32, torch.int64)
VALUE_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class WeightOutliers:
    """A sparse residual added to a dequantized weight (see the module docstring): flat positions ``index`` and
    their 16-bit ``values``."""

    index: torch.Tensor  # int32/int64 [k]: row * in_features + column
    values: torch.Tensor  # float16/bfloat16 [k]

    def check(self, shape: tuple[int, int]) -> None:
        """Raise ValueError unless these outliers fit a weight of `shape`."""
        index, values = self.index, self.values
        if index.dtype not in INDEX_DTYPES or index.dim() != 1:
            raise ValueError(f"outlier index must be 1-D int32 or int64, got {index.dtype} {list(index.shape)}")
        if values.dtype not in VALUE_DTYPES or tuple(values.shape) != tuple(index.shape):
            raise ValueError(f"outlier values must be float16 or bfloat16 of the index's shape {list(index.shape)}, "
                             f"got {values.dtype} {list(values.shape)}")
        numel = shape[0] * shape[1]
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= numel):
            raise ValueError(f"outlier index outside [0, {numel - 1}] (a flat position in the {list(shape)} weight)")
        if torch.unique(index).numel() != index.numel():
            raise ValueError("outlier index holds a position twice")
        if not torch.isfinite(values).all():
            raise ValueError("outlier values hold NaN or Inf")

    def add_to(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (2-D, contiguous) with the outliers added, in place."""
        flat = weight.view(-1)
        flat.index_add_(0, self.index.long(), self.values.to(weight.dtype))
        return weight

    def to(self, device) -> WeightOutliers:
        return WeightOutliers(self.index.to(device), self.values.to(device))
