"""Q4_K and Q6_K blocks (256 weights each) from codes, scales and zero points on the K-quant grids
(slimquant_gguf.kquants): the super-block integers are recovered from the scales, the file written without
re-quantizing anything.

Q4_K, 144 bytes: d, dmin (float16); 12 bytes of 6-bit sc and m for the 8 groups (bytes 0-3: sc 0-3 in the low 6 bits,
the high 2 bits of sc 4-7 on top; bytes 4-7: the same for m; bytes 8-11: the low 4 bits of sc 4-7, of m 4-7 on top);
128 bytes of nibbles, byte i of each 32 holding group 2k's element i low and group 2k + 1's high.
Q6_K, 210 bytes: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 sc, d (float16). Within each half
of 128 weights, element r has its low nibble in byte r % 64 (high nibble when r >= 64) and its high 2 bits in byte
r % 32 at bit 2 * (r // 32); q is stored + 32.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from slimquant.sdk import QuantizedWeight
from slimquant_gguf.blocks import half_bytes
from slimquant_gguf.kquants import HALF_TINY, SUPER_BLOCK, Q4KGrid, Q6KGrid

TYPES = {4: GGMLQuantizationType.Q4_K, 6: GGMLQuantizationType.Q6_K}
GROUPS = {4: Q4KGrid.group, 6: Q6KGrid.group}
TOLERANCE = 2.0 ** -16  # of a group's step: how far the file's float32 arithmetic may land from slimquant's


def k_type(qw: QuantizedWeight) -> GGMLQuantizationType | None:
    """The K type whose layout the weight has (bits, symmetry, group, whole super-blocks); None if none has it."""
    rows, cols = qw.shape
    if qw.bits not in TYPES or qw.group_size != GROUPS[qw.bits] or cols % SUPER_BLOCK or qw.g_idx is not None:
        return None
    if qw.symmetric != (qw.bits == 6) or qw.codebook is not None or qw.outliers is not None:
        return None
    return TYPES[qw.bits]


def written_as_k(qw: QuantizedWeight) -> bool:
    """Whether the exporter writes this weight as a K type: 6-bit, or 4-bit with zero points off the integers (a
    weight Q4_1 holds exactly stays Q4_1)."""
    if k_type(qw) is None:
        return False
    return qw.bits == 6 or not torch.equal(qw.zero, torch.round(qw.zero))


def _super(t: torch.Tensor, group: int) -> torch.Tensor:
    return t.reshape(t.shape[0], -1, SUPER_BLOCK // group)


def super_block_integers(qw: QuantizedWeight) -> dict[str, torch.Tensor] | str:
    """d and sc (and Q4_K's dmin and m), float32 [rows, super-blocks(, groups)], that the scales (and zero points)
    are made of; a string saying why when they are not on the grid."""
    group = GROUPS[qw.bits]
    scale = _super(qw.scale.detach().cpu().float(), group)
    if qw.bits == 6:
        extreme = scale.gather(-1, scale.abs().argmax(-1, keepdim=True))
        d = extreme / -128
        sc = scale / d
        found = {"d": d.squeeze(-1), "sc": sc}
        limits = (-128, 127)
    else:
        d = scale.amax(-1, keepdim=True) / 63
        sc = scale / d
        offset = (_super(qw.zero.detach().cpu().float(), group) + 8) * scale
        dmin = (offset.amax(-1, keepdim=True) / 63).half().float()
        m = torch.where(dmin > 0, torch.round(offset / dmin.clamp_min(HALF_TINY)), 0.0)
        found = {"d": d.squeeze(-1), "sc": sc, "dmin": dmin.squeeze(-1), "m": m}
        limits = (0, 63)
        if not bool(((m >= 0) & (m <= 63)).all()):
            return "its zero points are not Q4_K minimums (6-bit m times a float16 dmin)"
    if not (torch.equal(d.half().float(), d) and bool(torch.isfinite(d).all()) and bool((d != 0).all())):
        return f"its scales are not {TYPES[qw.bits].name}'s (d of a super-block is not float16)"
    if not (torch.equal(sc, sc.round()) and bool(((sc >= limits[0]) & (sc <= limits[1])).all())):
        return f"its scales are not {TYPES[qw.bits].name}'s ({'8' if qw.bits == 6 else '6'}-bit sc times d)"
    return found


def dequantize_k(qw: QuantizedWeight, ints: dict[str, torch.Tensor]) -> torch.Tensor:
    """The weight as llama.cpp computes it from the file: d * sc * q (- dmin * m), float32."""
    group = GROUPS[qw.bits]
    rows, cols = qw.shape
    q = qw.codes.detach().cpu().float().reshape(rows, cols // SUPER_BLOCK, SUPER_BLOCK // group, group)
    step = (ints["d"].unsqueeze(-1) * ints["sc"]).unsqueeze(-1)
    if qw.bits == 6:
        return (step * q).reshape(rows, cols)
    offset = (ints["dmin"].unsqueeze(-1) * ints["m"]).unsqueeze(-1)
    return (step * (q + 8) - offset).reshape(rows, cols)


def k_problem(qw: QuantizedWeight) -> str | None:
    """Why the file would not hold this weight as slimquant computes it (None: it does, to float32 rounding)."""
    ints = super_block_integers(qw)
    if isinstance(ints, str):
        return ints
    rows, cols = qw.shape
    group = GROUPS[qw.bits]
    gap = (dequantize_k(qw, ints) - qw.dequantize(torch.float32).cpu()).abs().reshape(rows, -1, group)
    if not bool((gap <= TOLERANCE * qw.scale.detach().cpu().float().abs().unsqueeze(-1)).all()):
        return f"{TYPES[qw.bits].name}'s arithmetic does not give its weights (zero points off the grid)"
    return None


def encode_k_blocks(qw: QuantizedWeight) -> tuple[np.ndarray, GGMLQuantizationType]:
    """uint8 [rows, super-blocks * block bytes] and the type; the weight must pass k_problem."""
    ints = super_block_integers(qw)
    rows, cols = qw.shape
    blocks = cols // SUPER_BLOCK
    codes = qw.codes.detach().cpu().to(torch.int16).reshape(rows, blocks, SUPER_BLOCK)
    if qw.bits == 4:
        sc, m = ints["sc"].to(torch.uint8), ints["m"].to(torch.uint8)
        scales = torch.cat([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), m[..., :4] | ((m[..., 4:] >> 4) << 6),
                            (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)], dim=-1)
        q = (codes + 8).to(torch.uint8).reshape(rows, blocks, 4, 2, 32)
        qs = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(rows, blocks, 128)
        parts = [half_bytes(ints["d"]), half_bytes(ints["dmin"]), scales.numpy(), qs.numpy()]
    else:
        q = (codes + 32).to(torch.uint8).reshape(rows, blocks, 2, 128)
        low, high = q & 15, q >> 4
        ql = (low[..., :64] | (low[..., 64:] << 4)).reshape(rows, blocks, 128)
        qh = (high[..., :32] | (high[..., 32:64] << 2) | (high[..., 64:96] << 4) | (high[..., 96:] << 6))
        parts = [ql.numpy(), qh.reshape(rows, blocks, 64).numpy(), ints["sc"].to(torch.int8).numpy().view(np.uint8),
                 half_bytes(ints["d"])]
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(rows, -1)), TYPES[qw.bits]
