"""Shared test inputs: correlated calibration inputs, their Hessian, and a Linear's output error."""

import torch

from slimquant.quant.hessian import HessianAccumulator


def correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features ** 0.5 + torch.eye(features)
    scales = torch.rand(features, generator=g) * 3 + 0.1
    return (torch.randn(tokens, features, generator=g) @ mix) * scales


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    return acc.hessian


def output_error(x: torch.Tensor, w: torch.Tensor, qweight) -> float:
    return float((x @ (qweight.dequantize() - w).t()).square().sum())


def random_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05
