"""Pure quantization math on tensors: ranges to scales, rounding, grouped weights. No modules, no state."""

from __future__ import annotations

import torch

from slimquant.quant.qweight import QuantizedWeight, contiguous_g_idx, effective_group_size, num_groups, qrange

EPS = 1e-10


def range_to_qparams(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and integer-valued zero point for asymmetric) mapping [xmin, xmax] onto the b-bit code range.

    The range is widened to include 0, so that zero is exactly representable (padding, ReLU outputs) and the zero
    point is itself a code: it lies in [-2^(b-1), 2^(b-1) - 1], which int kernels and saved offsets rely on.
    """
    lo, hi = qrange(bits)
    xmin, xmax = torch.clamp(xmin, max=0.0), torch.clamp(xmax, min=0.0)
    if symmetric:
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        return (absmax / hi).clamp_min(EPS), None
    scale = ((xmax - xmin) / (hi - lo)).clamp_min(EPS)
    zero = torch.round(lo - xmin / scale).clamp_(lo, hi)
    return scale, zero


def weight_range_to_qparams(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool, signed: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """range_to_qparams for weights. Symmetric with `signed` (WeightArgs.symmetric_scale "signed"): the scale is the
    range's endpoint of larger magnitude, sign kept, over -2^(b-1), so that endpoint is exactly code -2^(b-1) and all
    2^b codes are used: a step of 1/2^(b-1) of the range, where absmax / (2^(b-1) - 1) leaves code -2^(b-1) unused
    (llama.cpp's Q4_0 rule). The scale is negative where that endpoint is positive."""
    if not (symmetric and signed):
        return range_to_qparams(xmin, xmax, bits, symmetric)
    lo, _ = qrange(bits)
    xmin, xmax = torch.clamp(xmin, max=0.0), torch.clamp(xmax, min=0.0)
    scale = torch.where(-xmin >= xmax, xmin, xmax) / lo
    return torch.where(scale.abs() < EPS, EPS, scale), None


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """round(x / scale + zero), clamped: the zero point is added before rounding, as compressed-tensors and vLLM
    quantize activations, so that a fake-quantized model and the engine running its export agree bit for bit (adding
    it after rounding moves near-ties, which W8A8 compounds over the layers: 0.03 perplexity on SmolLM2)."""
    lo, hi = qrange(bits)
    q = x / scale
    if zero is not None:
        q = _in_place(q, "add", zero)
    return q.round_().clamp_(lo, hi)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    return (q - zero) * scale if zero is not None else q * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    q = quantize(x, scale, zero, bits)  # a tensor of its own: dequantized in place
    if zero is not None:
        q = _in_place(q, "sub", zero)
    return _in_place(q, "mul", scale)


def _in_place(t: torch.Tensor, op: str, other: torch.Tensor) -> torch.Tensor:
    """t <op> other, written into t when the result has t's shape and dtype. A weight-sized temporary costs more in
    fresh memory pages than the arithmetic on it (~10x for a rounding chain on a 576 x 1536 weight)."""
    if torch.broadcast_shapes(t.shape, other.shape) == t.shape and torch.result_type(t, other) == t.dtype:
        return getattr(t, op + "_")(other)
    return getattr(t, op)(other)


def group_minmax(w: torch.Tensor, g_idx: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) min and max of a 2-D weight; groups may be ragged or permuted."""
    rows = w.shape[0]
    index = g_idx.long().unsqueeze(0).expand(rows, -1)
    xmin = torch.full((rows, groups), float("inf"), dtype=w.dtype, device=w.device)
    xmax = torch.full((rows, groups), float("-inf"), dtype=w.dtype, device=w.device)
    xmin = xmin.scatter_reduce(1, index, w, "amin")
    xmax = xmax.scatter_reduce(1, index, w, "amax")
    return xmin, xmax


def contiguous_group_minmax(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) min and max for groups of `group_size` consecutive columns (the last may be shorter): a view,
    not a scatter. A shorter last group is padded with copies of its first column, which change no min or max."""
    rows, cols = w.shape
    size = effective_group_size(group_size, cols)
    groups = num_groups(cols, group_size)
    if groups * size != cols:
        first = (groups - 1) * size
        w = torch.cat([w, w[:, first:first + 1].expand(rows, groups * size - cols)], dim=1)
    grouped = w.reshape(rows, groups, size)
    return grouped.amin(-1), grouped.amax(-1)


def expand_groups(t: torch.Tensor | None, g_idx: torch.Tensor) -> torch.Tensor | None:
    """Per-group [rows, groups] values repeated onto every input channel ([rows, in]) by its group; None stays None."""
    return None if t is None else t[:, g_idx.long()]


def weight_qparams(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    group_size: int | None,
    g_idx: torch.Tensor | None = None,
    clip_ratio: torch.Tensor | float = 1.0,
    signed: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scales per output channel and group, optionally shrunk by `clip_ratio` ([rows, groups] or scalar);
    `signed`: see weight_range_to_qparams."""
    w = w.float()
    if g_idx is None:
        xmin, xmax = contiguous_group_minmax(w, group_size)
    else:
        xmin, xmax = group_minmax(w, g_idx, num_groups(w.shape[1], group_size))
    return weight_range_to_qparams(xmin * clip_ratio, xmax * clip_ratio, bits, symmetric, signed)


def per_group(fn, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int | None,
              g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """fn(w, scale, zero) with the [rows, groups] scale and zero applied to every weight of their group: broadcast
    over a view when the groups are equal and contiguous (no gather), else expanded by the group index."""
    rows, cols = w.shape
    size = effective_group_size(group_size, cols)
    if g_idx is None and cols % size == 0:
        out = fn(w.reshape(rows, cols // size, size), scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1))
        return out.reshape(rows, cols)
    idx = g_idx if g_idx is not None else contiguous_g_idx(cols, group_size, w.device)
    return fn(w, expand_groups(scale, idx), expand_groups(zero, idx))


def quantize_weight_with(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    g_idx: torch.Tensor | None = None,
) -> QuantizedWeight:
    """The uniform grid's QuantizedWeight of a 2-D weight for given [rows, groups] scales and zeros: every weight
    rounded to round(w / scale + zero), clamped to the signed b-bit range."""
    codes = per_group(lambda x, s, z: quantize(x, s, z, bits), w.float(), scale, zero, group_size, g_idx)
    return QuantizedWeight(
        codes=codes.to(torch.int8), scale=scale.float(), zero=None if zero is None else zero.float(),
        bits=bits, group_size=group_size, g_idx=g_idx,
    )


def search_clip_ratio(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    group_size: int | None,
    grid: int = 20,
    min_ratio: float = 0.5,
    norm: float = 2.4,
    weight_grid=None,
    signed: bool = True,
) -> torch.Tensor:
    """Per (row, group) shrink of the min-max range that minimises sum |w - Q(w)|^norm (a grid search).

    Candidates are tried a few at a time on every group at once; equal contiguous groups (or one per row) are a
    view of w, so no scatter is needed. With a `weight_grid` (see `round_to_nearest`), each candidate shrinks the
    range the grid's own scale is chosen from."""
    w = w.float()
    if weight_grid is not None:
        return _search_clip_ratio_on(weight_grid, w, group_size, grid, min_ratio, norm)
    rows, cols = w.shape
    groups = num_groups(cols, group_size)
    size = effective_group_size(group_size, cols)
    if groups * size != cols:  # a shorter last group: pad it with copies of its first column (same min/max)
        pad = groups * size - cols
        w = torch.cat([w, w[:, (groups - 1) * size:(groups - 1) * size + 1].expand(rows, pad)], dim=1)
        weight = torch.ones(groups * size, device=w.device)
        weight[cols:] = 0
    else:
        weight = None
    wg = w.view(rows, groups, size)
    xmin, xmax = wg.amin(-1), wg.amax(-1)
    ratios = [1.0 - (1.0 - min_ratio) * step / grid for step in range(grid + 1)]
    best_err = torch.full_like(xmin, float("inf"))
    best_ratio = torch.ones_like(xmin)
    chunk = max(1, (1 << 22) // max(w.numel(), 1))  # candidates per pass, bounded to ~16 MB of float32
    lo_q, hi_q = qrange(bits)
    for start in range(0, len(ratios), chunk):
        r = torch.tensor(ratios[start:start + chunk], device=w.device).view(-1, 1, 1)
        scale, zero = weight_range_to_qparams(xmin * r, xmax * r, bits, symmetric, signed)  # [k, rows, groups]
        scale, zero = scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1)
        q = torch.round(wg / scale)
        if zero is not None:
            q = q.add_(zero).clamp_(lo_q, hi_q).sub_(zero)
        else:
            q = q.clamp_(lo_q, hi_q)
        err = q.mul_(scale).sub_(wg).abs_().pow_(norm)
        if weight is not None:
            err = err.mul_(weight.view(1, 1, groups, size))
        err = err.sum(-1)  # [k, rows, groups]
        for i in range(err.shape[0]):
            better = err[i] < best_err
            best_err = torch.where(better, err[i], best_err)
            best_ratio = torch.where(better, torch.full_like(best_ratio, ratios[start + i]), best_ratio)
    return best_ratio


def _search_clip_ratio_on(weight_grid, w: torch.Tensor, group_size: int | None, steps: int, min_ratio: float,
                          norm: float) -> torch.Tensor:
    """search_clip_ratio on a weight grid: one candidate ratio at a time, scales and rounding by the grid."""
    idx = contiguous_g_idx(w.shape[1], group_size, w.device)
    groups = num_groups(w.shape[1], group_size)
    best_err, best_ratio = None, None
    for step in range(steps + 1):
        ratio = 1.0 - (1.0 - min_ratio) * step / steps
        scale, zero = weight_grid.qparams(w, group_size, clip_ratio=ratio)
        s, z = expand_groups(scale, idx), expand_groups(zero, idx)
        err = (weight_grid.dequantize(weight_grid.quantize(w, s, z), s, z) - w).abs_().pow_(norm)
        err = torch.zeros(w.shape[0], groups, device=w.device).index_add_(1, idx.long(), err)
        if best_err is None:
            best_err, best_ratio = err, torch.ones_like(err)
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


def dynamic_token_fake_quant(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Per-token (last dimension) dynamic quantization, as an inference kernel would do it at run time."""
    if symmetric:
        absmax = x.abs().amax(dim=-1, keepdim=True)
        return fake_quantize(x, (absmax / qrange(bits)[1]).clamp_min(EPS), None, bits)
    xmin = x.amin(dim=-1, keepdim=True)
    xmax = x.amax(dim=-1, keepdim=True)
    scale, zero = range_to_qparams(xmin, xmax, bits, symmetric=False)
    return fake_quantize(x, scale, zero, bits)


def _uniform_qparams(w: torch.Tensor, args, clip_ratio) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
    """Min-max scale and zero point [rows, groups] of a float32 2-D weight on the uniform grid, and the group size
    they apply to (None: one per row; a per-tensor scale is repeated on every row)."""
    signed = signed_scale(args)
    if args.strategy == "tensor":
        scale, zero = weight_qparams(w.reshape(1, -1), args.bits, args.symmetric, None, clip_ratio=clip_ratio,
                                     signed=signed)
        zero = None if zero is None else zero.expand(w.shape[0], 1).contiguous()
        return scale.expand(w.shape[0], 1).contiguous(), zero, None
    group_size = args.group_size if args.strategy == "group" else None
    return (*weight_qparams(w, args.bits, args.symmetric, group_size, clip_ratio=clip_ratio, signed=signed), group_size)


def signed_scale(args) -> bool:
    """Whether WeightArgs (or any object with their fields) ask for signed symmetric scales."""
    return getattr(args, "symmetric_scale", "signed") == "signed"


def round_to_nearest(w: torch.Tensor, args, clip_ratio: torch.Tensor | float = 1.0, grid=None) -> QuantizedWeight:
    """Min-max round-to-nearest of a 2-D weight with a plan's WeightArgs (per tensor, channel or group), each range
    optionally shrunk by `clip_ratio` ([rows, groups] or a scalar). With a `grid` (a `slimquant.quant.grid.WeightGrid`,
    e.g. `ctx.grid(name)`), the grid chooses the scales and the values the codes stand for (per channel or group)."""
    w = w.detach().float()
    if grid is not None:
        if args.strategy == "tensor":
            raise ValueError("a weight grid scales per channel or per group, not per tensor")
        return grid.round_to_nearest(w, grid.group_size(args), clip_ratio)
    scale, zero, group_size = _uniform_qparams(w, args, clip_ratio)
    return quantize_weight_with(w, scale, zero, args.bits, group_size)


def fake_quantize_weight(w: torch.Tensor, args, clip_ratio: torch.Tensor | float = 1.0, grid=None) -> torch.Tensor:
    """The weight as the plan's arguments (and grid, when the plan has one) would round it to nearest, back in w's
    dtype: what a search (AWQ's scales, a clipping grid) compares candidates with."""
    if grid is not None:
        return round_to_nearest(w, args, clip_ratio, grid).dequantize(w.dtype)
    # the same arithmetic as round_to_nearest(...).dequantize(), without building and checking the codes
    w32 = w.detach().float()
    scale, zero, group_size = _uniform_qparams(w32, args, clip_ratio)
    fake = per_group(lambda x, s, z: fake_quantize(x, s, z, args.bits), w32, scale, zero, group_size)
    return fake.to(w.dtype)
