"""The recipe's `budget` section: a size budget shared out among the Linears, each getting one candidate width."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slimquant.config.scheme import WeightArgs


class BudgetSpec(BaseModel):
    """avg_bits (weight bits per weight, scales included) or bytes (all budgeted Linears' weights and scales)."""

    model_config = ConfigDict(extra="forbid")

    avg_bits: float | None = Field(None, gt=0, le=32, allow_inf_nan=False,
                                   description="average stored bits per weight, scales included")
    bytes: int | None = Field(None, gt=0, description="stored size of the quantized Linears' weights and scales")
    candidates: list[WeightArgs] = Field(default_factory=list, validate_default=True,
                                         description="the weight arguments a Linear may get")
    method: Literal["proxy", "kl"] = Field(
        "proxy", description="proxy: input-Hessian error weighted by output gradients (one backward per sample); "
                             "kl: KL of the model output with only that Linear quantized (a forward per Linear and "
                             "candidate)")
    samples: int = Field(8, gt=0, description="calibration samples the sensitivity is measured on")

    @field_validator("candidates")
    @classmethod
    def _usable_candidates(cls, value: list[WeightArgs]) -> list[WeightArgs]:
        if not value:
            raise ValueError("give at least one candidate, e.g. [{bits: 4, group_size: 128}, {bits: 8}]")
        for i, args in enumerate(value):
            if args.channel_bits is not None:
                raise ValueError(f"candidate {i}: two-level scales (channel_bits) cannot be a budget candidate")
        if len(set(value)) != len(value):
            raise ValueError("the same candidate is listed twice")
        return value

    @model_validator(mode="after")
    def _one_budget(self) -> BudgetSpec:
        if (self.avg_bits is None) == (self.bytes is None):
            raise ValueError("give exactly one of `avg_bits` or `bytes`")
        narrowest = min(c.bits for c in self.candidates)
        if self.avg_bits is not None and self.avg_bits < narrowest:
            raise ValueError(f"avg_bits={self.avg_bits} is below the narrowest candidate ({narrowest} bits)")
        return self
