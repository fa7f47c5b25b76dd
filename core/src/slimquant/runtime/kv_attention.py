"""The attention path through which cached keys and values are fake-quantized (and observed in calibration).

transformers routes every supported model's attention through `AttentionInterface`, with keys already rotated
(RoPE) and not yet repeated for grouped-query heads: `[batch, kv_heads, seq, head_dim]`. `enable` registers a
wrapper around the model's own implementation (`slimquant_kv_<inner>`: eager, sdpa, ...) and switches the model
to it; the wrapper shows keys and values to the runtime's cache observer while one is set (`observing_cache`),
fake-quantizes them with the attention module's `KVCacheQuantizer` when it has one, and calls the inner
implementation. A model whose attention bypasses the interface is refused (`unsupported_reason`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from slimquant.quant.cache_params import CacheQParams, fake_quantize_cache

PREFIX = "slimquant_kv_"
ATTRIBUTE = "kv_cache_quant"  # the KVCacheQuantizer child of an attention module

_observer: ContextVar[Callable | None] = ContextVar("slimquant_cache_observer", default=None)


class KVCacheQuantizer(nn.Module):
    """Holds one attention layer's CacheQParams (as buffers that move with the model but are not in its
    state_dict: the exporter writes them under msModelSlim's names)."""

    def __init__(self, params: CacheQParams):
        super().__init__()
        self.bits, self.symmetric, self.dynamic = params.bits, params.symmetric, params.dynamic
        for name in ("key_scale", "key_zero", "value_scale", "value_zero"):
            self.register_buffer(name, getattr(params, name), persistent=False)

    @property
    def params(self) -> CacheQParams:
        return CacheQParams(self.bits, self.symmetric, self.dynamic, self.key_scale, self.key_zero,
                            self.value_scale, self.value_zero)

    def forward(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        args = (self.bits, self.symmetric, self.dynamic)
        return (fake_quantize_cache(keys, self.key_scale, self.key_zero, *args),
                fake_quantize_cache(values, self.value_scale, self.value_zero, *args))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {'dynamic per token' if self.dynamic else 'static'}"


def _inner_function(module: nn.Module, inner: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if inner == "eager":  # each model file has its own eager attention (softcapping, scaling, ...)
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[inner]


def _wrapper(inner: str) -> Callable:
    def attention(module, query, key, value, *args, **kwargs):
        observe = _observer.get()
        if observe is not None:
            observe(module, key, value)
        quantizer = getattr(module, ATTRIBUTE, None)
        if quantizer is not None:
            key, value = quantizer(key, value)
        return _inner_function(module, inner)(module, query, key, value, *args, **kwargs)
    return attention


def _register(inner: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = PREFIX + inner
    AttentionInterface.register(name, _wrapper(inner))
    if inner in ALL_MASK_ATTENTION_FUNCTIONS:  # the inner implementation's masks
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def current_implementation(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the cache of `model` cannot be fake-quantized (None when it can)."""
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is None or not can_set():
        return (f"{type(model).__name__} does not route its attention through transformers' AttentionInterface, "
                "so its cached keys and values cannot be reached")
    inner = current_implementation(model) or "eager"
    if inner.startswith(PREFIX):
        return None
    if "|" in inner or inner.startswith("flex"):
        return f"attention implementation {inner!r} is not supported for cache quantization; use eager or sdpa"
    if inner == "eager" and not hasattr(sys.modules.get(type(model).__module__), "eager_attention_forward"):
        return f"{type(model).__name__}'s module has no eager_attention_forward to wrap"
    return None


def enable(model: nn.Module) -> None:
    """Route `model`'s attention through the quantizing wrapper of its current implementation (idempotent)."""
    inner = current_implementation(model) or "eager"
    if inner.startswith(PREFIX):
        return
    model.set_attn_implementation(_register(inner))


def find_attention(layer: nn.Module) -> tuple[str, nn.Module] | None:
    """The self-attention module of a decoder layer: (name relative to the layer, module)."""
    for name, module in layer.named_modules():
        if name and type(module).__name__.endswith("Attention") and hasattr(module, "head_dim"):
            return name, module
    return None


def attach(attention: nn.Module, params: CacheQParams) -> None:
    setattr(attention, ATTRIBUTE, KVCacheQuantizer(params))


def quantizers(model: nn.Module) -> dict[str, KVCacheQuantizer]:
    """Attention module name -> its KVCacheQuantizer, in model order."""
    suffix = "." + ATTRIBUTE
    return {n[:-len(suffix)]: m for n, m in model.named_modules() if isinstance(m, KVCacheQuantizer)}


@contextmanager
def observing_cache(observer: Callable[[nn.Module, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """While inside, every wrapped attention call shows `observer(module, keys, values)` its keys and values before
    they are quantized."""
    token = _observer.set(observer)
    try:
        yield
    finally:
        _observer.reset(token)


def cache_shape(attention: nn.Module) -> tuple[int, int]:
    """(kv_heads, head_dim) of the keys and values an attention module caches."""
    config = attention.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return int(heads), int(attention.head_dim)


def rotary_dim(attention: nn.Module) -> int:
    """How many leading head_dim channels of the cached keys the rotary embedding has turned, channel c together with
    c + rotary_dim / 2 (transformers' rotate_half layout); 0 for a model without one (learned or no positions)."""
    config = attention.config
    rope = getattr(config, "rope_parameters", None)
    if not rope:
        return 0
    factor = rope.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
    dim = getattr(attention, "rotary_ndims", None) or int(attention.head_dim * factor)
    return min(dim - dim % 2, int(attention.head_dim))
