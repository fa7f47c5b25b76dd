"""compressed-tensors' int32 packing: codes shifted to unsigned (code + 2^(bits-1)), 32 // bits per word, element k
of a word at bits k*bits and up (low first), unused high bits zero, the last word padded with zeros."""

from __future__ import annotations

import torch


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """int8 signed codes [rows, cols] -> int32 words packed along `dim` (1: columns, 0: rows)."""
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise ValueError(f"expected 2-D int8 codes, got {codes.dtype} {list(codes.shape)}")
    values = codes.t() if dim == 0 else codes
    per_word = 32 // bits
    rows, cols = values.shape
    words = -(-cols // per_word)
    unsigned = torch.zeros(rows, words * per_word, dtype=torch.int64)
    unsigned[:, :cols] = values.to(torch.int64) + 2 ** (bits - 1)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    packed = (unsigned.view(rows, words, per_word) << shifts).sum(dim=2)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the uint32 bit pattern
    return (packed.t() if dim == 0 else packed).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """The inverse of pack_int32: `length` signed int8 codes along `dim`."""
    words = packed.t() if dim == 0 else packed
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    unsigned = (words.to(torch.int64).unsqueeze(-1) & 0xFFFFFFFF) >> shifts & (2**bits - 1)
    codes = (unsigned.flatten(1)[:, :length] - 2 ** (bits - 1)).to(torch.int8)
    return (codes.t() if dim == 0 else codes).contiguous()
