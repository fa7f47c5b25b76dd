"""One quantized Linear's tensors under compressed-tensors' names (`<name>.weight_packed`, ...)."""

from __future__ import annotations

import torch

from slimquant.sdk import FakeQuantLinear
from slimquant_compressed_tensors.packing import pack_int32
from slimquant_compressed_tensors.schemes import PACKED, LinearSpec


def linear_tensors(name: str, module: FakeQuantLinear, spec: LinearSpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """pack-quantized: weight_packed (int32), weight_scale, weight_shape, weight_zero_point (int32, packed along
    the output dim) when asymmetric; int-quantized: weight (int8), weight_scale, weight_zero_point (int8), and the
    static input_scale / input_zero_point. weight_g_idx when the groups are permuted; the bias as it is."""
    qw = module.qweight
    codes = qw.codes.detach().cpu()
    zero = None if qw.zero is None else qw.zero.detach().cpu().round().to(torch.int8)
    out: dict[str, torch.Tensor] = {}
    if spec.format == PACKED:
        out["weight_packed"] = pack_int32(codes, qw.bits)
        out["weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
        if zero is not None:
            out["weight_zero_point"] = pack_int32(zero, qw.bits, dim=0)
    else:
        out["weight"] = codes
        if zero is not None:
            out["weight_zero_point"] = zero
    out["weight_scale"] = qw.scale.detach().cpu().to(dtype)
    if spec.weights.actorder:
        out["weight_g_idx"] = qw.g_idx.detach().cpu().to(torch.int32)
    act = module.act_qparams
    if act is not None and not act.dynamic:
        out["input_scale"] = act.scale.detach().cpu().reshape(1).to(dtype)
        if act.zero is not None:
            out["input_zero_point"] = act.zero.detach().cpu().reshape(1).round().to(torch.int8)
    if module.bias is not None:
        out["bias"] = module.bias.detach().cpu().to(dtype)
    return {f"{name}.{key}": t.contiguous() for key, t in out.items()}
