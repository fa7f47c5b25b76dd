"""Attention-cache quantization parameters (the `quantize_cache` hook's result) and the fake quantization of
keys and values with them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimquant.quant.math import dynamic_token_fake_quant, fake_quantize


@dataclass
class CacheQParams:
    """Static: one scale (and, asymmetric, an integer-valued zero point) per (kv head, head_dim channel) for keys and
    for values, float32 [kv_heads, head_dim]; per-head and per-tensor scales are repeated along the axes they span.
    x_q = clamp(round(x / scale) + zero). Dynamic: no stored tensors, each token of each head is scaled by its own
    range at run time."""

    bits: int
    symmetric: bool
    dynamic: bool
    key_scale: torch.Tensor | None = None
    key_zero: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None
    value_zero: torch.Tensor | None = None

    def __post_init__(self):
        if self.dynamic:
            if any(t is not None for t in (self.key_scale, self.key_zero, self.value_scale, self.value_zero)):
                raise ValueError("a dynamic cache has no stored scales or zero points")
            return
        for kind in ("key", "value"):
            scale, zero = getattr(self, f"{kind}_scale"), getattr(self, f"{kind}_zero")
            if scale is None or scale.dim() != 2 or not scale.is_floating_point():
                raise ValueError(f"{kind}_scale must be a float tensor [kv_heads, head_dim]")
            if not torch.isfinite(scale).all() or not (scale > 0).all():
                raise ValueError(f"{kind}_scale must be finite and positive")
            if self.symmetric != (zero is None):
                raise ValueError(f"{kind}_zero must be {'None' if self.symmetric else 'given'} for "
                                 f"{'symmetric' if self.symmetric else 'asymmetric'} scales")
            if zero is not None and zero.shape != scale.shape:
                raise ValueError(f"{kind}_zero shape {list(zero.shape)} != {kind}_scale shape {list(scale.shape)}")
        if self.key_scale.shape != self.value_scale.shape:
            raise ValueError("key and value scales differ in shape")

    @property
    def shape(self) -> tuple[int, int] | None:
        return None if self.dynamic else tuple(self.key_scale.shape)


def fake_quantize_cache(x: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None, bits: int,
                        symmetric: bool, dynamic: bool) -> torch.Tensor:
    """Keys or values [batch, kv_heads, seq, head_dim] as the cache would hold them, rounded in float32."""
    xf = x.float()
    if dynamic:
        out = dynamic_token_fake_quant(xf, bits, symmetric)
    else:
        out = fake_quantize(xf, scale.unsqueeze(1), None if zero is None else zero.unsqueeze(1), bits)
    return out.to(x.dtype)
