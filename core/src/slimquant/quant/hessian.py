"""The input Hessian H = 2/n * sum_t x_t x_t^T of a Linear, accumulated batch by batch (GPTQ, SparseGPT)."""

from __future__ import annotations

import torch


class HessianAccumulator:
    """A running mean, so H keeps the same scale however many tokens arrive; float32 unless told otherwise."""

    def __init__(self, in_features: int, device=None, dtype: torch.dtype = torch.float32):
        self.hessian = torch.zeros(in_features, in_features, device=device, dtype=dtype)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.hessian.dtype)
        new = x.shape[0]
        if new == 0:
            return
        self.hessian.mul_(self.tokens / (self.tokens + new))
        self.tokens += new
        x = x * (2.0 / self.tokens) ** 0.5
        self.hessian.addmm_(x.t(), x)
