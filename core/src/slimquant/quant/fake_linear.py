"""The fake-quantized Linear: holds integer codes and scales, computes in float."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from slimquant.quant.actparams import ActQParams
from slimquant.quant.math import dynamic_token_fake_quant, fake_quantize
from slimquant.quant.outliers import WeightOutliers
from slimquant.quant.qweight import QuantizedScale, QuantizedWeight, dequantize_codes
from slimquant.quant.two_level import TwoLevelScale


class FakeQuantLinear(nn.Module):
    """Drop-in for nn.Linear. The weight is rebuilt from its codes on every call, so memory holds int8 codes
    (inside `materialized_weights` it is rebuilt once instead).

    What an exporter reads: every quantized Linear of the model is one
    (``{n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}``); ``qweight`` is its
    ``QuantizedWeight`` (codes, scales, zeros, groups, codebook, ...), ``act_qparams`` its input's ``ActQParams``
    (None when weight-only; ``dynamic`` with no tensors when computed at run time), ``bias`` its float bias or None,
    ``in_features`` / ``out_features`` its shape. ``weight`` is the dequantized float weight, as the model computes
    with it. ``input_transform`` (None, or float ``[in, in]``) is a matrix the input is multiplied by before anything
    else (an online rotation a model transform set: ``ModelContext.set_input_transform``)."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None, act: ActQParams | None,
                 compute_dtype: torch.dtype = torch.float32, input_transform: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("input_transform", input_transform)
        self.out_features, self.in_features = qweight.shape
        self.bits = qweight.bits
        self.group_size = qweight.group_size
        self.compute_dtype = compute_dtype
        self.register_buffer("codes", qweight.codes)
        self.register_buffer("weight_scale", qweight.scale)
        self.register_buffer("weight_zero", qweight.zero)
        self.register_buffer("g_idx", qweight.g_idx)
        self.register_buffer("codebook", qweight.codebook)
        self.codebook_name = qweight.codebook_name
        stored = qweight.scale_quant
        self.scale_block_size = None if stored is None else stored.block_size
        self.register_buffer("scale_codes", None if stored is None else stored.codes)
        self.register_buffer("scale_block_scale", None if stored is None else stored.block_scale)
        self.register_buffer("scale_offset", None if stored is None else stored.offset)
        for name, tensor in qweight.extras.items():
            self.register_buffer(f"extra_{name}", tensor)
        two = qweight.two_level
        self.channel_bits = None if two is None else two.channel_bits
        self.register_buffer("weight_group_scale", None if two is None else two.group_scale)
        self.register_buffer("weight_channel_scale", None if two is None else two.channel_scale)
        self.sparsity = qweight.sparsity
        outliers = qweight.outliers
        self.register_buffer("outlier_index", None if outliers is None else outliers.index)
        self.register_buffer("outlier_value", None if outliers is None else outliers.values)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.act = act
        self.materialized: torch.Tensor | None = None
        if act is not None and not act.dynamic:
            self.register_buffer("input_scale", act.scale)
            self.register_buffer("input_zero", act.zero)

    @property
    def qweight(self) -> QuantizedWeight:
        """The QuantizedWeight this Linear holds, rebuilt from its buffers (and validated) on every access: read it
        once per Linear. Its tensors are the buffers themselves, on the model's device: copy before changing them."""
        extras = {n[len("extra_"):]: b for n, b in self.named_buffers(recurse=False) if n.startswith("extra_")}
        stored = None
        if self.scale_block_size is not None:
            stored = QuantizedScale(self.scale_codes, self.scale_block_scale, self.scale_offset, self.scale_block_size)
        two = None
        if self.channel_bits is not None:
            two = TwoLevelScale(self.weight_group_scale, self.weight_channel_scale, self.channel_bits)
        return QuantizedWeight(self.codes, self.weight_scale, self.weight_zero, self.bits, self.group_size,
                               self.g_idx, extras, self.codebook, stored, self.outliers, self.sparsity, two,
                               self.codebook_name)

    @property
    def outliers(self) -> WeightOutliers | None:
        return None if self.outlier_index is None else WeightOutliers(self.outlier_index, self.outlier_value)

    @property
    def act_qparams(self) -> ActQParams | None:
        if self.act is None or self.act.dynamic:
            return self.act
        return ActQParams(self.act.bits, self.act.symmetric, False, self.input_scale, self.input_zero)

    @property
    def weight(self) -> torch.Tensor:
        if self.materialized is not None:
            return self.materialized
        weight = dequantize_codes(self.codes, self.weight_scale, self.weight_zero, self.group_size, self.g_idx,
                                  self.compute_dtype, self.codebook)
        return weight if self.outlier_index is None else self.outliers.add_to(weight)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        act = self.act
        if act is None:
            return x
        if act.dynamic:
            return dynamic_token_fake_quant(x, act.bits, act.symmetric)
        return fake_quantize(x, self.input_scale, self.input_zero, act.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.input_transform is not None:
            x = x @ self.input_transform.to(x.dtype)
        if self.act is not None:
            x = self.quantize_input(x.float())  # rounding in float32, the matmul in the model's dtype
        if not torch.is_autocast_enabled(x.device.type):  # (under autocast, in the autocast dtype)
            x = x.to(self.compute_dtype)
        out = F.linear(x, self.weight, None if self.bias is None else self.bias.to(self.compute_dtype))
        return out.to(dtype)

    def extra_repr(self) -> str:
        act = "none" if self.act is None else f"{self.act.bits}-bit {'dynamic' if self.act.dynamic else 'static'}"
        group = self.group_size or "channel"
        online = ", input_transform" if self.input_transform is not None else ""
        return f"in={self.in_features}, out={self.out_features}, w_bits={self.bits}, group={group}, act={act}{online}"


@contextmanager
def materialized_weights(module: nn.Module) -> Iterator[None]:
    """Inside the block every FakeQuantLinear under `module` computes with a weight dequantized once on entry:
    for running many calibration samples through one layer, at the cost of that layer's float weights."""
    fakes = [m for m in module.modules() if isinstance(m, FakeQuantLinear)]
    try:
        for fake in fakes:
            fake.materialized = fake.weight
        yield
    finally:
        for fake in fakes:
            fake.materialized = None
