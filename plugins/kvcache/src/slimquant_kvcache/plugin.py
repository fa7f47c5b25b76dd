"""The `kvcache` plugin: min-max scales for the attention cache's keys and values (see README)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from slimquant.sdk import CacheQParams, CacheQuantizer, CalibrationError, hookimpl, kv_attention
from slimquant_kvcache.ranges import CacheRange


class KVCacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["kvcache"] = "kvcache"


class KVCachePlugin(CacheQuantizer):
    name = "kvcache"
    Config = KVCacheConfig

    def __init__(self, config: KVCacheConfig):
        self.config = config

    @hookimpl
    def check(self, plan, name, shape):
        args = getattr(plan, "args", None)
        if args is None:
            return []
        if args.strategy == "channel" and shape is not None and shape[1] < 2:
            return [f"kv_cache.strategy: {name} has a head_dim of 1; use head or tensor"]
        return []

    @hookimpl
    def observe_cache(self, ctx, layer_index, keys, values):
        _, attention = kv_attention.find_attention(ctx.layer)
        ctx.state(self.name).setdefault("range", CacheRange()).add(keys, values, kv_attention.rotary_dim(attention))

    @hookimpl
    def quantize_cache(self, ctx, layer_index, args):
        if args.dynamic:
            return CacheQParams(args.bits, args.symmetric, True)
        observed = ctx.state(self.name).pop("range", None)
        if observed is None:
            raise CalibrationError(f"decoder layer {layer_index}: no calibration batch reached its attention")
        return CacheQParams(args.bits, args.symmetric, False, *observed.qparams(args.strategy, args.bits,
                                                                                args.symmetric))
