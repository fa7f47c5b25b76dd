"""The NF4 / FP4 weight grid: a codebook with one absmax scale per block of `group_size` input channels,
optionally double-quantized. The same grid serves `[nf4]` (round to nearest) and `[nf4, gptq]` (GPTQ's sweep)."""

from __future__ import annotations

from slimquant.quant.grid import CodebookGrid
from slimquant.quant.qweight import QuantizedScale
from slimquant_nf4.codebooks import CODEBOOKS
from slimquant_nf4.double_quant import double_quantize

DEFAULT_BLOCK = 64  # bitsandbytes' blocksize for 4-bit weights


class NF4Grid(CodebookGrid):
    def __init__(self, codebook: str = "nf4", double_quant: bool = False):
        super().__init__(CODEBOOKS[codebook].clone(), name=codebook)
        self.double_quant = double_quant

    def group_size(self, args) -> int | None:
        """The scheme's group; 64 when the scheme names neither a group nor a strategy (per channel when it says
        strategy: channel)."""
        if args.strategy == "group":
            return args.group_size
        return None if "strategy" in args.model_fields_set else DEFAULT_BLOCK

    def quantize_scales(self, scale) -> QuantizedScale | None:
        return double_quantize(scale) if self.double_quant else None
