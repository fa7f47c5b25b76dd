"""The recipe's `kv_cache` section: keys and values quantized as they enter the attention cache."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class KVCacheArgs(BaseModel):
    """Keys (after the rotary embedding) and values of every attention layer, fake-quantized to `bits` integers.

    Static scales come from calibration, per head (default), per tensor or per channel (head_dim entry of each
    head); `dynamic: true` quantizes each token of each head at run time instead (strategy `token`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(8, ge=4, le=8, description="integer bits per cached key/value, 4 to 8 (msModelSlim: 8, C8)")
    strategy: Literal["head", "tensor", "channel", "token"] = "head"
    symmetric: bool = False
    dynamic: bool = False
    algorithm: str | None = Field(None, description="the plugin that chooses the cache scales; default: the cache "
                                                    "algorithm named in `algorithms`, else the one installed")

    @model_validator(mode="after")
    def _dynamic_is_per_token(self) -> KVCacheArgs:
        if self.dynamic and self.strategy != "token":
            raise ValueError("a dynamic cache is quantized per token: set strategy 'token'")
        if self.strategy == "token" and not self.dynamic:
            raise ValueError("per-token cache scales only exist at run time: set dynamic: true")
        return self
