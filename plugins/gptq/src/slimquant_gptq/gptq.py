"""GPTQ as pure functions on tensors: a damped inverse-Hessian factor, then a column sweep in blocks.

Each column is rounded in turn; its rounding error, divided by the matching diagonal entry of the upper
Cholesky factor U of H^-1, is subtracted from the columns still to come along U's row (within the block at
once, beyond it lazily when the block ends). Columns may be taken in order of decreasing H[i, i]
(act_order); the codes returned are always in the original column order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from slimquant.quant.math import quantize, range_to_qparams, search_clip_ratio
from slimquant.quant.qweight import QuantizedWeight, contiguous_g_idx, num_groups

log = logging.getLogger(__name__)
MAX_DAMP_TRIES = 6


@dataclass(frozen=True)
class GPTQSettings:
    bits: int = 4
    symmetric: bool = False
    group_size: int | None = None
    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    mse: bool = False


def inverse_hessian_factor(hessian: torch.Tensor, damp_percent: float, name: str = "") -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1; damping grows tenfold until H is positive definite."""
    diag_mean = torch.diagonal(hessian).mean().clamp_min(1e-8)
    damp = damp_percent
    eye = torch.eye(hessian.shape[0], device=hessian.device, dtype=hessian.dtype)
    for attempt in range(MAX_DAMP_TRIES):
        chol, info = torch.linalg.cholesky_ex(hessian + damp * diag_mean * eye)
        if info == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if info == 0:
                if attempt:
                    log.info("%s: Hessian repaired with damping %.3g x mean(diag)", name, damp)
                return upper
        damp *= 10
    log.warning("%s: Hessian stays singular up to damping %.3g; using float64", name, damp)
    h64 = hessian.double() + damp * float(diag_mean) * eye.double()
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h64)), upper=True).to(hessian.dtype)


def _qparams(w: torch.Tensor, s: GPTQSettings) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero ([rows, 1]) for the columns `w`, min-max or MSE-searched."""
    ratio = search_clip_ratio(w, s.bits, s.symmetric, None) if s.mse else 1.0
    lo, hi = w.amin(1, keepdim=True) * ratio, w.amax(1, keepdim=True) * ratio
    return range_to_qparams(lo, hi, s.bits, s.symmetric)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, s: GPTQSettings, name: str = "") -> QuantizedWeight:
    rows, cols = weight.shape
    w = weight.detach().float().clone()
    h = hessian.float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    groups = num_groups(cols, s.group_size)
    size = s.group_size or cols
    scale = torch.empty(rows, groups, device=w.device)
    zero = None if s.symmetric else torch.empty(rows, groups, device=w.device)
    if s.static_groups or not s.group_size:  # fixed before the sweep from the un-updated weights
        for g in range(groups):
            sc, z = _qparams(w[:, g * size:(g + 1) * size], s)
            scale[:, g:g + 1] = sc
            if zero is not None:
                zero[:, g:g + 1] = z

    perm = torch.argsort(torch.diagonal(h), descending=True) if s.act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    original = perm if perm is not None else torch.arange(cols, device=w.device)
    # group of each (permuted) position: static or per-channel groups follow the original column
    dynamic_groups = s.group_size is not None and not s.static_groups
    group_of = (torch.arange(cols, device=w.device) // size) if dynamic_groups else (original // size)

    u = inverse_hessian_factor(h, s.damp_percent, name)
    codes = torch.empty(rows, cols, device=w.device)
    for b1 in range(0, cols, s.block_size):
        b2 = min(b1 + s.block_size, cols)
        block = w[:, b1:b2].clone()
        errors = torch.empty_like(block)
        u_block = u[b1:b2, b1:b2]
        for i in range(b2 - b1):
            col = b1 + i
            g = int(group_of[col])
            if dynamic_groups and col % size == 0:  # a new group starts: range of the columns as updated so far
                ahead = torch.cat([block[:, i:], w[:, b2:]], dim=1)[:, :size]
                sc, z = _qparams(ahead, s)
                scale[:, g:g + 1] = sc
                if zero is not None:
                    zero[:, g:g + 1] = z
            sc, z = scale[:, g:g + 1], None if zero is None else zero[:, g:g + 1]
            q = quantize(block[:, i:i + 1], sc, z, s.bits)
            codes[:, col:col + 1] = q
            dq = (q - z) * sc if z is not None else q * sc
            err = (block[:, i:i + 1] - dq) / u_block[i, i]
            block[:, i:] -= err @ u_block[i:i + 1, i:]
            errors[:, i:i + 1] = err
        w[:, b2:] -= errors @ u[b1:b2, b2:]

    g_idx = None
    if perm is not None:
        inverse = torch.argsort(perm)
        codes = codes[:, inverse]
        if dynamic_groups:
            g_idx = group_of[inverse].to(torch.int32)
    if g_idx is not None and torch.equal(g_idx, contiguous_g_idx(cols, s.group_size, w.device)):
        g_idx = None
    return QuantizedWeight(codes=codes.to(torch.int8), scale=scale, zero=zero, bits=s.bits,
                           group_size=s.group_size, g_idx=g_idx)
