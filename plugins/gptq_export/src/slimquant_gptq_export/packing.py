"""The GPTQ checkpoint layout (AutoGPTQ / GPTQModel), from slimquant's signed codes.

Codes are stored unsigned (q = code + 2^(bits-1)), 32 // bits to an int32 word, element k of a word at bits
k*bits and up (low first). `qweight` packs along the input dimension and is transposed: [in * bits / 32, out].
`qzeros` packs the unsigned zero points along the output dimension: [groups, out * bits / 32]; checkpoint format
`gptq` (v1) stores zero - 1, `gptq_v2` stores the zero. `scales` is float16 [groups, out]; `g_idx` int32 [in]
names each input channel's group. A weight is scales[g] * (q - zero).
"""

from __future__ import annotations

import torch


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values [n, cols] (n a multiple of 32 // bits) -> int32 words [n * bits / 32, cols], along dim 0."""
    per_word = 32 // bits
    n, cols = values.shape
    grouped = values.to(torch.int64).reshape(n // per_word, per_word, cols)
    shifts = (torch.arange(per_word, dtype=torch.int64) * bits).view(1, per_word, 1)
    words = (grouped << shifts).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the uint32 bit pattern


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of pack_rows: unsigned int64 values [words * 32 / bits, cols]."""
    per_word = 32 // bits
    shifts = (torch.arange(per_word, dtype=torch.int64) * bits).view(1, per_word, 1)
    values = (words.to(torch.int64).unsqueeze(1) & 0xFFFFFFFF) >> shifts & (2**bits - 1)
    return values.reshape(-1, words.shape[1])


def qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 signed codes [out, in] -> qweight int32 [in * bits / 32, out]."""
    return pack_rows(codes.t().to(torch.int64) + 2 ** (bits - 1), bits)


def qzeros(zero: torch.Tensor, bits: int, v2: bool) -> torch.Tensor:
    """Unsigned integer zero points [out, groups] -> qzeros int32 [groups, out * bits / 32]."""
    return pack_rows(zero.to(torch.int64) - (0 if v2 else 1), bits).t().contiguous()


def unsigned_zero(zero: torch.Tensor | None, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """slimquant's signed zero point (None: symmetric, zero 0) -> GPTQ's unsigned zero point [out, groups]."""
    base = torch.zeros(shape, dtype=torch.int64) if zero is None else zero.round().to(torch.int64)
    return base + 2 ** (bits - 1)
