"""The attention-cache step of a decoder layer: observe its keys and values, get the plugin's CacheQParams, check
them, and attach them so that the layer's later runs use the quantized cache."""

from __future__ import annotations

from torch import nn

from slimquant.errors import PluginError, RecipeError
from slimquant.plugins import AlgorithmPlan
from slimquant.quant.cache_params import CacheQParams
from slimquant.quant.fake_linear import materialized_weights
from slimquant.runtime import kv_attention
from slimquant.runtime.context import LayerContext


class _CacheObserved(Exception):
    """Stops the layer once its attention has shown its keys and values: nothing after it is needed."""


def check_cache_plan(model: nn.Module, layers, prefix: str, algorithms: AlgorithmPlan) -> None:
    """Plan-time: the model's attention can be reached, each layer has one, and the cache plugin accepts each."""
    reason = kv_attention.unsupported_reason(model)
    if reason:
        raise RecipeError(f"kv_cache: cannot quantize this model's attention cache: {reason}")
    problems = []
    for i, layer in enumerate(layers):
        found = kv_attention.find_attention(layer)
        if found is None:
            raise RecipeError(f"kv_cache: decoder layer {prefix}.{i} has no attention module to quantize the cache of")
        problems += algorithms.check_cache(f"{prefix}.{i}.{found[0]}", kv_attention.cache_shape(found[1]))
    if problems:
        raise RecipeError("the cache plugin cannot quantize these attention layers: " + "; ".join(problems))


def quantize_layer_cache(ctx: LayerContext, algorithms: AlgorithmPlan) -> CacheQParams:
    plan = algorithms.cache
    name, attention = kv_attention.find_attention(ctx.layer)
    where = f"{ctx.prefix}.{name}"
    shape = kv_attention.cache_shape(attention)
    if not plan.args.dynamic:
        def observe(module, keys, values):
            if module is not attention:
                return
            if (keys.shape[1], keys.shape[3]) != shape or values.shape != keys.shape:
                raise PluginError(f"{where}: keys {list(keys.shape)} / values {list(values.shape)} are not "
                                  f"[batch, {shape[0]}, seq, {shape[1]}]")
            algorithms.plugins.call(plan.algorithm, "observe_cache", ctx=ctx, layer_index=ctx.index,
                                    keys=keys.detach(), values=values.detach())
            raise _CacheObserved

        with kv_attention.observing_cache(observe), materialized_weights(ctx.layer):
            for inp in ctx.inputs:
                try:
                    ctx.run_layer([inp])
                except _CacheObserved:
                    pass
    params = algorithms.plugins.call(plan.algorithm, "quantize_cache", ctx=ctx, layer_index=ctx.index,
                                     args=plan.args)
    _check_params(params, plan, where, shape)
    kv_attention.attach(attention, params)
    return params


def _check_params(params, plan, where: str, shape: tuple[int, int]) -> None:
    if not isinstance(params, CacheQParams):
        raise PluginError(f"{where}: plugin {plan.algorithm!r} returned {type(params).__name__} from quantize_cache, "
                          "not CacheQParams")
    args = plan.args
    if (params.bits, params.symmetric, params.dynamic) != (args.bits, args.symmetric, args.dynamic):
        raise PluginError(f"{where}: plugin {plan.algorithm!r} returned a {params.bits}-bit "
                          f"{'symmetric' if params.symmetric else 'asymmetric'} "
                          f"{'dynamic' if params.dynamic else 'static'} cache for kv_cache {args.model_dump()}")
    if not params.dynamic and params.shape != shape:
        raise PluginError(f"{where}: plugin {plan.algorithm!r} returned cache scales of shape {list(params.shape)}, "
                          f"the attention caches [kv_heads, head_dim] = {list(shape)}")
