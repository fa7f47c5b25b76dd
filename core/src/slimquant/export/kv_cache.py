"""The quantized attention cache on disk, as msModelSlim writes it (kv_cache_type "C8" for 8 bits).

Per attention module `<attn>` with a static cache (`slimquant.runtime.kv_attention.KVCacheQuantizer`):
`<attn>.k_proj.kv_cache_scale`, `<attn>.k_proj.kv_cache_offset` (keys) and `<attn>.v_proj.kv_cache_scale`,
`<attn>.v_proj.kv_cache_offset` (values), float32 [kv_heads * head_dim] (head-major; per-head and per-tensor scales
repeated), x_q = round(x / kv_cache_scale) + kv_cache_offset, the offset all zeros when symmetric. Each is typed
`kv_cache_type` in the description. A dynamic (per-token) cache has no tensors. The `slimquant.kv_cache` section
records bits, symmetry, dynamic and each attention module's (kv_heads, head_dim), so that the loader restores it.
"""

from __future__ import annotations

import torch
from torch import nn

from slimquant.errors import OutputError
from slimquant.export.description import KVCacheMeta
from slimquant.quant.cache_params import CacheQParams
from slimquant.runtime import kv_attention

TENSORS = {"key_scale": "k_proj.kv_cache_scale", "key_zero": "k_proj.kv_cache_offset",
           "value_scale": "v_proj.kv_cache_scale", "value_zero": "v_proj.kv_cache_offset"}


def cache_type(bits: int) -> str:
    return f"C{bits}"


def tensor_types(meta: KVCacheMeta | None) -> dict[str, str]:
    """The cache's tensor keys and their description type."""
    if meta is None or meta.dynamic:
        return {}
    return {f"{attn}.{leaf}": cache_type(meta.bits) for attn in meta.layers for leaf in TENSORS.values()}


def cache_tensors(model: nn.Module) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """The `slimquant.kv_cache` metadata and the tensors to write (None, {} when the cache is not quantized)."""
    quantizers = kv_attention.quantizers(model)
    if not quantizers:
        return None, {}
    kinds = {(q.bits, q.symmetric, q.dynamic) for q in quantizers.values()}
    if len(kinds) > 1:
        raise OutputError(f"the attention layers quantize their caches differently ({sorted(kinds)}); msModelSlim's "
                          "format holds one kv_cache_type")
    bits, symmetric, dynamic = kinds.pop()
    meta = {"bits": bits, "symmetric": symmetric, "dynamic": dynamic, "layers": {}}
    tensors = {}
    for attn, quantizer in quantizers.items():
        heads, dim = kv_attention.cache_shape(model.get_submodule(attn))
        meta["layers"][attn] = {"kv_heads": heads, "head_dim": dim}
        if dynamic:
            continue
        params = quantizer.params
        for field, leaf in TENSORS.items():
            value = getattr(params, field)
            if value is None:  # symmetric: zero offsets
                value = torch.zeros_like(getattr(params, field.replace("zero", "scale")))
            tensors[f"{attn}.{leaf}"] = value.float().reshape(-1)
    return meta, tensors


def read_cache(files, meta: KVCacheMeta) -> dict[str, CacheQParams]:
    """Attention module name -> the saved CacheQParams, every tensor checked against the metadata."""
    out = {}
    for attn, layer in meta.layers.items():
        if meta.dynamic:
            out[attn] = CacheQParams(meta.bits, meta.symmetric, True)
            continue
        values = {}
        for field, leaf in TENSORS.items():
            key = f"{attn}.{leaf}"
            if key not in files:
                raise OutputError(f"{attn}: a static {cache_type(meta.bits)} cache needs tensor {key}, which the "
                                  "output lacks")
            t = files.get(key)
            if tuple(t.shape) != (layer.kv_heads * layer.head_dim,) or t.dtype != torch.float32:
                raise OutputError(f"tensor {key} is {t.dtype} {list(t.shape)}, expected float32 "
                                  f"[{layer.kv_heads * layer.head_dim}]")
            values[field] = t.reshape(layer.kv_heads, layer.head_dim)
        if meta.symmetric:
            if values["key_zero"].any() or values["value_zero"].any():
                raise OutputError(f"{attn}: the description says a symmetric cache, but its kv_cache_offset tensors "
                                  "hold non-zero offsets")
            values["key_zero"] = values["value_zero"] = None
        try:
            out[attn] = CacheQParams(meta.bits, meta.symmetric, False, **values)
        except ValueError as exc:
            raise OutputError(f"{attn}: saved cache parameters are invalid: {exc}") from None
    return out


def restore_cache(model: nn.Module, files, meta: KVCacheMeta | None) -> None:
    """Give the model's attention modules their saved cache quantization and route attention through it."""
    if meta is None:
        return
    params = read_cache(files, meta)
    reason = kv_attention.unsupported_reason(model)
    if reason:
        raise OutputError(f"the output quantizes the attention cache, but {reason}")
    for attn, p in params.items():
        try:
            module = model.get_submodule(attn)
        except AttributeError:
            raise OutputError(f"the output quantizes the cache of {attn}, which the model does not have") from None
        if kv_attention.cache_shape(module) != (meta.layers[attn].kv_heads, meta.layers[attn].head_dim):
            raise OutputError(f"{attn}: the model caches {list(kv_attention.cache_shape(module))} per token, the "
                              "output was saved for another shape")
        kv_attention.attach(module, p)
    kv_attention.enable(model)
