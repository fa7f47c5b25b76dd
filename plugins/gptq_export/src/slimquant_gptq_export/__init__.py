"""GPTQ checkpoint export for slimquant: the `gptq` and `gptq-v2` output formats."""

from slimquant_gptq_export.exporter import GPTQExporter, GPTQv2Exporter
from slimquant_gptq_export.packing import pack_rows, qweight, qzeros, unpack_rows

__all__ = ["GPTQExporter", "GPTQv2Exporter", "pack_rows", "qweight", "qzeros", "unpack_rows"]
