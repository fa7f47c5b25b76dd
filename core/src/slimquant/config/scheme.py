"""Quantization arguments for weights and activations, and the named scheme presets."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Strategy(StrEnum):
    """What one scale spans: the whole tensor, an output channel (or input channel, for activations), a group of
    input channels (weights), or a token (dynamic activations)."""

    TENSOR = "tensor"
    CHANNEL = "channel"
    GROUP = "group"
    TOKEN = "token"


class WeightArgs(BaseModel):
    """How a Linear's weight is quantized. The strategy follows from group_size when not given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(8, ge=1, le=8, description="integer bits per weight, 1 to 8 (1: asymmetric only)")
    symmetric: bool = True
    symmetric_scale: Literal["signed", "absmax"] = Field(
        "signed", description="symmetric weights: 'signed' scales each group by its weight of largest magnitude, sign "
                              "kept, over -2^(bits-1), so that weight is code -2^(bits-1) and every code is used "
                              "(negative where that weight is positive); 'absmax' by "
                              "max|w| / (2^(bits-1) - 1), positive, code -2^(bits-1) unused")
    strategy: Strategy | None = None
    group_size: int | None = Field(None, description="input channels per scale; the last group may be shorter")
    channel_bits: int | None = Field(
        None, ge=2, le=8, description="two-level scales (msModelSlim W4A8_DYNAMIC per group): a per-channel scale for "
                                      "channel_bits integers, and per group a scale on those (weight_scale_second)")
    scale_dtype: Literal["float32", "float16"] = Field(
        "float32", description="float16: after quantizing, round each scale so that a format storing float16 scale "
                               "and float16 offset (scale * unsigned zero) holds it exactly")

    @model_validator(mode="before")
    @classmethod
    def _group_size_must_be_positive_int(cls, data):
        if isinstance(data, dict) and "group_size" in data:
            g = data["group_size"]
            if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g <= 0):
                raise ValueError(f"group_size must be a positive integer (leave it out, or null, for per-channel), "
                                 f"got {g!r}")
        return data

    @model_validator(mode="after")
    def _infer_strategy(self) -> WeightArgs:
        strategy = self.strategy
        if strategy is None:
            strategy = Strategy.GROUP if self.group_size else Strategy.CHANNEL
            object.__setattr__(self, "strategy", strategy)
        if strategy == Strategy.GROUP and not self.group_size:
            raise ValueError("strategy 'group' needs a group_size")
        if strategy != Strategy.GROUP and self.group_size:
            raise ValueError(f"group_size={self.group_size} only applies to strategy 'group', not '{strategy.value}'")
        if strategy == Strategy.TOKEN:
            raise ValueError("weights cannot be quantized per token; use tensor, channel or group")
        if self.bits == 1 and self.symmetric:
            raise ValueError("1-bit weights have two levels, min and max: set symmetric: false")
        if self.channel_bits is not None:
            if strategy != Strategy.GROUP or not self.symmetric or self.channel_bits <= self.bits:
                raise ValueError(f"channel_bits={self.channel_bits}: two-level scales are for symmetric per-group "
                                 f"weights of fewer bits ({self.bits}-bit here)")
        return self


class ActArgs(BaseModel):
    """How a Linear's input activations are quantized: static (calibrated) or dynamic (per token at run time)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(8, ge=2, le=8, description="integer bits per activation, 2 to 8")
    symmetric: bool = False
    strategy: Strategy = Strategy.TENSOR
    dynamic: bool = False

    @model_validator(mode="after")
    def _check(self) -> ActArgs:
        if self.strategy == Strategy.GROUP:
            raise ValueError("activations cannot be quantized per group; use tensor, channel or token")
        if self.dynamic and self.strategy != Strategy.TOKEN:
            raise ValueError("dynamic activation quantization is per token: set strategy 'token'")
        if self.strategy == Strategy.TOKEN and not self.dynamic:
            raise ValueError("per-token activation scales only exist at run time: set dynamic: true")
        return self


class Scheme(BaseModel):
    """Weight arguments plus optional activation arguments (None = weight-only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: WeightArgs
    activations: ActArgs | None = None

    @model_validator(mode="after")
    def _w4a8_dynamic_has_two_level_groups(self) -> Scheme:
        """msModelSlim's W4A8_DYNAMIC per group: int4 groups on a per-channel int8 level (weight_scale_second)."""
        w, a = self.weights, self.activations
        if (self.type_name == "W4A8_DYNAMIC" and w.strategy == Strategy.GROUP and w.symmetric
                and w.channel_bits is None and w.scale_dtype == "float32"):
            object.__setattr__(self, "weights", w.model_copy(update={"channel_bits": a.bits}))
        return self

    @property
    def type_name(self) -> str:
        """The msModelSlim tensor type: W8A16, W4A16, W8A8, W8A8_DYNAMIC, W4A8_DYNAMIC, ..."""
        w = self.weights.bits
        if self.activations is None:
            return f"W{w}A16"
        suffix = "_DYNAMIC" if self.activations.dynamic else ""
        return f"W{w}A{self.activations.bits}{suffix}"




GRANULARITY_FIELDS = {WeightArgs: {"strategy", "group_size"}, ActArgs: {"strategy", "dynamic"}}


def merge_args(given: WeightArgs | ActArgs | None, base: WeightArgs | ActArgs | None):
    """`given` with each field it leaves unset taken from `base`: explicit arguments override a preset field by
    field (W4A16 with weights {bits: 4, group_size: 64} stays asymmetric)."""
    if given is None or base is None:
        return given if given is not None else base
    inherited = set(base.model_fields_set) - set(given.model_fields_set)
    coupled = GRANULARITY_FIELDS[type(given)]  # setting one of these sets the granularity: take none from the base
    if coupled & given.model_fields_set:
        inherited -= coupled
    data = {k: getattr(base, k) for k in inherited}
    data.update({k: getattr(given, k) for k in given.model_fields_set})
    try:
        return type(given).model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(e["msg"] for e in exc.errors())
        raise ValueError(f"{problems} (after taking the fields it leaves out from {data})") from None


PresetName = Literal["W8A16", "W4A16", "W8A8", "W8A8_DYNAMIC", "W4A8_DYNAMIC"]

PRESETS: dict[str, Scheme] = {
    "W8A16": Scheme(weights=WeightArgs(bits=8, symmetric=True)),
    "W4A16": Scheme(weights=WeightArgs(bits=4, symmetric=False, group_size=128)),
    "W8A8": Scheme(
        weights=WeightArgs(bits=8, symmetric=True),
        activations=ActArgs(bits=8, symmetric=False, strategy=Strategy.TENSOR),
    ),
    "W8A8_DYNAMIC": Scheme(
        weights=WeightArgs(bits=8, symmetric=True),
        activations=ActArgs(bits=8, symmetric=True, strategy=Strategy.TOKEN, dynamic=True),
    ),
    "W4A8_DYNAMIC": Scheme(
        weights=WeightArgs(bits=4, symmetric=True),
        activations=ActArgs(bits=8, symmetric=True, strategy=Strategy.TOKEN, dynamic=True),
    ),
}
