"""The `kvcache` plugin: min-max scales for the attention cache's keys and values (see README)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from slimquant.errors import CalibrationError
from slimquant.hookspecs import hookimpl
from slimquant.quant.cache_params import CacheQParams
from slimquant_kvcache.ranges import CacheRange, cache_qparams


class KVCacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["kvcache"] = "kvcache"


class KVCachePlugin:
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
        state = ctx.state(self.name)
        state.setdefault("range", CacheRange()).add(keys, values)

    @hookimpl
    def quantize_cache(self, ctx, layer_index, args):
        if args.dynamic:
            return CacheQParams(args.bits, args.symmetric, True)
        observed = ctx.state(self.name).pop("range", None)
        if observed is None:
            raise CalibrationError(f"decoder layer {layer_index}: no calibration batch reached its attention")
        key_scale, key_zero = cache_qparams(observed.key_min, observed.key_max, args.strategy, args.bits,
                                            args.symmetric)
        value_scale, value_zero = cache_qparams(observed.value_min, observed.value_max, args.strategy, args.bits,
                                                args.symmetric)
        return CacheQParams(args.bits, args.symmetric, False, key_scale, key_zero, value_scale, value_zero)
