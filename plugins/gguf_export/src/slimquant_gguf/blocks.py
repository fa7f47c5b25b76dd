"""ggml's 32-element blocks, built from integer codes and per-group scales without re-quantizing anything.

Q4_0: d (float16), 16 bytes of nibbles; x = d * (nibble - 8), nibble = code + 8.
Q4_1: d, m (float16), 16 bytes of nibbles; x = d * nibble + m, so m = -d * (zero + 8) for x = d * (code - zero).
Q8_0: d (float16), 32 int8 codes; x = d * code.
Element j of a 4-bit block sits in the low nibble of byte j, element j + 16 in its high nibble. A group spanning
several blocks repeats its d (and m) in each.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from slimquant.quant.qweight import QuantizedWeight

BLOCK = 32
Q4_0, Q4_1, Q8_0 = GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0


def quant_type(bits: int, symmetric: bool) -> GGMLQuantizationType | None:
    return {(4, True): Q4_0, (4, False): Q4_1, (8, True): Q8_0}.get((bits, symmetric))


def block_params(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """d and m (float32, [rows, blocks]) of every block; m is None for the symmetric types."""
    rows, cols = qw.shape
    group = qw.group_size or cols
    block_group = torch.arange(cols // BLOCK) * BLOCK // group
    scale = qw.scale.detach().cpu().float()
    d = scale[:, block_group]
    if qw.zero is None:
        return d, None
    zero = qw.zero.detach().cpu().float()[:, block_group]
    return d, -d * (zero + 2 ** (qw.bits - 1))


def _half_bytes(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.float16).view(np.uint8).reshape(*t.shape, 2)


def encode_blocks(qw: QuantizedWeight) -> tuple[np.ndarray, GGMLQuantizationType]:
    """The tensor's bytes, uint8 [rows, blocks * block_bytes], and its ggml type."""
    rows, cols = qw.shape
    kind = quant_type(qw.bits, qw.symmetric)
    d, m = block_params(qw)
    codes = qw.codes.detach().cpu().to(torch.int16).reshape(rows, cols // BLOCK, BLOCK)
    if kind == Q8_0:
        payload = codes.to(torch.int8).numpy().view(np.uint8)
    else:
        nibbles = (codes + 8).to(torch.uint8)
        payload = (nibbles[..., :16] | (nibbles[..., 16:] << 4)).numpy()
    parts = [_half_bytes(d)] + ([] if m is None else [_half_bytes(m)]) + [payload]
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(rows, -1)), kind
