"""Half-quadratic quantization (Badri & Shaji, 2023): per group, the zero point that minimises the lp error
sum |W - dequant(quant(W))|^p (p < 1, robust to outliers), found by alternating two easy problems.

With a splitting variable W_e for the error, each iteration
  1. rounds:          W_q = clamp(round(W / s + z)),  W_r = (W_q - z) * s
  2. shrinks (prox):  W_e = sign(d) * relu(|d| - |d|^(p-1) / beta),  d = W - W_r   (the lp proximal step)
  3. solves for z:    z = mean(W_q - (W - W_e) / s)   over the group (closed form), which is
                      z - mean(d - W_e) / s  with  d - W_e = clamp(d, -|d|^(p-1)/beta, |d|^(p-1)/beta)
  4. beta *= kappa
and optionally (optimize_scale) refits the step s by least squares, s = <W_q - z, W - W_e> / |W_q - z|^2.
The zero point may be fractional. As in the reference implementation (hqq 0.2.8) the loop stops once the mean
absolute error of the current step stops improving (`early_stop`) and the zero point of the last update is kept;
beyond it, a weight whose lp error came out above round-to-nearest's falls back to round-to-nearest, so the result
is never worse than rounding in lp error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimquant.sdk import QuantizedWeight, effective_group_size, num_groups, qrange, weight_qparams

MAX_INVERSE_STEP = 2e4  # 1 / s is capped, as a group of identical weights has no range


@dataclass(frozen=True)
class HQQSettings:
    bits: int = 4
    group_size: int | None = 64  # None: per output channel
    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    early_stop: bool = True
    optimize_scale: bool = False
    round_zero: bool = True  # start from a rounded zero point (HQQLinear does at 4 bits); the solver's stays fractional


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return torch.round(w / scale[:, None] + zero[:, None]).clamp_(lo, hi)


def _lp_error(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, p: float,
              mask: torch.Tensor | None) -> float:
    """sum |W - (codes - zero) * scale|^p over the weight (masked columns left out)."""
    err = (codes - zero[:, None]).mul_(scale[:, None]).sub_(w).abs_().pow_(p)
    return float((err if mask is None else err.mul_(mask)).sum())


def _grouped(w: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[rows * groups, size]: one group per row; a shorter last group is padded with a copy of its first column
    (which changes no min or max) and masked out of every sum."""
    rows, cols = w.shape
    groups = num_groups(cols, size)
    pad = groups * size - cols
    if not pad:
        return w.reshape(rows * groups, size), None
    first = (groups - 1) * size
    w = torch.cat([w, w[:, first:first + 1].expand(rows, pad)], dim=1)
    mask = torch.ones(groups * size, device=w.device)
    mask[cols:] = 0
    return w.reshape(rows * groups, size), mask.view(groups, size).repeat(rows, 1)


def _no_shrink_below(beta: float, p: float) -> float:
    """The lp proximal step leaves an error d alone (w_e = 0) when |d| <= |d|^(p-1) / beta, i.e. below this bound;
    typical rounding errors are far below it, so the costly power is only taken when some error exceeds it."""
    return beta ** (-1.0 / (2.0 - p))


def _error_bound(step, zero, inverse, wmin, wmax, lo: int, hi: int) -> float:
    """An upper bound of |W - W_r| over groups, from per-group numbers only: half a step, or more where the
    group's extreme weights fall outside the code range and are clamped."""
    over = torch.maximum(lo - torch.addcmul(zero, wmin, inverse), torch.addcmul(zero, wmax, inverse) - hi)
    return float((step * over.clamp_min(0.5)).max())


def _coupled_error(d: torch.Tensor, beta: float, p: float, bound: float) -> torch.Tensor:
    """d - W_e, with W_e = sign(d) * relu(|d| - |d|^(p-1) / beta) the shrunk error: d clamped to +-|d|^(p-1)/beta.
    `bound` is at least max |d|."""
    if bound <= _no_shrink_below(beta, p):
        return d
    threshold = d.abs().clamp_min_(1e-8).pow_(p - 1).div_(beta)
    return torch.clamp(d, min=threshold.neg(), max=threshold)


