"""The baseline SparseGPT is measured against: prune the smallest |w|, then round the rest to nearest."""

from __future__ import annotations

import torch

from slimquant.sdk import QuantizedWeight, contiguous_g_idx, expand_groups
from slimquant_sparse.masks import prune_mask
from slimquant_sparse.outliers import select_outliers, take_outliers
from slimquant_sparse.settings import SparseSettings
from slimquant_sparse.uniform import round_codes, sparse_weight, static_qparams


@torch.no_grad()
def magnitude_prune_quantize(weight: torch.Tensor, s: SparseSettings) -> QuantizedWeight:
    """Unstructured: the int(sparsity * numel) smallest |w| of the whole Linear; N:M: the M - N smallest of each row
    in every M columns. Outliers are taken out first (as in SparseGPT) and fill kept slots."""
    w = weight.detach().float().clone()
    held = select_outliers(w, s.fraction, s.sigma_factor, s.n_m)
    outliers = take_outliers(w, held)
    w[held] = 0
    pruned = torch.zeros_like(held)
    if s.prunes:
        pruned = prune_mask(w.abs().masked_fill(held, float("inf")), s.sparsity, s.n_m)
    w[pruned] = 0
    scale, zero = static_qparams(w, s)
    idx = contiguous_g_idx(w.shape[1], s.group_size if not s.per_tensor else None, w.device)
    codes = round_codes(w, expand_groups(scale, idx), expand_groups(zero, idx), s.bits, pruned | held)
    return sparse_weight(codes, scale, zero, s, outliers)
