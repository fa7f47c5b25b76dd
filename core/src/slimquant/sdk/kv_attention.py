"""The attention cache (``from slimquant.sdk import kv_attention``): ``find_attention`` finds a decoder layer's
attention module and ``rotary_dim`` how many of its key channels the rotary embedding turns (for a cache
algorithm); ``quantizers`` maps each attention module of a quantized model, by name, to the quantizer holding its
cache's scales (for an exporter that saves them)."""

from slimquant.runtime.kv_attention import find_attention, quantizers, rotary_dim

__all__ = ["find_attention", "quantizers", "rotary_dim"]
