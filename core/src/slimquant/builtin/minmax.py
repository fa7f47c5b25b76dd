"""`minmax`: round-to-nearest weights and calibrated activation ranges.

Weights: per-tensor, per-channel or per-group min-max scales (optionally a grid search that shrinks each
range to minimise the rounding error), 2-8 bits, symmetric or not.
Activations (static): act_method 1 = running min/max; 2 = histogram with a searched clipping range;
3 = per Linear, whichever of the two gives the lower output error of the quantized Linear on sampled
calibration tokens. Dynamic per-token activations need no statistics.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from slimquant.config.scheme import Strategy
from slimquant.errors import CalibrationError
from slimquant.hookspecs import hookimpl
from slimquant.quant.actparams import ActQParams
from slimquant.quant.math import fake_quantize, range_to_qparams, round_to_nearest, search_clip_ratio, signed_scale
from slimquant.quant.observers import Histogram, MinMax, TokenSample
from slimquant.roles import ActivationQuantizer, WeightQuantizer

log = logging.getLogger(__name__)


class MinMaxConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["minmax"] = "minmax"
    act_method: Literal[1, 2, 3] = Field(1, description="1 min-max, 2 histogram search, 3 automatic mix")
    clip_search: bool = Field(False, description="grid-search each weight group's range (MSE) instead of min-max")
    histogram_bins: int = Field(2048, ge=64)
    sample_tokens: int = Field(2048, ge=16, description="tokens kept per Linear to choose ranges (act_method 3)")


class MinMaxPlugin(WeightQuantizer, ActivationQuantizer):
    name = "minmax"
    Config = MinMaxConfig
    requires_calibration_data = False  # weights need none; static activation ranges come from `observes`
    accepts_weight_grid = True  # rounds onto another plugin's grid (ctx.grid) when the plan has one
    distributed = True  # its activation ranges are Statistics (min/max over processes)
    row_parallel = True  # each row (or group) rounds alone: a process rounds its block (ctx.row_block)
    aliases = {"msmodelslim.w_method": "MinMax"}

    def __init__(self, config: MinMaxConfig):
        self.config = config

    @hookimpl
    def check(self, plan, name, shape):
        act = plan.scheme.activations
        if (plan.act_algorithm == self.name and act is not None and act.strategy == Strategy.CHANNEL
                and self.config.act_method != 1):
            return [f"activations.strategy: minmax.act_method={self.config.act_method} searches one per-tensor "
                    "range; use act_method 1 with per-channel activations"]
        return None

    # -- weights ----------------------------------------------------------------------------------------

    @hookimpl
    def quantize_weight(self, ctx, name, module, args):
        w = module.weight.detach()[ctx.row_block(name)].float()
        grid = ctx.grid(name)
        ratio = 1.0
        if self.config.clip_search and args.strategy != Strategy.TENSOR:
            group_size = args.group_size if args.strategy == Strategy.GROUP else None
            group_size = group_size if grid is None else grid.group_size(args)
            ratio = search_clip_ratio(w, args.bits, args.symmetric, group_size, weight_grid=grid,
                                      signed=signed_scale(args))
        return round_to_nearest(w, args, ratio, grid)

    # -- activations ------------------------------------------------------------------------------------

    def observes(self, plan) -> bool:
        act = plan.scheme.activations
        return plan.act_algorithm == self.name and act is not None and not act.dynamic

    @hookimpl
    def observe(self, ctx, name, module, inputs, output):
        act = ctx.plan(name).scheme.activations
        stats = ctx.state(self.name).setdefault(name, self._new_stats(act))
        for observer in stats.values():
            observer.update(inputs)

    def _new_stats(self, act) -> dict:
        per_channel = act.strategy == Strategy.CHANNEL
        stats = {"minmax": MinMax(per_channel)}
        if self.config.act_method in (2, 3):
            stats["histogram"] = Histogram(self.config.histogram_bins)
        if self.config.act_method == 3:
            stats["sample"] = TokenSample(self.config.sample_tokens)
        return stats

    def _stats_for(self, ctx, name) -> dict:
        state = ctx.state(self.name)
        if name in state:
            return state[name]
        reached = [state[s] for s in ctx.siblings(name) if s in state]
        if not reached:
            raise CalibrationError(f"{name}: no calibration token reached this Linear (nor its sibling experts); "
                                   "add calibration samples or leave it in float")
        log.info("%s saw no calibration token; using the ranges of its %d sibling experts", name, len(reached))
        merged = {key: MinMax(obs.per_channel) if key == "minmax" else Histogram(self.config.histogram_bins)
                  for key, obs in reached[0].items() if key != "sample"}
        for stats in reached:
            for key, obs in merged.items():
                obs.merge(stats[key])
        return merged

    @hookimpl
    def quantize_act(self, ctx, name, module, args):
        if args.dynamic:
            return ActQParams(args.bits, args.symmetric, dynamic=True)
        stats = self._stats_for(ctx, name)
        candidates = {"minmax": (stats["minmax"].min, stats["minmax"].max)}
        if "histogram" in stats:
            lo, hi = stats["histogram"].search_range(args.bits, args.symmetric)
            candidates["histogram"] = (torch.tensor(lo), torch.tensor(hi))
        if self.config.act_method == 2:
            chosen = "histogram"
        elif self.config.act_method == 3 and "sample" in stats:
            chosen = self._lowest_output_error(ctx, name, module, args, candidates, stats["sample"].rows)
        else:
            chosen = "minmax"
        lo, hi = candidates[chosen]
        scale, zero = range_to_qparams(lo.float(), hi.float(), args.bits, args.symmetric)
        device = module.weight.device
        return ActQParams(args.bits, args.symmetric, False, scale.reshape(-1).to(device),
                          None if zero is None else zero.reshape(-1).to(device))

    def _lowest_output_error(self, ctx, name, module, args, candidates, rows) -> str:
        w_q = ctx.qweights[name].dequantize(torch.float32).to(rows.device)
        reference = F.linear(rows.float(), module.weight.float())
        errors = {}
        for key, (lo, hi) in candidates.items():
            scale, zero = range_to_qparams(lo.float().to(rows.device), hi.float().to(rows.device), args.bits,
                                           args.symmetric)
            x_q = fake_quantize(rows.float(), scale, zero, args.bits)
            errors[key] = float((F.linear(x_q, w_q) - reference).pow(2).mean())
        chosen = min(errors, key=errors.get)
        log.debug("%s: act range errors %s -> %s", name, errors, chosen)
        return chosen

