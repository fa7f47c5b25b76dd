"""`gptq`: the Hessian of each Linear's inputs gathered in `observe`, the GPTQ sweep in `quantize_weight`."""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from slimquant.config.scheme import Strategy
from slimquant.errors import RecipeError
from slimquant.hookspecs import hookimpl
from slimquant.quant.hessian import HessianAccumulator
from slimquant.quant.math import quantize_weight_with
from slimquant_gptq.gptq import GPTQSettings, gptq_quantize, group_qparams

log = logging.getLogger(__name__)


class GPTQConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["gptq"] = "gptq"
    damp_percent: float = Field(0.01, gt=0, lt=1, description="damping added to H, as a fraction of mean(diag H)")
    block_size: int = Field(128, gt=0, description="columns updated together (lazy batch updates)")
    act_order: bool = Field(True, description="quantize columns in order of decreasing H[i, i] (desc_act)")
    static_groups: bool = Field(False, description="fix group scales before the sweep (no g_idx with act_order)")
    true_sequential: bool = Field(True, description="q/k/v, then o, then gate/up, then down, re-observing")
    mse: bool = Field(True, description="grid-search each group's clipping range instead of min-max")


class GPTQPlugin:
    name = "gptq"
    Config = GPTQConfig

    def __init__(self, config: GPTQConfig):
        self.config = config

    @property
    def true_sequential(self) -> bool:  # read by the runtime
        return self.config.true_sequential

    @hookimpl
    def observe(self, ctx, name, module, inputs, output):
        plan = ctx.plan(name)
        if ctx.phase != "quantize" or plan is None or plan.weight_algorithm != self.name:
            return
        state = ctx.state(self.name)
        if name not in state:
            state[name] = HessianAccumulator(module.in_features, device=inputs.device)
        state[name].add(inputs)

    @hookimpl
    def quantize_weight(self, ctx, name, module, args, algorithm):
        if algorithm != self.name:
            return None
        if args.strategy == Strategy.TENSOR:
            raise RecipeError(f"{name}: gptq quantizes weights per channel or per group, not per tensor")
        group_size = args.group_size if args.strategy == Strategy.GROUP else None
        c = self.config
        settings = GPTQSettings(bits=args.bits, symmetric=args.symmetric, group_size=group_size,
                                damp_percent=c.damp_percent, block_size=c.block_size, act_order=c.act_order,
                                static_groups=c.static_groups, mse=c.mse)
        hessian = ctx.state(self.name).pop(name, None)
        if hessian is None or hessian.tokens == 0:  # e.g. an MoE expert the router never chose
            log.info("%s: no calibration token reached it; rounding to nearest instead of GPTQ", name)
            w = module.weight.detach().float()
            scale, zero = group_qparams(w, settings, group_size)
            return quantize_weight_with(w, scale, zero, args.bits, group_size)
        return gptq_quantize(module.weight, hessian.hessian, settings, name)
