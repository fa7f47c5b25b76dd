"""Which weights to prune, given a saliency per weight (lowest first): True marks a pruned weight."""

from __future__ import annotations

import torch


def lowest_fraction(saliency: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The int(numel * sparsity) weights of lowest saliency over the whole tensor (unstructured)."""
    mask = torch.zeros(saliency.shape, dtype=torch.bool, device=saliency.device)
    count = int(saliency.numel() * sparsity)
    if count:
        mask.view(-1)[torch.topk(saliency.reshape(-1), count, largest=False).indices] = True
    return mask


def lowest_per_group(saliency: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M: in each row, the m - n weights of lowest saliency among every m consecutive columns."""
    rows, cols = saliency.shape
    grouped = saliency.reshape(rows, cols // m, m)
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    mask.scatter_(-1, torch.topk(grouped, m - n, dim=-1, largest=False).indices, True)
    return mask.view(rows, cols)


def prune_mask(saliency: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None) -> torch.Tensor:
    return lowest_fraction(saliency, sparsity) if n_m is None else lowest_per_group(saliency, *n_m)
