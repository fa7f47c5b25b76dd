"""`smoothquant`: migrate activation outliers into the weights (Xiao et al., 2022, arXiv:2211.10438).

Per input channel c of the Linears a norm feeds, s[c] = max|X[:, c]|^alpha / max|W[:, c]|^(1 - alpha), the weight
maximum taken over all of those Linears. The norm's weight and bias are divided by s and the Linears' input columns
multiplied by it: the float layer is unchanged, its activations are flatter. With `smooth_all_linears` (the
default) the exact Linear -> Linear pairs are smoothed too (v_proj -> o_proj, sharing each kv head's factors across
its query heads under grouped-query attention; up_proj -> down_proj through the gated activation), which is where
the largest outliers of most LLMs sit: o_proj and down_proj inputs have no norm in front of them (SmolLM2 W8A8
static: 27.75 with norms only, 22.95 with all pairs).
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from slimquant.sdk import Smoother, hookimpl, smoothing

log = logging.getLogger(__name__)


class SmoothQuantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["smoothquant"] = "smoothquant"
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="migration strength: 0 = none, 1 = all onto the weights")
    smooth_all_linears: bool = Field(True, description="also v_proj -> o_proj, up_proj -> down_proj; False: norms")
    sampler: Literal["max", "ema"] = Field("max", description="max: running max over batches; ema: moving average")
    ema_decay: float = Field(0.98, gt=0.0, lt=1.0)
    skip: list[str] = Field(default_factory=list, description="leave alone subgraphs touching these names (globs)")


class SmoothQuantPlugin(Smoother):
    name = "smoothquant"
    Config = SmoothQuantConfig
    requires_calibration_data = True  # its scales come from activation ranges
    distributed = True  # its channel ranges are Statistics (min/max over processes)
    aliases = {"msmodelslim.anti_method": "m1", "paddleslim": "Smooth"}

    def __init__(self, config: SmoothQuantConfig):
        self.config = config

    def observes(self, plan) -> bool:
        return False  # it observes in its own smoothing pass only

    @hookimpl
    def observe(self, ctx, name, module, inputs, output):
        smoothing.record_range(ctx, self.name, name, inputs, self.config.sampler, self.config.ema_decay)

    @hookimpl
    def smooth(self, ctx):
        ranges = ctx.state(self.name)
        guard = smoothing.Guard(ctx, self.name)
        for unit in smoothing.units(ctx, self.config.smooth_all_linears, self.config.skip):
            span = unit.input_span(ranges)
            if span is None:  # none of its Linears is quantized: nothing to gain
                continue
            act = smoothing.absmax(span)
            s = smoothing.migration_scales(act, unit.weight_absmax(), self.config.alpha)
            if guard.apply(unit, lambda unit=unit, s=s: smoothing.scale_unit(unit, s)):
                log.debug("%s: %s scales %.3g..%.3g", self.name, unit.source, float(s.min()), float(s.max()))
        guard.report()