@torch.no_grad()
def _solve(w, mask, count, inverse, zero, s: HQQSettings, lo: int, hi: int, wmin, wmax):
    """The half-quadratic iterations; returns (step, zero). Each iteration walks the groups in chunks of rows that
    stay in cache, so a weight is read from memory about once per iteration instead of once per operation."""
    step = 1.0 / inverse
    beta, best_mean = s.beta, float("inf")
    numel = w.shape[0] * w.shape[1] if mask is None else float(mask.sum())
    for _ in range(s.iters):
        new_zero, new_step, total_abs = torch.empty_like(zero), step.clone(), 0.0
        for rows in _chunks(w.shape[0], w.shape[1]):
            wc, inv, z = w[rows], inverse[rows, None], zero[rows, None]
            u = torch.addcmul(z, wc, inv)
            e = u.sub_(u.round().clamp_(lo, hi))  # (W - W_r) / s, W_r the dequantized weight
            bound = _error_bound(step[rows], zero[rows], inverse[rows], wmin[rows], wmax[rows], lo, hi)
            if not s.optimize_scale and bound <= _no_shrink_below(beta, s.lp_norm):
                # nothing is shrunk: d - W_e = d = e * s, and s is one number per group, so sum before scaling
                if mask is not None:
                    e.mul_(mask[rows])
                coupled_sum = e.sum(1).mul_(step[rows])
                new_zero[rows] = zero[rows] - inverse[rows] * (coupled_sum / (count if mask is None else count[rows]))
                total_abs += float(e.abs_().sum(1).mul_(step[rows]).sum())
                continue
            d = e.mul_(step[rows, None])  # W - W_r
            coupled = _coupled_error(d, beta, s.lp_norm, bound)
            if mask is not None:
                coupled = coupled * mask[rows]
            z_new = zero[rows] - inverse[rows] * (coupled.sum(1) / (count if mask is None else count[rows]))
            new_zero[rows] = z_new
            if s.optimize_scale:
                centred = torch.addcmul(z_new[:, None], wc, inv).round_().clamp_(lo, hi).sub_(z_new[:, None])
                if mask is not None:
                    centred.mul_(mask[rows])
                target = wc - d + coupled  # W - W_e
                fitted = (centred * target).sum(1) / centred.pow(2).sum(1).clamp_min(1e-12)
                new_step[rows] = fitted.clamp_min(1.0 / MAX_INVERSE_STEP)
            magnitude = d.abs_()
            total_abs += float((magnitude if mask is None else magnitude.mul_(mask[rows])).sum())
        zero = new_zero
        if s.optimize_scale:
            step, inverse = new_step, 1.0 / new_step
        beta *= s.kappa
        mean_abs = total_abs / numel
        if mean_abs < best_mean:
            best_mean = mean_abs
        elif s.early_stop:
            break
    return step, zero


CHUNK_ELEMENTS = 1 << 17  # 512 KiB of float32 per operand: the working set of one chunk fits a core's L2


def _chunks(rows: int, cols: int) -> list[slice]:
    per = max(1, CHUNK_ELEMENTS // cols)
    return [slice(a, min(rows, a + per)) for a in range(0, rows, per)]


@torch.no_grad()
def hqq_quantize(weight: torch.Tensor, s: HQQSettings) -> QuantizedWeight:
    """Quantize a 2-D weight, asymmetric, 1-8 bits, per group (the last group may be shorter) or per channel."""
    w_full = weight.detach().float()
    rows, cols = w_full.shape
    size = effective_group_size(s.group_size, cols)
    groups = num_groups(cols, size)
    w, mask = _grouped(w_full, size)
    count = size if mask is None else mask.sum(1)
    lo, hi = qrange(s.bits)

    rtn_scale, rtn_zero = (t[:, 0] for t in weight_qparams(w, s.bits, False, None))  # slimquant's min-max rounding

    wmin, wmax = w.amin(1), w.amax(1)
    inverse = ((hi - lo) / (wmax - wmin)).clamp_(max=MAX_INVERSE_STEP)
    zero = lo - wmin * inverse
    if s.round_zero:
        zero = zero.round()
    step, zero = _solve(w, mask, count, inverse, zero, s, lo, hi, wmin, wmax)

    # The weight falls back to round-to-nearest if the solver's lp error came out larger (a guarantee the reference
    # lacks; per group the solver may trade lp error between groups, which helps perplexity, so it is kept whole).
    codes = _codes(w, step, zero, lo, hi)
    rtn_codes = _codes(w, rtn_scale, rtn_zero, lo, hi)
    if _lp_error(w, codes, step, zero, s.lp_norm, mask) <= _lp_error(w, rtn_codes, rtn_scale, rtn_zero, s.lp_norm,
                                                                      mask):
        best_scale, best_zero = step, zero
    else:
        codes, best_scale, best_zero = rtn_codes, rtn_scale, rtn_zero
    codes = codes.reshape(rows, groups * size)[:, :cols]
    return QuantizedWeight(codes=codes.contiguous().to(torch.int8), scale=best_scale.reshape(rows, groups),
                           zero=best_zero.reshape(rows, groups), bits=s.bits, group_size=s.group_size)

