"""SparseGPT (Frantar & Alistarh, 2023) fused with quantization: one column sweep prunes and rounds each weight.

With U the upper Cholesky factor of the damped H^-1, columns are taken in blocks. In a block, the weights of lowest
OBS saliency w^2 / U[j, j]^2 are pruned: for unstructured sparsity the int(sparsity * size) lowest of the whole block
(all rows), chosen when the block starts; for N:M the M - N lowest of each row in every M columns, chosen when those
M columns start. Each column is then rounded onto the uniform grid, its pruned weights set to the zero point (so
they dequantize to exactly 0), and the error (w - dequantized) / U[j, j] is propagated along U's row: at once
inside the block, lazily beyond it. Group scales are taken when a group starts, from the weights as the sweep has
updated them (as GPTQ does); per-channel or per-tensor scales once, before the sweep.

Outliers (`slimquant_sparse.outliers`) are taken out first: their weights are set to 0 in the matrix the sweep
prunes and rounds, and they fill kept slots of the mask (they never count as pruned), but their dense value stays
0: only the updates that reach their positions are propagated as error, never the outliers themselves.
"""

from __future__ import annotations

import torch

from slimquant.sdk import (
    QuantizedWeight,
    drop_dead_inputs,
    effective_group_size,
    inverse_hessian_factor,
    num_groups,
    weight_qparams,
)
from slimquant_sparse.masks import lowest_fraction, lowest_per_group
from slimquant_sparse.outliers import select_outliers, take_outliers
from slimquant_sparse.settings import SparseSettings
from slimquant_sparse.uniform import dequantize, round_codes, sparse_weight, static_qparams


def _saliency(block: torch.Tensor, diag: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """w^2 / U[j, j]^2 of a transposed block [columns, rows]; outliers never pruned."""
    saliency = block.square() / diag.square().unsqueeze(1)
    return saliency.masked_fill_(held, float("inf"))


@torch.no_grad()
def sparsegpt_quantize(weight: torch.Tensor, hessian: torch.Tensor, s: SparseSettings,
                       name: str = "") -> QuantizedWeight:
    h, w = drop_dead_inputs(hessian.float(), weight.detach().float())
    rows, cols = w.shape
    held = select_outliers(w, s.fraction, s.sigma_factor, s.n_m)
    outliers = take_outliers(w, held)
    w[held] = 0
    size = effective_group_size(s.group_size, cols)
    if s.group_size is not None:  # filled in as the sweep reaches each group
        scale_t = w.new_empty(num_groups(cols, size), rows)
        zero_t = None if s.symmetric else torch.empty_like(scale_t)
    else:
        scale, zero = static_qparams(w, s)
        scale_t, zero_t = scale.t().contiguous(), None if zero is None else zero.t().contiguous()

    u = inverse_hessian_factor(h, s.percdamp, name)
    n_m = s.n_m
    blocksize = s.blocksize if n_m is None else max(s.blocksize - s.blocksize % n_m[1], n_m[1])
    # The sweep runs on W transposed: a column of W is a contiguous row here.
    wt, held_t = w.t().contiguous(), held.t().contiguous()
    codes_t = torch.empty_like(wt)
    for b1 in range(0, cols, blocksize):
        b2 = min(b1 + blocksize, cols)
        block, u_block, held_block = wt[b1:b2].clone(), u[b1:b2, b1:b2], held_t[b1:b2]
        diag = torch.diagonal(u_block)
        errors = torch.zeros_like(block)
        pruned = torch.zeros_like(held_block)
        if n_m is None and s.sparsity > 0:
            pruned = lowest_fraction(_saliency(block, diag, held_block), s.sparsity)
        for i in range(b2 - b1):
            col = b1 + i
            if n_m is not None and i % n_m[1] == 0:
                j = i + n_m[1]
                saliency = _saliency(block[i:j], diag[i:j], held_block[i:j])
                pruned[i:j] = lowest_per_group(saliency.t(), *n_m).t()
            if s.group_size is not None and col % size == 0:  # a group starts: its range as updated so far
                end = min(col + size, cols)
                ahead = wt[b2:end] - u[b1:col, b2:end].t() @ errors[:i]
                sc, z = weight_qparams(torch.cat([block[i:i + size], ahead]).t(), s.bits, s.symmetric, None,
                                      signed=s.signed)
                scale_t[col // size] = sc[:, 0]
                if zero_t is not None:
                    zero_t[col // size] = z[:, 0]
            g = col // size
            sc, z = scale_t[g], None if zero_t is None else zero_t[g]
            x = block[i]
            q = round_codes(x, sc, z, s.bits, pruned[i] | held_block[i])
            codes_t[col] = q
            err = (x - dequantize(q, sc, z)) / diag[i]
            block[i + 1:].addr_(u_block[i, i + 1:], err, alpha=-1)
            errors[i] = err
        wt[b2:] -= u[b1:b2, b2:].t() @ errors

    zero = None if zero_t is None else zero_t.t()
    return sparse_weight(codes_t.t(), scale_t.t(), zero, s, outliers)
