"""Running min-max of keys and values per (kv head, head_dim channel), and the cache scales they give."""

from __future__ import annotations

import torch

from slimquant.quant.math import range_to_qparams
from slimquant.stats import Reduce, Statistic


class CacheRange(Statistic):
    """Elementwise min and max over batches and tokens, [kv_heads, head_dim], of keys and of values."""

    reductions = {"key_min": Reduce.MIN, "key_max": Reduce.MAX, "value_min": Reduce.MIN, "value_max": Reduce.MAX}

    def __init__(self):
        self.key_min = self.key_max = self.value_min = self.value_max = None

    def add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        other = CacheRange()
        other.key_min, other.key_max = _channel_range(keys)
        other.value_min, other.value_max = _channel_range(values)
        self.merge(other)


def _channel_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.detach().float().transpose(0, 1).reshape(x.shape[1], -1, x.shape[3])  # [heads, batch * seq, dim]
    return flat.amin(dim=1), flat.amax(dim=1)


def spread(xmin: torch.Tensor, xmax: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The [kv_heads, head_dim] ranges widened to what one scale spans: a head, the tensor, or one channel."""
    if strategy == "head":
        return xmin.amin(dim=1, keepdim=True).expand_as(xmin), xmax.amax(dim=1, keepdim=True).expand_as(xmax)
    if strategy == "tensor":
        return xmin.amin().expand_as(xmin), xmax.amax().expand_as(xmax)
    return xmin, xmax


def cache_qparams(xmin: torch.Tensor, xmax: torch.Tensor, strategy: str, bits: int,
                  symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    lo, hi = spread(xmin, xmax, strategy)
    scale, zero = range_to_qparams(lo.contiguous(), hi.contiguous(), bits, symmetric)
    return scale.float().contiguous(), None if zero is None else zero.float().contiguous()
