"""GPTQ (Frantar et al., 2022) as a pure function on tensors: the column sweep in blocks.

Each column is rounded in turn; its rounding error, divided by the matching diagonal entry of U (the upper
Cholesky factor of H^-1), is subtracted from the columns still to come along U's row: at once inside the
block, lazily for the columns beyond it when the block ends. Columns may be taken in order of decreasing
H[i, i] (act_order); the codes returned are always in the original column order.

Group scales come either from the weights as the sweep leaves them when the group starts (the default,
as in the reference code: with act_order the groups follow the sweep order, hence a g_idx), or once from
the un-updated weights before the sweep (static_groups, and always per channel): contiguous groups.

On a weight grid (`slimquant.quant.grid`, e.g. NF4's codebook) the grid chooses each group's scale and rounds each
column onto its values; scales the grid stores quantized (double quantization) are rounded once all are known,
the codes kept. Without one, the uniform grid's rounding runs in place, as fast as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimquant.sdk import (
    QuantizedWeight,
    WeightGrid,
    contiguous_g_idx,
    drop_dead_inputs,
    effective_group_size,
    inverse_hessian_factor,
    num_groups,
    qrange,
    search_clip_ratio,
    weight_qparams,
)


@dataclass(frozen=True)
class GPTQSettings:
    bits: int = 4
    symmetric: bool = False
    group_size: int | None = None  # None: per output channel
    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    mse: bool = False  # grid-search each group's clipping range instead of taking its min-max
    signed: bool = True  # symmetric scales: see slimquant.quant.math.weight_range_to_qparams


def group_qparams(w: torch.Tensor, s: GPTQSettings, group_size: int | None, grid: WeightGrid | None = None):
    """Scale and zero [rows, groups] of `w`: min-max (or the grid's), or with the range shrink of least rounding
    error (mse)."""
    ratio = search_clip_ratio(w, s.bits, s.symmetric, group_size, weight_grid=grid, signed=s.signed) if s.mse else 1.0
    if grid is not None:
        return grid.qparams(w, group_size, clip_ratio=ratio)
    return weight_qparams(w, s.bits, s.symmetric, group_size, clip_ratio=ratio, signed=s.signed)


def _round_column(grid: WeightGrid | None, x, sc, z, q, err, lo: int, hi: int) -> None:
    """Codes of column x into q, and the dequantized column minus x into err, in place."""
    if grid is not None:
        q.copy_(grid.quantize(x, sc, z))
        torch.sub(grid.dequantize(q, sc, z), x, out=err)
        return
    torch.div(x, sc, out=q)  # quantize and dequantize in place: this loop runs once per column
    if z is not None:
        q.add_(z).round_().clamp_(lo, hi)  # the zero point added before rounding, as slimquant.quant.math.quantize
        torch.sub(q, z, out=err)
    else:
        q.round_().clamp_(lo, hi)
        err.copy_(q)
    err.mul_(sc).sub_(x)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, s: GPTQSettings, name: str = "",
                  grid: WeightGrid | None = None) -> QuantizedWeight:
    h, w = drop_dead_inputs(hessian.float(), weight.detach().float())
    rows, cols = w.shape
    size = effective_group_size(s.group_size, cols)
    dynamic = s.group_size is not None and not s.static_groups
    if dynamic:  # filled in during the sweep, group by group
        scale_t = w.new_empty(num_groups(cols, size), rows)
        symmetric = s.symmetric if grid is None else grid.symmetric
        zero_t = None if symmetric else w.new_empty(scale_t.shape)
        stored = None
    else:
        scale, zero = group_qparams(w, s, s.group_size, grid)
        stored = grid.quantize_scales(scale) if grid is not None else None
        scale = scale if stored is None else stored.dequantize()
        scale_t, zero_t = scale.t().contiguous(), None if zero is None else zero.t().contiguous()

    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if s.act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    positions = torch.arange(cols, device=w.device)
    # the group of the column quantized at each sweep position
    group_of = (positions // size if dynamic or perm is None else perm // size).tolist()

    u = inverse_hessian_factor(h, s.damp_percent, name)
    inv_diag = (1.0 / torch.diagonal(u)).tolist()
    lo, hi = qrange(s.bits)
    # The sweep runs on W transposed: a column of W is a contiguous row here, which CPUs update far faster.
    wt = w.t().contiguous()
    codes_t = torch.empty_like(wt)
    for b1 in range(0, cols, s.block_size):
        b2 = min(b1 + s.block_size, cols)
        block, u_block = wt[b1:b2].clone(), u[b1:b2, b1:b2]
        errors = torch.zeros_like(block)
        for i in range(b2 - b1):
            col, g = b1 + i, group_of[b1 + i]
            if dynamic and col % size == 0:  # a group starts: its range as the sweep has updated it so far
                end = min(col + size, cols)
                ahead = wt[b2:end] - u[b1:b1 + i, b2:end].t() @ errors[:i]  # lazy updates owed so far
                sc, z = group_qparams(torch.cat([block[i:i + size], ahead]).t(), s, None, grid)
                scale_t[g] = sc[:, 0]
                if zero_t is not None:
                    zero_t[g] = z[:, 0]
            sc, z = scale_t[g], None if zero_t is None else zero_t[g]
            x, q, err = block[i], codes_t[col], errors[i]
            _round_column(grid, x, sc, z, q, err, lo, hi)
            err.mul_(-inv_diag[b1 + i])  # (x - dequantized) / U[i, i]
            block[i + 1:].addr_(u_block[i, i + 1:], err, alpha=-1)
        wt[b2:] -= u[b1:b2, b2:].t() @ errors

    codes = codes_t.t()
    scale = scale_t.t().contiguous()
    zero = None if zero_t is None else zero_t.t().contiguous()
    g_idx = None
    if perm is not None:
        inverse = torch.argsort(perm)
        codes = codes[:, inverse]
        if dynamic:
            g_idx = (positions // size)[inverse].to(torch.int32)
            if torch.equal(g_idx, contiguous_g_idx(cols, size, w.device)):
                g_idx = None
    if grid is None:
        return QuantizedWeight(codes=codes.to(torch.int8).contiguous(), scale=scale.float(), zero=zero, bits=s.bits,
                               group_size=s.group_size, g_idx=g_idx)
    if dynamic:  # the sweep chose the scales group by group: the grid stores them now, the codes stay
        stored = grid.quantize_scales(scale)
        scale = scale if stored is None else stored.dequantize()
    return grid.quantized_weight(codes.contiguous(), scale, zero, s.group_size, g_idx, stored)
