"""GGUF export for slimquant: the `gguf` output format (llama.cpp), for Llama, Mistral, Qwen2 and Qwen3 models."""

from slimquant_gguf.blocks import encode_blocks
from slimquant_gguf.exporter import GGUFExporter
from slimquant_gguf.llama import permute_rows, unpermute_rows

__all__ = ["GGUFExporter", "encode_blocks", "permute_rows", "unpermute_rows"]
