"""Keep a rotation only where it lowers the quantization error of the Linears it turns, on calibration inputs.

Before anything is rewritten, each quantized Linear's inputs are caught on a few calibration batches (a subset of
their tokens). A rotation turns a Linear's weight W into L W R (L: the rows, for Linears writing the stream or the
values; R: the input basis) and its input X into X R, so the output error of rounding the turned weight is

    || X R (L W R)^T - X R round(L W R)^T ||

computed from the float inputs without running the turned model. round() is the plan's round-to-nearest on the
uniform grid (``fake_quantize_weight``), or, when the Linear's weight algorithm is calibrated (GPTQ), rounding
with error feedback through the caught inputs' inverse Hessian: the proxy for the quantizer that follows; a plan
that quantizes activations also rounds the turned input per token. R1 (one rotation of the whole
residual stream) is kept when it lowers the summed relative error of every Linear; R2 per attention layer when it
lowers that of its v_proj and o_proj; R4 per down_proj. Without calibration data the same comparison runs on the
weights alone (the error of rounding W, in the float weight's own basis).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimquant.sdk import (
    effective_group_size,
    fake_quantize_weight,
    inverse_hessian_factor,
    qrange,
    signed_scale,
    weight_qparams,
)

TOKENS = 256  # input rows kept per Linear


@dataclass
class Turn:
    left: torch.Tensor | None = None  # L, applied to the rows
    right: torch.Tensor | None = None  # R, applied to the input channels
    gain: torch.Tensor | None = None  # a norm weight folded into the input channels (X / gain, W * gain)


@torch.no_grad()
def catch_inputs(model: nn.Module, names: list[str], samples: list[torch.Tensor], batches: int) -> dict:
    """Up to TOKENS rows of each named Linear's input over the first `batches` samples, float64 on the CPU."""
    modules = dict(model.named_modules())
    caught: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    per_batch = -(-TOKENS // max(1, min(batches, len(samples))))

    def hook(name):
        def record(module, args):
            rows = args[0].detach().reshape(-1, args[0].shape[-1])
            step = max(1, rows.shape[0] // per_batch)
            caught[name].append(rows[::step][:per_batch].double().cpu())  # only what is kept: memory stays small
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    device = model.get_input_embeddings().weight.device
    try:
        for ids in samples[:batches]:
            model(ids.to(device))
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(rows)[:TOKENS] for name, rows in caught.items() if rows}


def error(linear: nn.Linear, x: torch.Tensor | None, args, turn: Turn, act=None, feedback: bool = False) -> float:
    """Squared output error of the turned Linear with its weight rounded (and its input rounded per token when `act`,
    the plan's ActArgs, is given), relative to the float output's, on inputs `x`; in the turned output basis, which
    an orthogonal L does not change the norm of. `x` None (no calibration data): the weight's own error, as if the
    inputs were the unit vectors, with the activations left unrounded. `feedback`: round column by column, each
    column's error fed to the columns after it through the inputs' inverse Hessian, as a calibrated error-feedback
    quantizer (GPTQ) does, instead of to nearest."""
    w = linear.weight.detach().double().cpu()
    if x is None:
        return _weight_error(w, args, turn)
    if turn.gain is not None:
        w, x = w * turn.gain, x / turn.gain
    if turn.left is not None:
        w = turn.left @ w
    if turn.right is not None:
        w, x = w @ turn.right, x @ turn.right
    reference = x @ w.T
    rounded = _feedback_rounding(w, x, args) if feedback else fake_quantize_weight(w.float(), args).double()
    if act is not None:
        x = _round_per_token(x, act.bits, act.symmetric)
    out = x @ rounded.T
    return float((out - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30))


def _feedback_rounding(w: torch.Tensor, x: torch.Tensor, args) -> torch.Tensor:
    """w rounded with error feedback on the inputs x (static groups: the scales from the whole weight first)."""
    group = effective_group_size(args.group_size if args.strategy == "group" else None, w.shape[1])
    scale, zero = weight_qparams(w.float(), args.bits, args.symmetric, group, signed=signed_scale(args))
    scale, zero = scale.double(), None if zero is None else zero.double()
    lo, hi = qrange(args.bits)
    factor = inverse_hessian_factor(2 * x.T @ x / x.shape[0], 0.01).double()
    w = w.clone()
    rounded = torch.empty_like(w)
    for i in range(w.shape[1]):
        g = i // group
        s, z = scale[:, g], (0.0 if zero is None else zero[:, g])
        q = (torch.clamp(torch.round(w[:, i] / s) + z, lo, hi) - z) * s
        rounded[:, i] = q
        err = (w[:, i] - q) / factor[i, i]
        w[:, i + 1:] -= err[:, None] * factor[i, i + 1:][None, :]
    return rounded


def _weight_error(w: torch.Tensor, args, turn: Turn) -> float:
    """The rounding error of the turned weight brought back to the float weight's basis, relative to the weight."""
    turned = w * turn.gain if turn.gain is not None else w
    if turn.left is not None:
        turned = turn.left @ turned
    if turn.right is not None:
        turned = turned @ turn.right
    back = fake_quantize_weight(turned.float(), args).double() - turned
    if turn.right is not None:
        back = back @ turn.right.T
    if turn.gain is not None:
        back = back / turn.gain
    return float(back.pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))


def _round_per_token(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Each row rounded to `bits` integers over its own range: dynamic per-token quantization, the proxy for any
    activation scheme."""
    if symmetric:
        scale = (x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)).clamp_min(1e-12)
        return torch.round(x / scale).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)
    zero = torch.round(-lo / scale)
    return (torch.round(x / scale) + zero).clamp(0, 2**bits - 1).sub(zero) * scale
