"""Nearest codebook codes through the compiled `_nearest` kernel: one pass over the weights instead of the core's
ten tensor operations, the same codes and scales. Each function returns None where the kernel does not apply (not
built, not float32 on the CPU, scales not one per run of consecutive weights) and the caller takes the core's path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimquant.sdk import EPS, CodebookGrid, effective_group_size, num_groups, qrange

try:
    from slimquant_nf4 import _nearest
except ImportError:  # built without a C compiler: the core's torch path gives the same codes
    _nearest = None

MAX_MIDPOINTS = 15
WEIGHTS_PER_THREAD = 1 << 20  # below about a millisecond of work a thread costs more than it saves


def kernel_available() -> bool:
    return _nearest is not None


@dataclass(frozen=True)
class Lookup:
    """A codebook grid as the kernel reads it: its midpoints, and its cell table (MidpointCells) when it has one."""

    midpoints: torch.Tensor
    below: torch.Tensor | None
    cell_midpoint: torch.Tensor | None
    low: int

    @classmethod
    def of(cls, grid: CodebookGrid, table: bool = True) -> Lookup:
        cells = grid.cells if table else None
        return cls(grid.midpoints.float().contiguous(), None if cells is None else cells.below.contiguous(),
                   None if cells is None else cells.midpoint.contiguous(), qrange(grid.bits)[0])

    def args(self) -> tuple:
        table = self.below is not None
        return (self.midpoints.data_ptr(), len(self.midpoints), self.below.data_ptr() if table else 0,
                self.cell_midpoint.data_ptr() if table else 0, len(self.below) if table else 0)

    def uses_table(self) -> bool:
        """Whether the kernel takes the AVX-512 table on this CPU (else it counts midpoints)."""
        return _nearest is not None and _nearest.uses_table(self.args())


def _applies(w: torch.Tensor, lookup: Lookup) -> bool:
    return (_nearest is not None and len(lookup.midpoints) <= MAX_MIDPOINTS and w.device.type == "cpu"
            and w.dtype == torch.float32)


def _threads(numel: int) -> int:
    return max(1, min(torch.get_num_threads(), numel // WEIGHTS_PER_THREAD))


def nearest_codes(w: torch.Tensor, scale: torch.Tensor, lookup: Lookup) -> torch.Tensor | None:
    """Float codes (low + the number of midpoints below w / scale, NaN as 0) for a scale that is one per weight or
    one per last-dimension row of w (shape w.shape[:-1] + (1,))."""
    if not _applies(w, lookup) or w.dim() == 0 or not w.numel() or scale.dtype != torch.float32:
        return None
    if scale.shape == w.shape:
        size = 1
    elif scale.shape == w.shape[:-1] + (1,):
        size = w.shape[-1]
    else:
        return None
    w, scale = w.contiguous(), scale.contiguous()
    out = torch.empty_like(w)
    _nearest.nearest(w.data_ptr(), scale.data_ptr(), out.data_ptr(), scale.numel(), size, float(lookup.low),
                     _threads(w.numel()), lookup.args())
    return out


def absmax_codes(w: torch.Tensor, group_size: int | None, lookup: Lookup) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale [rows, groups], int8 codes [rows, cols]) of a 2-D weight: each group's largest |w| (at least EPS; NaN
    where the group holds a NaN) and every weight's nearest value on it; the last group of a row may be shorter."""
    if not _applies(w, lookup) or w.dim() != 2 or not w.numel():
        return None
    rows, cols = w.shape
    size = effective_group_size(group_size, cols)
    w = w.contiguous()
    scale = torch.empty(rows, num_groups(cols, size), dtype=torch.float32)
    codes = torch.empty(w.shape, dtype=torch.int8)
    _nearest.absmax_nearest(w.data_ptr(), scale.data_ptr(), codes.data_ptr(), rows, cols, size, float(lookup.low),
                            EPS, _threads(w.numel()), lookup.args())
    return scale, codes
