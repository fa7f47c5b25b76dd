"""Integer weight codes with their scales: what every weight algorithm returns and every exporter reads.

Codes are signed: a b-bit code lies in [-2^(b-1), 2^(b-1) - 1] for symmetric and asymmetric schemes alike,
so any 1-8 bit code fits int8. Dequantization is `(code - zero) * scale`, with the scale and zero of the
code's group; the zero point may be fractional (HQQ). On a codebook (non-uniform) grid such as NF4 it is
`codebook[code + 2^(b-1)] * scale`, with no zero point. `g_idx[i]` names the group of input channel i;
contiguous groups are `arange(in_features) // group_size` and the last group may be shorter than group_size.
The scales may themselves be stored quantized (`QuantizedScale`, bitsandbytes' double quantization): `scale` is
then exactly what those codes dequantize to, so memory and disk agree. A pruned weight (`sparsity`) has codes that
dequantize to exactly 0 where it was pruned; `outliers` (`slimquant.quant.outliers`) add a sparse 16-bit residual.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from slimquant.quant.outliers import WeightOutliers

if TYPE_CHECKING:
    from slimquant.quant.two_level import TwoLevelScale


def qrange(bits: int) -> tuple[int, int]:
    """The lowest and highest signed b-bit code: (-2^(bits-1), 2^(bits-1) - 1)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def effective_group_size(group_size: int | None, in_features: int) -> int:
    """The input channels per group of a Linear with `in_features` inputs: `group_size`, or all of them (one group
    per output channel) when it is None or 0. A group_size wider than the Linear makes one group: see num_groups."""
    return group_size or in_features


def contiguous_g_idx(in_features: int, group_size: int | None, device=None) -> torch.Tensor:
    """The group of each input channel for contiguous groups: `arange(in_features) // group size` (int32)."""
    return torch.arange(in_features, device=device, dtype=torch.int32) // effective_group_size(group_size, in_features)


