"""The msModelSlim-layout exporters (what MindIE on Ascend loads): formats `safe_tensor` and `numpy`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from slimquant.export.layout import build_layout
from slimquant.export.writers import write_description, write_numpy, write_safetensors
from slimquant.features import Feature
from slimquant.hookspecs import hookimpl
from slimquant.roles import Exporter

FORMATS = ("safe_tensor", "numpy")


class _AscendLayout(Exporter):
    """quant_model_weight_<type>.safetensors (or shards + index) / <kind>.npz files, and
    quant_model_description_<type>.json. Options: part_file_size (GiB, 0 = one file), linear_types
    (QuantizationReport.linear_types(), checked against the model), pack_int4 (default True)."""

    holds = frozenset(Feature) - {Feature.ONLINE_TRANSFORM}  # kv_cache_scale / offset, g_idx, codebooks, ...

    def __init__(self, config: BaseModel | None = None):
        self.config = config

    def write(self, layout, out_dir: Path, options: dict) -> list[Path]:
        raise NotImplementedError

    @hookimpl
    def export(self, model, output_dir, options):
        options = options or {}
        out_dir = Path(output_dir)
        layout = build_layout(model, options.get("linear_types"), pack=options.get("pack_int4", True))
        files = self.write(layout, out_dir, options)
        return [*files, write_description(layout, out_dir, files)]


class SafetensorsExporter(_AscendLayout):
    name = "safe_tensor"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Literal["safe_tensor"] = "safe_tensor"

    def write(self, layout, out_dir: Path, options: dict) -> list[Path]:
        return write_safetensors(layout, out_dir, options.get("part_file_size", 0) or 0)


class NumpyExporter(_AscendLayout):
    name = "numpy"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Literal["numpy"] = "numpy"

    def write(self, layout, out_dir: Path, options: dict) -> list[Path]:
        return write_numpy(layout, out_dir)
