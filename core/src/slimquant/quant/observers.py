"""Activation statistics that accumulate batch by batch: running min/max, a growing histogram, a token sample.

Update apart from compute: `update()` is cheap and called per batch; ranges are derived once at the end.
"""

from __future__ import annotations

import torch

from slimquant.quant.qweight import qrange


class MinMax:
    def __init__(self, per_channel: bool = False):
        self.per_channel = per_channel
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        lo, hi = (x.amin(0), x.amax(0)) if self.per_channel else (x.min(), x.max())
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)

    def merge(self, other: MinMax) -> None:
        if other.min is not None:
            self.update_range(other.min, other.max)

    def update_range(self, lo, hi) -> None:
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)


class Histogram:
    """Per-tensor histogram over a range that widens as batches arrive (old counts are re-binned)."""

    def __init__(self, bins: int = 2048):
        self.bins = bins
        self.lo = self.hi = None
        self.counts: torch.Tensor | None = None

    def _centers(self) -> torch.Tensor:
        width = (self.hi - self.lo) / self.bins
        return self.lo + width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).double().cpu()
        self._widen(float(x.min()), float(x.max()))
        self._add(x, None)

    def merge(self, other: Histogram) -> None:
        if other.counts is not None:
            self._widen(other.lo, other.hi)
            self._add(other._centers(), other.counts)

    def _widen(self, lo: float, hi: float) -> None:
        if self.counts is None:
            self.lo, self.hi = lo, max(hi, lo + 1e-8)
            self.counts = torch.zeros(self.bins, dtype=torch.float64)
        elif lo < self.lo or hi > self.hi:
            centers, counts = self._centers(), self.counts
            self.lo, self.hi = min(lo, self.lo), max(hi, self.hi)
            self.counts = torch.zeros(self.bins, dtype=torch.float64)
            self._add(centers, counts)

    def _add(self, values: torch.Tensor, weights: torch.Tensor | None) -> None:
        idx = ((values - self.lo) / (self.hi - self.lo) * self.bins).long().clamp_(0, self.bins - 1)
        self.counts += torch.bincount(idx, weights=weights, minlength=self.bins).double()

    def search_range(self, bits: int, symmetric: bool, grid: int = 64, min_fraction: float = 0.05
                     ) -> tuple[float, float]:
        """The clipping range minimising expected quantization MSE over the histogram.

        Inside the range each value costs the rounding noise step^2/12; outside it costs its squared
        distance to the nearest end. Candidates shrink each end towards zero geometrically.
        """
        centers, counts = self._centers(), self.counts
        lo_q, hi_q = qrange(bits)
        levels = hi_q - lo_q
        fractions = torch.logspace(0, torch.log10(torch.tensor(min_fraction)), grid, dtype=torch.float64)
        if symmetric:
            m = max(abs(self.lo), abs(self.hi))
            lows, highs = -m * fractions, m * fractions
        else:
            f_lo, f_hi = torch.meshgrid(fractions, fractions, indexing="ij")
            lows = (self.lo * f_lo).reshape(-1) if self.lo < 0 else torch.full((grid * grid,), self.lo)
            highs = (self.hi * f_hi).reshape(-1) if self.hi > 0 else torch.full((grid * grid,), self.hi)
        lows, highs = lows[:, None], highs[:, None]
        step = (highs - lows) / levels
        below = (centers < lows) * (centers - lows).pow(2)
        above = (centers > highs) * (centers - highs).pow(2)
        inside = ((centers >= lows) & (centers <= highs)) * step.pow(2) / 12
        cost = ((below + above + inside) * counts).sum(1)
        best = int(cost.argmin())
        return float(lows[best]), float(highs[best])


class TokenSample:
    """A bounded random sample of input rows, for judging candidate ranges by the Linear's output error."""

    def __init__(self, capacity: int = 2048, seed: int = 0):
        self.capacity = capacity
        self.rows: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        rows = x if self.rows is None else torch.cat([self.rows, x])
        if rows.shape[0] > self.capacity:
            keep = torch.randperm(rows.shape[0], generator=self.generator)[: self.capacity]
            rows = rows[keep.to(rows.device)]
        self.rows = rows
