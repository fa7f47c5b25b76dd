"""Outliers (SpQR-style, msModelSlim's fraction / sigma_factor): the weights kept out of pruning and quantization.

A weight is a candidate when it lies more than sigma_factor standard deviations from the mean of its output row
(rows are what per-channel and per-group scales adapt to, so a row's own spread is the yardstick). At most
`fraction` of the Linear's weights are kept, the farthest (in row standard deviations) first; with an N:M pattern
at most N per M consecutive columns of a row, so that they fit the pattern's kept slots.
"""

from __future__ import annotations

import torch

from slimquant.sdk import WeightOutliers

VALUE_DTYPE = torch.float16


def select_outliers(w: torch.Tensor, fraction: float, sigma_factor: float,
                    n_m: tuple[int, int] | None = None) -> torch.Tensor:
    """Boolean [out, in] mask of the outliers of `w` (all False when fraction is 0)."""
    mask = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    budget = int(fraction * w.numel())
    if budget == 0:
        return mask
    mean, std = w.mean(dim=1, keepdim=True), w.std(dim=1, keepdim=True).clamp_min(1e-12)
    score = (w - mean).abs() / std
    score = torch.where(score > sigma_factor, score, torch.zeros_like(score))
    if n_m is not None:  # keep the n largest of each group of m
        n, m = n_m
        grouped = score.view(w.shape[0], -1, m)
        kept = torch.zeros_like(grouped).scatter_(-1, torch.topk(grouped, n, dim=-1).indices, 1.0)
        score = (grouped * kept).view(w.shape)
    count = min(budget, int((score > 0).sum()))
    if count:
        mask.view(-1)[torch.topk(score.reshape(-1), count).indices] = True
    return mask


def take_outliers(w: torch.Tensor, mask: torch.Tensor) -> WeightOutliers | None:
    """The masked weights as 16-bit values at flat positions (None when there are none)."""
    if not mask.any():
        return None
    index = torch.nonzero(mask.reshape(-1)).reshape(-1)
    return WeightOutliers(index.to(torch.int64), w.reshape(-1)[index].to(VALUE_DTYPE))
