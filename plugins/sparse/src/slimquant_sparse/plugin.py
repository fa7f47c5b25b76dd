"""`sparse`: SparseGPT pruning fused with quantization (or magnitude pruning + rounding), with 16-bit outliers.

The Hessian of each Linear's inputs is gathered in `observe` (as for GPTQ); `quantize_weight` prunes and rounds in
one sweep (`slimquant_sparse.sparsegpt`) and returns codes whose zeros are the mask, marked with the pattern
(`QuantizedWeight.sparsity`) and the outliers (`QuantizedWeight.outliers`).
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from slimquant.sdk import Feature, Strategy, WeightQuantizer, accumulate_shared, hookimpl, signed_scale
from slimquant_sparse.magnitude import magnitude_prune_quantize
from slimquant_sparse.settings import SparseSettings
from slimquant_sparse.sparsegpt import sparsegpt_quantize

log = logging.getLogger(__name__)


class SparseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["sparse"] = "sparse"
    method: Literal["sparsegpt", "magnitude"] = Field("sparsegpt", description="magnitude: prune the smallest |w|, "
                                                      "round to nearest (no data; the baseline)")
    sparsity: float = Field(0.5, ge=0, lt=1, description="unstructured: fraction of weights pruned")
    pattern: str = Field("unstructured", description="'unstructured', or 'N:M' (e.g. 2:4, 4:8): at most N nonzero "
                                                     "weights in every M consecutive input columns")
    blocksize: int = Field(128, gt=0, description="columns pruned and updated together")
    percdamp: float = Field(0.01, gt=0, lt=1, description="damping added to H, as a fraction of mean(diag H)")
    fraction: float = Field(0.0, ge=0, le=0.1, description="at most this fraction of each Linear's weights kept "
                                                           "as float16 outliers (0: none)")
    sigma_factor: float = Field(3.0, gt=0, description="an outlier lies over this many standard deviations from "
                                                       "its output row's mean")

    @field_validator("pattern")
    @classmethod
    def _n_m(cls, pattern: str) -> str:
        if pattern == "unstructured":
            return pattern
        n, _, m = pattern.partition(":")
        if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
            raise ValueError(f"must be 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4'), got {pattern!r}")
        return f"{int(n)}:{int(m)}"


class SparsePlugin(WeightQuantizer):
    name = "sparse"
    Config = SparseConfig
    requires_calibration_data = True  # SparseGPT's Hessians (magnitude needs none: see __init__)
    aliases = {"msmodelslim.sparse": "co_sparse"}

    def __init__(self, config: SparseConfig):
        self.config = config
        self.requires_calibration_data = config.method == "sparsegpt"

    def output_features(self, plan) -> dict:
        features = {Feature.SPARSITY: f"pattern: {self.config.pattern}"}
        if self.config.fraction > 0:
            features[Feature.OUTLIERS] = f"fraction: {self.config.fraction}"
        return features

    @hookimpl
    def check(self, plan, name, shape):
        if plan.weight_algorithm != self.name or shape is None or self.config.pattern == "unstructured":
            return None
        m = int(self.config.pattern.split(":")[1])
        if shape[1] % m:
            return [f"pattern: {self.config.pattern} needs in_features divisible by {m}, but {name} has "
                    f"{shape[1]} input features (leave it out with ignore, or use 'unstructured')"]
        return None

    def observes(self, plan) -> bool:
        return plan.weight_algorithm == self.name and self.config.method == "sparsegpt"

    @hookimpl
    def observe(self, ctx, name, module, inputs, output):
        accumulate_shared(ctx.state(self.name), name, module.in_features, inputs)

    def settings(self, args) -> SparseSettings:
        c = self.config
        return SparseSettings(bits=args.bits, symmetric=args.symmetric, signed=signed_scale(args),
                              group_size=args.group_size if args.strategy == Strategy.GROUP else None,
                              per_tensor=args.strategy == Strategy.TENSOR, sparsity=c.sparsity, pattern=c.pattern,
                              blocksize=c.blocksize, percdamp=c.percdamp, fraction=c.fraction,
                              sigma_factor=c.sigma_factor)

    @hookimpl
    def quantize_weight(self, ctx, name, module, args):
        settings = self.settings(args)
        if self.config.method == "magnitude":
            return magnitude_prune_quantize(module.weight, settings)
        state = ctx.state(self.name)
        state.pop("last input", None)
        hessian = state.pop(name, None)
        if hessian is None or hessian.tokens == 0:  # e.g. an MoE expert the router never chose
            log.info("%s: no calibration token reached it; magnitude pruning instead of SparseGPT", name)
            return magnitude_prune_quantize(module.weight, settings)
        return sparsegpt_quantize(module.weight, hessian.hessian, settings, name)
