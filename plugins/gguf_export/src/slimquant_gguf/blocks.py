"""ggml's 32-element blocks, built from integer codes and per-group scales without re-quantizing anything.

Q4_0: d (float16), 16 bytes of nibbles; x = d * (nibble - 8), nibble = code + 8.
Q4_1: d, m (float16), 16 bytes of nibbles; x = d * nibble + m, so m = -d * (zero + 8) for x = d * (code - zero).
Q5_0 / Q5_1: as Q4_0 / Q4_1 with 5-bit unsigned codes (code + 16) and m = -d * (zero + 16); after d (and m), 4
bytes qh (a little-endian uint32 whose bit j is the fifth bit of element j), then the low 4 bits as nibbles.
Q8_0: d (float16), 32 int8 codes; x = d * code.
IQ4_NL: d (float16), 16 bytes of nibbles as Q4_0; x = d * KVALUES[nibble] (slimquant_gguf.iq4nl), nibble = code + 8.
Element j of a block sits in the low nibble of byte j, element j + 16 in its high nibble. A group spanning several
blocks repeats its d (and m) in each.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from slimquant.sdk import QuantizedWeight, effective_group_size
from slimquant_gguf.iq4nl import is_iq4nl_codebook

BLOCK = 32
TYPES = {(4, True): GGMLQuantizationType.Q4_0, (4, False): GGMLQuantizationType.Q4_1,
         (5, True): GGMLQuantizationType.Q5_0, (5, False): GGMLQuantizationType.Q5_1,
         (8, True): GGMLQuantizationType.Q8_0}


def quant_type(bits: int, symmetric: bool) -> GGMLQuantizationType | None:
    return TYPES.get((bits, symmetric))


def block_params(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """d and m (float32, [rows, blocks]) of every block; m is None for the symmetric types."""
    rows, cols = qw.shape
    group = effective_group_size(qw.group_size, cols)
    block_group = torch.arange(cols // BLOCK) * BLOCK // group
    scale = qw.scale.detach().cpu().float()
    d = scale[:, block_group]
    if qw.zero is None:
        return d, None
    zero = qw.zero.detach().cpu().float()[:, block_group]
    return d, -d * (zero + 2 ** (qw.bits - 1))


def half_bytes(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.float16).view(np.uint8).reshape(*t.shape, 2)


def written_as_iq4nl(qw: QuantizedWeight) -> bool:
    """Whether the weight stands for IQ4_NL's codebook values (the exporter then writes IQ4_NL blocks)."""
    return qw.bits == 4 and is_iq4nl_codebook(qw.codebook)


def encode_iq4nl_blocks(qw: QuantizedWeight) -> tuple[np.ndarray, GGMLQuantizationType]:
    """IQ4_NL blocks, uint8 [rows, blocks * 18]: d, then nibbles code + 8 laid out as Q4_0's."""
    rows, cols = qw.shape
    d, _ = block_params(qw)
    nibbles = (qw.codes.detach().cpu().to(torch.int16) + 8).to(torch.uint8).reshape(rows, cols // BLOCK, BLOCK)
    packed = (nibbles[..., :16] | (nibbles[..., 16:] << 4)).numpy()
    data = np.concatenate([half_bytes(d), packed], axis=-1).reshape(rows, -1)
    return np.ascontiguousarray(data), GGMLQuantizationType.IQ4_NL


def encode_blocks(qw: QuantizedWeight) -> tuple[np.ndarray, GGMLQuantizationType]:
    """The tensor's bytes, uint8 [rows, blocks * block_bytes], and its ggml type."""
    rows, cols = qw.shape
    kind = quant_type(qw.bits, qw.symmetric)
    d, m = block_params(qw)
    codes = qw.codes.detach().cpu().to(torch.int16).reshape(rows, cols // BLOCK, BLOCK)
    parts = [half_bytes(d)] + ([] if m is None else [half_bytes(m)])
    if qw.bits == 8:
        parts.append(codes.to(torch.int8).numpy().view(np.uint8))
    else:
        unsigned = (codes + 2 ** (qw.bits - 1)).to(torch.uint8)
        if qw.bits == 5:
            parts.append(np.packbits((unsigned >> 4).numpy(), axis=-1, bitorder="little"))  # qh
        low = unsigned & 15
        parts.append((low[..., :16] | (low[..., 16:] << 4)).numpy())
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(rows, -1)), kind
