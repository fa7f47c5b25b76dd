"""`hqq`: data-free half-quadratic quantization of each Linear's weight (slimquant_hqq.solver)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from slimquant.sdk import Feature, WeightQuantizer, hookimpl
from slimquant_hqq.solver import HQQSettings, hqq_quantize


class HQQConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["hqq"] = "hqq"
    iters: int = Field(20, ge=1, description="solver iterations per Linear")
    lp_norm: float = Field(0.7, gt=0, lt=1, description="p of the lp error minimised (p < 1: robust to outliers)")
    beta: float = Field(10.0, gt=0, description="initial weight of the quadratic coupling term")
    kappa: float = Field(1.01, ge=1, description="beta grows by this factor every iteration")
    early_stop: bool = Field(True, description="stop when the mean absolute error stops improving")
    optimize_scale: bool = Field(False, description="also refit each group's step by least squares")
    round_zero: bool = Field(True, description="start the solver from rounded zero points")


class HQQPlugin(WeightQuantizer):
    name = "hqq"
    Config = HQQConfig
    requires_calibration_data = False
    aliases = {"msmodelslim.w_method": "HQQ"}

    def __init__(self, config: HQQConfig):
        self.config = config

    def output_features(self, plan) -> dict:
        return {Feature.FRACTIONAL_ZEROS: "its zero points are optimized, not rounded"}

    @hookimpl
    def check(self, plan, name, shape):
        if plan.weight_algorithm != self.name:
            return None
        weights, problems = plan.scheme.weights, []
        if weights.symmetric:
            problems.append("weights.symmetric: hqq optimizes zero points; use symmetric: false")
        if weights.strategy == "tensor":
            problems.append("weights.strategy: hqq quantizes per group or per channel, not per tensor")
        return problems

    @hookimpl
    def quantize_weight(self, ctx, name, module, args):
        c = self.config
        settings = HQQSettings(bits=args.bits, group_size=args.group_size if args.strategy == "group" else None,
                               iters=c.iters, lp_norm=c.lp_norm, beta=c.beta, kappa=c.kappa,
                               early_stop=c.early_stop, optimize_scale=c.optimize_scale,
                               round_zero=c.round_zero)
        return hqq_quantize(module.weight, settings)