def num_groups(in_features: int, group_size: int | None) -> int:
    """How many groups (scales per output row) `in_features` inputs make; the last group may be shorter."""
    return -(-in_features // effective_group_size(group_size, in_features))


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int | None,
                     g_idx: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                     codebook: torch.Tensor | None = None) -> torch.Tensor:
    """`(code - zero) * scale` per group, or `codebook[code] * scale` on a codebook grid, without checking the
    codes (FakeQuantLinear calls it on every forward)."""
    rows, cols = codes.shape
    if codebook is None:
        w = codes.to(scale.dtype)
    else:
        w = codebook.to(scale.dtype)[(codes.to(torch.int64) - qrange(len(codebook).bit_length() - 1)[0])]
    groups = scale.shape[1]
    if groups == 1 or (g_idx is None and groups * group_size == cols):  # one or equal contiguous groups: a view
        grouped = w.view(rows, groups, cols // groups)
        if zero is not None:
            grouped.sub_(zero.unsqueeze(-1))
        grouped.mul_(scale.unsqueeze(-1))
        return w.to(dtype)
    idx = g_idx.long() if g_idx is not None else contiguous_g_idx(cols, group_size, codes.device).long()
    if zero is not None:
        w.sub_(zero[:, idx])
    return w.mul_(scale[:, idx]).to(dtype)


def check_sparsity(weight: torch.Tensor, pattern: str) -> None:
    """Raise ValueError unless `weight` follows `pattern`: "unstructured" (anything) or "N:M" (at most N nonzeros in
    every M consecutive input columns of a row)."""
    if pattern == "unstructured":
        return
    n, _, m = pattern.partition(":")
    if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise ValueError(f"sparsity {pattern!r} is neither 'unstructured' nor 'N:M' with 0 < N < M")
    n, m = int(n), int(m)
    rows, cols = weight.shape
    if cols % m:
        raise ValueError(f"sparsity {pattern}: in_features {cols} is not a multiple of {m}")
    most = int((weight != 0).view(rows, cols // m, m).sum(-1).max()) if weight.numel() else 0
    if most > n:
        raise ValueError(f"sparsity {pattern}: a group of {m} input columns holds {most} nonzero weights")


@dataclass
class QuantizedScale:
    """Scales stored as 8-bit codes: scale = code * block_scale[block] + offset, the [out, groups] codes read in
    row-major order in blocks of `block_size` (the last block may be shorter)."""

    codes: torch.Tensor  # int8 [out, groups]
    block_scale: torch.Tensor  # float32 [ceil(out * groups / block_size)]
    offset: torch.Tensor  # float32 [1]
    block_size: int

    def __post_init__(self):
        blocks = -(-self.codes.numel() // self.block_size)
        if self.codes.dtype != torch.int8 or self.codes.dim() != 2:
            raise ValueError(f"scale codes must be 2-D int8, got {self.codes.dtype} {list(self.codes.shape)}")
        if tuple(self.block_scale.shape) != (blocks,) or tuple(self.offset.shape) != (1,):
            raise ValueError(f"scale blocks must be [{blocks}] and offset [1], got {list(self.block_scale.shape)} "
                             f"and {list(self.offset.shape)}")

    def dequantize(self) -> torch.Tensor:
        block = torch.arange(self.codes.numel(), device=self.codes.device) // self.block_size
        flat = self.codes.reshape(-1).float() * self.block_scale.float()[block] + self.offset.float()
        return flat.view(self.codes.shape)

    def to(self, device) -> QuantizedScale:
        return QuantizedScale(self.codes.to(device), self.block_scale.to(device), self.offset.to(device),
                              self.block_size)


@dataclass
class QuantizedWeight:
    """One Linear's quantized weight: what ``quantize_weight`` returns, what ``ctx.qweights[name]`` and
    ``FakeQuantLinear.qweight`` hold, and what an exporter reads. The module docstring gives the rules; the fields:

    - ``codes``: int8 ``[out, in]``, signed b-bit codes in ``qrange(bits)``;
    - ``scale``: float ``[out, groups]``, ``groups = num_groups(in, group_size)``; ``zero``: the same shape, or None
      when symmetric (``symmetric`` is ``zero is None``); a code stands for ``(code - zero) * scale``;
    - ``bits``; ``group_size``: input channels per group, None for one group per output channel
      (``effective_group_size`` gives the width either way);
    - ``g_idx``: int32 ``[in]``, each input channel's group, None for contiguous groups (``group_index()`` gives it
      either way; ``permuted_groups`` says whether it is other than contiguous);
    - ``codebook`` / ``codebook_name``: a codebook grid's 2^bits values (code c stands for
      ``codebook[c + 2^(bits-1)] * scale``, no zero) and its name;
    - ``scale_quant``: how ``scale`` is stored when quantized (``QuantizedScale``); ``two_level``: per-channel and
      per-group scales whose product is ``scale`` (``TwoLevelScale``);
    - ``sparsity``: ``"unstructured"`` or ``"N:M"`` when pruned; ``outliers``: a sparse 16-bit residual
      (``WeightOutliers``);
    - ``extras``: algorithm-specific tensors an exporter may save, by name.

    ``dequantize(dtype)`` gives the float weight (outliers included), ``dequantize_codes(dtype)`` the codes' part;
    ``shape`` is the codes' shape; ``to(device)`` moves every tensor. ``validate()`` checks the rules (run when it
    is built, and again by the runtime on what a plugin returns).
    """

    codes: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # float32 [out, groups]
    zero: torch.Tensor | None  # float32 [out, groups] (integer-valued) or None when symmetric
    bits: int
    group_size: int | None  # None: one group per output channel (per-channel)
    g_idx: torch.Tensor | None = None  # int32 [in]; None means contiguous groups
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # algorithm-specific tensors to save
    codebook: torch.Tensor | None = None  # float32 [2^bits]: code c stands for codebook[c + 2^(bits-1)] (NF4)
    scale_quant: QuantizedScale | None = None  # how `scale` is stored, when it is stored quantized
    outliers: WeightOutliers | None = None  # a sparse 16-bit residual added on dequantization
    sparsity: str | None = None  # the pattern the codes were pruned to: "unstructured" or "N:M" (zero codes are 0)
    two_level: TwoLevelScale | None = None  # scale = group_scale * channel_scale (W4A8_DYNAMIC, quant.two_level)
    codebook_name: str | None = None  # what the codebook's grid calls it ("nf4", "fp4"), written to the description

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that breaks the rules above. Run when it is built, and again by
        the runtime on what a plugin returns (whose fields may have been changed since)."""
        out_features, in_features = self.codes.shape
        groups = num_groups(in_features, self.group_size)
        if self.scale.shape != (out_features, groups):
            raise ValueError(f"scale shape {tuple(self.scale.shape)} != ({out_features}, {groups})")
        if self.zero is not None and self.zero.shape != self.scale.shape:
            raise ValueError(f"zero shape {tuple(self.zero.shape)} != scale shape {tuple(self.scale.shape)}")
        lo, hi = qrange(self.bits)
        if self.codes.dtype != torch.int8:
            raise ValueError(f"codes must be int8, got {self.codes.dtype}")
        if self.codes.numel() and (int(self.codes.min()) < lo or int(self.codes.max()) > hi):
            raise ValueError(f"codes outside the {self.bits}-bit range [{lo}, {hi}]")
        if not self.scale.is_floating_point() or (self.zero is not None and not self.zero.is_floating_point()):
            raise ValueError("scale and zero must be floating-point (a zero point may be fractional)")
        if self.codebook is not None:
            book = self.codebook
            if not book.is_floating_point() or tuple(book.shape) != (2 ** self.bits,):
                raise ValueError(f"codebook must be a float tensor of {2 ** self.bits} values for {self.bits}-bit "
                                 f"codes, got {book.dtype} {list(book.shape)}")
            if not torch.isfinite(book).all():
                raise ValueError("codebook holds NaN or Inf")
            if self.zero is not None:
                raise ValueError("a codebook grid has no zero point (its values are scaled, not shifted)")
        if self.scale_quant is not None:
            if tuple(self.scale_quant.codes.shape) != tuple(self.scale.shape):
                raise ValueError(f"scale codes shape {list(self.scale_quant.codes.shape)} != scale shape "
                                 f"{list(self.scale.shape)}")
            if not torch.equal(self.scale_quant.dequantize().to(self.scale), self.scale):
                raise ValueError("scale differs from what its stored codes (scale_quant) dequantize to")
        if self.two_level is not None:
            if tuple(self.two_level.group_scale.shape) != tuple(self.scale.shape):
                raise ValueError(f"second-level scale shape {list(self.two_level.group_scale.shape)} != scale shape "
                                 f"{list(self.scale.shape)}")
            if not torch.equal(self.two_level.dequantize().to(self.scale), self.scale):
                raise ValueError("scale differs from group_scale * channel_scale of its two-level scales")
        if self.outliers is not None:
            self.outliers.check((out_features, in_features))
        if self.sparsity is not None:
            check_sparsity(self.dequantize_codes(), self.sparsity)

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def permuted_groups(self) -> bool:
        """Whether g_idx orders the groups other than contiguously (GPTQ's act order)."""
        if self.g_idx is None:
            return False
        return not torch.equal(self.g_idx.cpu().to(torch.int32), contiguous_g_idx(self.shape[1], self.group_size))

    def group_index(self) -> torch.Tensor:
        """Each input channel's group (int64 [in]): g_idx, or the contiguous groups' when g_idx is None."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return contiguous_g_idx(self.codes.shape[1], self.group_size, self.codes.device).long()

    def dequantize_codes(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """What the codes alone stand for (without the outliers)."""
        return dequantize_codes(self.codes, self.scale, self.zero, self.group_size, self.g_idx, dtype, self.codebook)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.dequantize_codes(dtype)
        return w if self.outliers is None else self.outliers.add_to(w)

    def to(self, device) -> QuantizedWeight:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(
            codes=move(self.codes), scale=move(self.scale), zero=move(self.zero), bits=self.bits,
            group_size=self.group_size, g_idx=move(self.g_idx),
            extras={k: v.to(device) for k, v in self.extras.items()}, codebook=move(self.codebook),
            scale_quant=None if self.scale_quant is None else self.scale_quant.to(device),
            outliers=None if self.outliers is None else self.outliers.to(device), sparsity=self.sparsity,
            two_level=None if self.two_level is None else self.two_level.to(device),
            codebook_name=self.codebook_name,
        )
