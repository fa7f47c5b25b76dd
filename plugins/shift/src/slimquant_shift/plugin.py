"""`shift`: Outlier Suppression+ (Wei et al., 2023, arXiv:2304.09145), channel-wise shifting and scaling.

Per input channel c of the Linears a norm feeds, z[c] = (max + min) / 2 of that channel over the calibration data.
The norm's output is moved by -z through its bias (RMSNorm-type norms get a bias) and W @ z is added to the bias of
each Linear reading it (a bias is created where missing): the float layer is unchanged and every channel's range
is centred on zero, so asymmetric outlier channels no longer stretch a per-tensor range. With `scale`, the
centred channels are then scaled as SmoothQuant does, on their half-ranges. `shift_all_linears` also shifts
v_proj -> o_proj (exact, since attention weights sum to one; the shift is shared by the query heads of a kv
head). up_proj -> down_proj is left alone: a shift does not pass through the gated activation.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from slimquant.sdk import Smoother, hookimpl, smoothing

log = logging.getLogger(__name__)


class ShiftConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["shift"] = "shift"
    shift_all_linears: bool = Field(False, description="also shift v_proj -> o_proj")
    scale: bool = Field(False, description="after shifting, SmoothQuant-scale the centred channels")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="migration strength of the optional scaling")
    sampler: Literal["max", "ema"] = Field("max", description="max: extremes over all batches; ema: moving average")
    ema_decay: float = Field(0.98, gt=0.0, lt=1.0)
    skip: list[str] = Field(default_factory=list, description="leave alone subgraphs touching these names (globs)")


class ShiftPlugin(Smoother):
    name = "shift"
    Config = ShiftConfig
    requires_calibration_data = True  # its scales come from activation ranges
    aliases = {"msmodelslim.anti_method": "m2", "paddleslim": "Shift"}

    def __init__(self, config: ShiftConfig):
        self.config = config
        self._told_gated = False

    def observes(self, plan) -> bool:
        return False  # it observes in its own smoothing pass only

    @hookimpl
    def observe(self, ctx, name, module, inputs, output):
        smoothing.record_range(ctx, self.name, name, inputs, self.config.sampler, self.config.ema_decay)

    @hookimpl
    def smooth(self, ctx):
        ranges = ctx.state(self.name)
        guard = smoothing.Guard(ctx, self.name)
        for unit in smoothing.units(ctx, self.config.shift_all_linears, self.config.skip):
            if unit.kind == "gated":
                if not self._told_gated:
                    log.info("shift: up_proj -> down_proj pairs are not shifted (a shift does not pass exactly "
                             "through the gated activation)")
                    self._told_gated = True
                continue
            span = unit.input_span(ranges)
            if span is not None:
                guard.apply(unit, lambda unit=unit, span=span: self._rewrite(unit, *span))
        guard.report()

    def _rewrite(self, unit: smoothing.Unit, lo, hi) -> None:
        smoothing.shift_unit(unit, (hi + lo) / 2)
        if self.config.scale:
            s = smoothing.migration_scales((hi - lo) / 2, unit.weight_absmax(), self.config.alpha)
            smoothing.scale_unit(unit, s)
