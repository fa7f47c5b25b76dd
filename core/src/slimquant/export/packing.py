"""Two 4-bit (or narrower) weight codes per byte.

Layout ("int4x2"): codes of shape [out, in] (int8, signed, each in [-8, 7]) become a uint8 tensor of shape
[out, ceil(in / 2)]. Byte j of a row holds input column 2j in its low nibble and column 2j+1 in its high
nibble; each nibble is the code plus 8 (so -8 -> 0x0, 0 -> 0x8, 7 -> 0xF). When `in` is odd the row is
padded with one code 0 (nibble 0x8) in the last high nibble. Unpacking needs `in` to drop that padding:

    low, high = (byte & 0xF) - 8, (byte >> 4) - 8;  codes[:, 0::2] = low;  codes[:, 1::2] = high[:, :in // 2]
"""

from __future__ import annotations

import torch

PACK_INT4 = "int4x2"
MAX_PACKED_BITS = 4


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    if codes.dim() != 2 or codes.dtype != torch.int8:
        raise ValueError(f"pack_int4 expects 2-D int8 codes, got {tuple(codes.shape)} {codes.dtype}")
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise ValueError("pack_int4: codes outside [-8, 7]")
    rows, cols = codes.shape
    u = codes.to(torch.int16) + 8
    if cols % 2:
        u = torch.cat([u, torch.full((rows, 1), 8, dtype=u.dtype, device=u.device)], dim=1)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    rows, width = packed.shape
    if packed.dtype != torch.uint8 or width != (in_features + 1) // 2:
        raise ValueError(f"packed int4x2 weight must be uint8 [out, {(in_features + 1) // 2}], "
                         f"got {packed.dtype} {list(packed.shape)}")
    p = packed.to(torch.int16)
    codes = torch.empty(rows, 2 * width, dtype=torch.int16, device=packed.device)
    codes[:, 0::2] = (p & 0xF) - 8
    codes[:, 1::2] = (p >> 4) - 8
    return codes[:, :in_features].to(torch.int8).contiguous()
