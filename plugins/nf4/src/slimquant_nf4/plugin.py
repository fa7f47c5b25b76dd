"""`nf4`: bitsandbytes' 4-bit formats (NF4, FP4) as a slimquant weight grid, data-free on its own.

- `algorithms: [nf4]`: every weight rounded to the nearest codebook value of its block's absmax scale, as
  bitsandbytes' quantize_4bit does; no calibration data.
- `algorithms: [nf4, gptq]`: nf4 provides the grid (`weight_grid`), GPTQ chooses the codes on it.

Scheme: `weights.bits` must be 4; `weights.symmetric` is ignored (a codebook grid has no zero point, so the W4A16
preset's symmetric: false works too); the block is `weights.group_size`, 64 when the scheme names no group,
per output channel with `strategy: channel`; not per tensor.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from slimquant.sdk import Feature, Grid, WeightQuantizer, hookimpl, round_to_nearest
from slimquant_nf4.grid import NF4Grid


class NF4Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["nf4"] = "nf4"
    codebook: Literal["nf4", "fp4"] = Field("nf4", description="NormalFloat4 (QLoRA) or bitsandbytes' FP4 (e2m1)")
    double_quant: bool = Field(False, description="store the absmax scales as 8-bit codes in blocks of 256 "
                                                  "(bitsandbytes' compress_statistics / QLoRA's double quantization)")


class NF4Plugin(Grid, WeightQuantizer):
    name = "nf4"
    Config = NF4Config
    requires_calibration_data = False
    aliases = {"msmodelslim.w_method": "NF4"}

    def __init__(self, config: NF4Config):
        self.config = config

    def output_features(self, plan) -> dict:
        features = {Feature.CODEBOOK: f"codebook: {self.config.codebook}"}
        if self.config.double_quant:
            features[Feature.QUANTIZED_SCALES] = "double_quant: true"
        return features

    @hookimpl
    def check(self, plan, name, shape):
        weights, problems = plan.scheme.weights, []
        if weights.bits != 4:
            problems.append(f"weights.bits: {self.config.codebook} is a 4-bit codebook; set bits: 4 "
                            f"(got {weights.bits})")
        if weights.strategy == "tensor":
            problems.append("weights.strategy: nf4 scales per block (group) or per channel, not per tensor")
        if self.config.double_quant and weights.scale_dtype == "float16":
            problems.append("weights.scale_dtype: double_quant stores the scales as 8-bit codes; "
                            "leave scale_dtype float32")
        return problems

    @hookimpl
    def weight_grid(self, args):
        return NF4Grid(self.config.codebook, self.config.double_quant)

    @hookimpl
    def quantize_weight(self, ctx, name, module, args):
        return round_to_nearest(module.weight, args, grid=ctx.grid(name) or self.weight_grid(args))
