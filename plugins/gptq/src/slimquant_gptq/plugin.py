"""`gptq`: the Hessian of each Linear's inputs gathered in `observe`, the GPTQ sweep in `quantize_weight`."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from slimquant.sdk import (
    Feature,
    QuantizedWeight,
    Strategy,
    WeightQuantizer,
    accumulate_shared,
    hookimpl,
    quantize_weight_with,
    round_to_nearest,
    search_clip_ratio,
    signed_scale,
)
from slimquant_gptq.gptq import GPTQSettings, gptq_quantize, group_qparams

log = logging.getLogger(__name__)


class GPTQConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["gptq"] = "gptq"
    damp_percent: float = Field(0.01, gt=0, lt=1, description="damping added to H, as a fraction of mean(diag H)")
    block_size: int = Field(128, gt=0, description="columns updated together (lazy batch updates)")
    act_order: bool = Field(True, description="quantize columns in order of decreasing H[i, i] (desc_act)")
    static_groups: bool = Field(False, description="fix group scales before the sweep (no g_idx with act_order)")
    true_sequential: bool = Field(False, description="q/k/v, then o, then gate/up, then down, re-observing (off: "
                                  "SmolLM2 W4A16 g64 23.56 vs 23.79 on, and ~30% faster)")
    mse: bool = Field(True, description="grid-search each group's clipping range instead of min-max")


class GPTQPlugin(WeightQuantizer):
    name = "gptq"
    Config = GPTQConfig
    requires_calibration_data = True  # the Hessian of each Linear's inputs
    accepts_weight_grid = True  # [nf4, gptq]: GPTQ's error feedback onto the plan's grid (ctx.grid)
    distributed = True  # its Hessians are Statistics: summed over processes
    row_parallel = True  # rows are independent given H: each process sweeps its block (ctx.row_block)
    aliases = {"msmodelslim.w_method": "GPTQ"}

    def __init__(self, config: GPTQConfig):
        self.config = config
        self.sequential = config.true_sequential

    @hookimpl
    def check(self, plan, name, shape):
        if plan.weight_algorithm == self.name and plan.scheme.weights.strategy == Strategy.TENSOR:
            return ["weights.strategy: gptq quantizes weights per channel or per group, not per tensor"]
        return None

    def observes(self, plan) -> bool:
        return plan.weight_algorithm == self.name

    def output_features(self, plan) -> dict:
        features = {}
        if not self.config.static_groups:
            features[Feature.SWEEP_GROUPS] = "static_groups: false"
            if self.config.act_order and plan.scheme.weights.strategy == Strategy.GROUP:
                features[Feature.PERMUTED_GROUPS] = "act_order: true with static_groups: false"
        return features

    def linear_cost(self, rows: int, cols: int) -> float:
        """Work of one sweep, in units of one weight's share of it: the sweep and clip search over every weight,
        the fixed steps of each column (~200 weights' worth on a CPU) and the inverse Hessian factor (~n^3 / 3000);
        measured on SmolLM2's Linears."""
        return rows * cols + 200 * cols + cols**3 / 3000

    @hookimpl
    def observe(self, ctx, name, module, inputs, output):
        accumulate_shared(ctx.state(self.name), name, module.in_features, inputs)

    @hookimpl
    def quantize_weight(self, ctx, name, module, args):
        grid = ctx.grid(name)
        group_size = args.group_size if args.strategy == Strategy.GROUP else None
        group_size = group_size if grid is None else grid.group_size(args)
        c = self.config
        settings = GPTQSettings(bits=args.bits, symmetric=args.symmetric, group_size=group_size,
                                damp_percent=c.damp_percent, block_size=c.block_size, act_order=c.act_order,
                                static_groups=c.static_groups, mse=c.mse, signed=signed_scale(args))
        state = ctx.state(self.name)
        state.pop("last input", None)
        done = state.setdefault("quantized with a sibling", {})
        if name in done:
            return done.pop(name)
        hessian = state.pop(name, None)
        weight = module.weight.detach()[ctx.row_block(name)]  # this process's rows (all of them in one process)
        if hessian is None or hessian.tokens == 0:  # e.g. an MoE expert the router never chose
            log.info("%s: no calibration token reached it; rounding to nearest instead of GPTQ", name)
            w = weight.float()
            if grid is not None:
                ratio = search_clip_ratio(w, args.bits, True, group_size, weight_grid=grid) if c.mse else 1.0
                return round_to_nearest(w, args, ratio, grid)
            scale, zero = group_qparams(w, settings, group_size)
            return quantize_weight_with(w, scale, zero, args.bits, group_size)
        siblings = [] if grid is not None else _siblings(ctx, state, name, hessian, args)
        if not siblings:
            return gptq_quantize(weight, hessian.hessian, settings, name, grid)
        # Linears reading one input (q/k/v, gate/up) share H, and GPTQ treats rows independently given H: one sweep
        # over their stacked rows gives each the codes it would get alone, with a third of the column loops.
        for sibling in siblings:
            state.pop(sibling)
        blocks = [weight, *(ctx.module(n).weight.detach()[ctx.row_block(n)] for n in siblings)]
        result = gptq_quantize(torch.cat(blocks), hessian.hessian, settings, name, grid)
        parts = split_rows(result, [len(b) for b in blocks])
        done.update(zip(siblings, parts[1:], strict=True))
        return parts[0]


def _siblings(ctx, state: dict, name: str, hessian, args) -> list[str]:
    """The Linears still to quantize that share `name`'s Hessian (the same input) and its weight arguments."""
    return [n for n, h in state.items() if h is hessian and n != name and ctx.plan(n) is not None
            and ctx.plan(n).weight_algorithm == ctx.plan(name).weight_algorithm and ctx.plan(n).scheme.weights == args]


def split_rows(qweight: QuantizedWeight, sizes: list[int]) -> list[QuantizedWeight]:
    """A QuantizedWeight of stacked Linears cut back into one per Linear (rows in `sizes`)."""
    pieces = zip(qweight.codes.split(sizes), qweight.scale.split(sizes),
                 [None] * len(sizes) if qweight.zero is None else qweight.zero.split(sizes), strict=True)
    return [QuantizedWeight(codes=c.contiguous(), scale=sc.contiguous(), zero=None if z is None else z.contiguous(),
                            bits=qweight.bits, group_size=qweight.group_size, g_idx=qweight.g_idx)
            for c, sc, z in pieces]
