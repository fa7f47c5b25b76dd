"""compressed-tensors export for slimquant: the `compressed-tensors` output format (transformers, vLLM)."""

from slimquant_compressed_tensors.exporter import CompressedTensorsExporter
from slimquant_compressed_tensors.packing import pack_int32, unpack_int32

__all__ = ["CompressedTensorsExporter", "pack_int32", "unpack_int32"]
