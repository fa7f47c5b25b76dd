"""`kquant`: llama.cpp's K-quant grids (slimquant_gguf.kquants) for the weight algorithms that accept a grid.

- `algorithms: [kquant]`: every weight rounded to nearest on the grid; no calibration data.
- `algorithms: [kquant, gptq]` with gptq's `static_groups: true`: GPTQ chooses the codes on the grid.

`weights.bits` picks the type: 4 is Q4_K, 6 is Q6_K, so an override with bits 6 puts some Linears in Q6_K (as
llama.cpp's Q4_K_M does). The type fixes the groups (32, 16) and the symmetry (Q4_K has minimums, Q6_K none):
`weights.symmetric` is ignored and `group_size`, when given, must be the type's. A Linear's input channels must be
whole 256-column super-blocks; llama.cpp itself falls back to Q5_0 / Q8_0 blocks for other Linears, which an
override to a 32-group uniform scheme gives here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from slimquant.sdk import Grid, WeightQuantizer, hookimpl, round_to_nearest
from slimquant_gguf.kquants import GRIDS, SUPER_BLOCK


class KQuantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["kquant"] = "kquant"


class KQuantPlugin(Grid, WeightQuantizer):
    name = "kquant"
    Config = KQuantConfig
    holds = frozenset()  # K-quant groups share their super-block's d: scales chosen group by group cannot be held

    def __init__(self, config: KQuantConfig | None = None):
        self.config = config or KQuantConfig()

    @hookimpl
    def check(self, plan, name, shape):
        if plan.grid_algorithm != self.name:
            return None
        weights, problems = plan.scheme.weights, []
        grid = GRIDS.get(weights.bits)
        if grid is None:
            return [f"weights.bits: kquant has Q4_K (bits: 4) and Q6_K (bits: 6), not {weights.bits}-bit"]
        explicit = "strategy" in weights.model_fields_set or weights.group_size is not None
        if explicit and (weights.strategy != "group" or weights.group_size != grid.group):
            problems.append(f"weights.group_size: {grid.type_name} has groups of {grid.group}; set group_size: "
                            f"{grid.group} or leave it out")
        if weights.scale_dtype != "float32":
            problems.append(f"weights.scale_dtype: {grid.type_name}'s scales are float16 d times integers, which "
                            "float16 rounding would move; leave scale_dtype float32")
        if shape is not None and shape[1] % SUPER_BLOCK:
            problems.append(f"weights: {name} has {shape[1]} input channels, not whole {SUPER_BLOCK}-column "
                            f"super-blocks of {grid.type_name}; give it a uniform scheme with an override (llama.cpp "
                            "uses Q5_0 or Q8_0 there)")
        return problems

    @hookimpl
    def weight_grid(self, args):
        return GRIDS[args.bits]()

    @hookimpl
    def quantize_weight(self, ctx, name, module, args):
        return round_to_nearest(module.weight, args, grid=ctx.grid(name) or self.weight_grid(args))
