"""Attention KV-cache quantization for slimquant."""
