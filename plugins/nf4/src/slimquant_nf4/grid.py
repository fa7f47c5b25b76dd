"""The NF4 / FP4 weight grid: a codebook with one absmax scale per block of `group_size` input channels,
optionally double-quantized. The same grid serves `[nf4]` (round to nearest) and `[nf4, gptq]` (GPTQ's sweep)."""

from __future__ import annotations

from slimquant.sdk import CodebookGrid, QuantizedScale
from slimquant_nf4.codebooks import CODEBOOKS
from slimquant_nf4.double_quant import double_quantize
from slimquant_nf4.nearest import Lookup, absmax_codes, nearest_codes

DEFAULT_BLOCK = 64  # bitsandbytes' blocksize for 4-bit weights


class NF4Grid(CodebookGrid):
    def __init__(self, codebook: str = "nf4", double_quant: bool = False):
        super().__init__(CODEBOOKS[codebook].clone(), name=codebook)
        self.double_quant = double_quant
        self.lookup = Lookup.of(self)

    def group_size(self, args) -> int | None:
        """The scheme's group; 64 when the scheme names neither a group nor a strategy (per channel when it says
        strategy: channel)."""
        if args.strategy == "group":
            return args.group_size
        return None if "strategy" in args.model_fields_set else DEFAULT_BLOCK

    def quantize_scales(self, scale) -> QuantizedScale | None:
        return double_quantize(scale) if self.double_quant else None

    def round_to_nearest(self, w, group_size, clip_ratio=1.0):
        """The core's scales and codes; where the compiled kernel applies (no clipping, no double quantization) it
        finds both in one pass."""
        fused = None
        if not self.double_quant and isinstance(clip_ratio, float) and clip_ratio == 1.0:
            fused = absmax_codes(w.detach().float(), group_size, self.lookup)
        if fused is None:
            return super().round_to_nearest(w, group_size, clip_ratio)
        scale, codes = fused
        return self.quantized_weight(codes, scale, None, group_size)

    def quantize(self, w, scale, zero):
        """The core's codes, from the compiled kernel where it applies."""
        codes = nearest_codes(w, scale, self.lookup)
        return super().quantize(w, scale, zero) if codes is None else codes
