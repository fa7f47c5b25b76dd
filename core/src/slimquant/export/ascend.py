"""The `ascend` exporter plugin: msModelSlim's saved-weights layout, formats "safe_tensor" and "numpy"."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from slimquant.export.layout import build_layout
from slimquant.export.writers import write_description, write_numpy, write_safetensors
from slimquant.hookspecs import hookimpl

FORMATS = ("safe_tensor", "numpy")


class AscendExporterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["ascend"] = "ascend"


class AscendExporter:
    """Writes quant_model_weight_<type>.safetensors (or shards + index) / <kind>.npz files, and
    quant_model_description_<type>.json. Options: part_file_size (GiB, 0 = one file), linear_types
    (QuantizationReport.linear_types(), checked against the model), pack_int4 (default True)."""

    name = "ascend"
    Config = AscendExporterConfig
    formats = FORMATS

    def __init__(self, config: AscendExporterConfig | None = None):
        self.config = config or AscendExporterConfig()

    @hookimpl
    def export(self, model, output_dir, fmt, options):
        if fmt not in FORMATS:
            return None
        options = options or {}
        out_dir = Path(output_dir)
        layout = build_layout(model, options.get("linear_types"), pack=options.get("pack_int4", True))
        if fmt == "safe_tensor":
            files = write_safetensors(layout, out_dir, options.get("part_file_size", 0) or 0)
        else:
            files = write_numpy(layout, out_dir)
        return [*files, write_description(layout, out_dir, files)]
