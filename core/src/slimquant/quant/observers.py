"""Activation statistics that accumulate batch by batch: running min/max, a growing histogram, a token sample.

Update apart from compute: `update()` is cheap and called per batch; ranges are derived once at the end.
"""

from __future__ import annotations

import torch

from slimquant.quant.qweight import qrange
from slimquant.stats import Reduce, Statistic


class MinMax(Statistic):
    reductions = {"min": Reduce.MIN, "max": Reduce.MAX}

    def __init__(self, per_channel: bool = False):
        self.per_channel = per_channel
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        lo, hi = (x.amin(0), x.amax(0)) if self.per_channel else (x.min(), x.max())
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)

    def update_range(self, lo, hi) -> None:
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)


class Histogram(Statistic):
    """Per-tensor histogram over a range that widens as batches arrive (old counts are re-binned)."""

    reductions = {"counts": Reduce.MERGE}

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

    def search_range(self, bits: int, symmetric: bool, grid: int = 128, min_fraction: float = 0.02
                     ) -> tuple[float, float]:
        """The clipping range minimising expected quantization MSE over the histogram.

        Inside the range each value costs the rounding noise step^2/12; outside it costs its squared
        distance to the nearest end. Candidate ends shrink towards zero geometrically; the cost of every
        (low, high) pair comes from prefix sums, so the search is O(grid * (grid + log bins)).
        """
        centers, counts = self._centers(), self.counts
        lo_q, hi_q = qrange(bits)
        fractions = torch.logspace(0, torch.log10(torch.tensor(min_fraction)), grid, dtype=torch.float64)
        if symmetric:
            m = max(abs(self.lo), abs(self.hi))
            lows, highs = -m * fractions, m * fractions
        else:
            lows = self.lo * fractions if self.lo < 0 else torch.full((grid,), self.lo, dtype=torch.float64)
            highs = self.hi * fractions if self.hi > 0 else torch.full((grid,), self.hi, dtype=torch.float64)
        zero = torch.zeros(1, dtype=torch.float64)
        n0 = torch.cat([zero, counts.cumsum(0)])  # n0[i] = count of bins [0, i)
        n1 = torch.cat([zero, (counts * centers).cumsum(0)])
        n2 = torch.cat([zero, (counts * centers * centers).cumsum(0)])
        below_i = torch.searchsorted(centers, lows)  # bins strictly left of each low end
        above_i = torch.searchsorted(centers, highs, right=True)  # first bin right of each high end
        total = (n0[-1], n1[-1], n2[-1])
        # sum over clipped bins of n * (c - end)^2 = S2 - 2 end S1 + end^2 S0
        cost_low = n2[below_i] - 2 * lows * n1[below_i] + lows.pow(2) * n0[below_i]
        s0 = total[0] - n0[above_i]
        cost_high = (total[2] - n2[above_i]) - 2 * highs * (total[1] - n1[above_i]) + highs.pow(2) * s0
        inside = total[0] - n0[below_i][:, None] - s0[None, :]
        step = (highs[None, :] - lows[:, None]) / (hi_q - lo_q)
        cost = cost_low[:, None] + cost_high[None, :] + inside.clamp_min(0) * step.pow(2) / 12
        if symmetric:
            cost = cost.diagonal()
            best = int(cost.argmin())
            return float(lows[best]), float(highs[best])
        best = int(cost.argmin())
        return float(lows[best // grid]), float(highs[best % grid])


class TokenSample(Statistic):
    """A uniform random sample (a reservoir) of at most `capacity` input rows, for judging candidate ranges by the
    Linear's output error. Its buffer is allocated once, however many rows stream past. Copies from several
    processes concatenate (`merge` keeps a uniform sample of capacity rows of the union)."""

    reductions = {"_buffer": Reduce.CONCAT}

    def __init__(self, capacity: int = 2048, seed: int = 0):
        self.capacity = capacity
        self.seen = 0
        self._buffer: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def rows(self) -> torch.Tensor | None:
        return None if self._buffer is None else self._buffer[: min(self.seen, self.capacity)]

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if self._buffer is None:
            self._buffer = x.new_empty(self.capacity, x.shape[-1])
        free = max(0, min(self.capacity - self.seen, x.shape[0]))
        self._buffer[self.seen:self.seen + free] = x[:free]
        rest = x[free:]
        if rest.shape[0]:  # the t-th row seen (from 0) takes a random slot with probability capacity / (t + 1)
            t = torch.arange(self.seen + free, self.seen + x.shape[0], dtype=torch.float64)
            slots = (torch.rand(rest.shape[0], generator=self.generator, dtype=torch.float64) * (t + 1)).long()
            taken = slots < self.capacity
            self._buffer[slots[taken].to(x.device)] = rest[taken.to(x.device)]
        self.seen += x.shape[0]

    def merge(self, other: TokenSample) -> None:
        if other.rows is None:
            return
        mine, theirs = self.rows, other.rows
        rows = theirs if mine is None else torch.cat([mine, theirs.to(mine.device)])
        seen = self.seen + other.seen
        if rows.shape[0] > self.capacity:  # rows stand for seen tokens in proportion: sample them evenly
            keep = torch.randperm(rows.shape[0], generator=self.generator)[: self.capacity]
            rows = rows[keep.sort().values.to(rows.device)]
        self._buffer = rows.clone()
        self.seen = seen if seen <= self.capacity else max(seen, rows.shape[0])
