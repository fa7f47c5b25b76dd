"""AWQ for slimquant: activation-aware scaling and clipping before any weight quantizer."""

from slimquant_awq.plugin import AWQPlugin

__all__ = ["AWQPlugin"]
