"""A saved output checked against the float model's configuration before any of the model's weights are read:
its files (and checksums), the architecture, every quantized Linear's shape and every float tensor's name."""

from __future__ import annotations

import os

from slimquant.config.recipe import ModelSpec
from slimquant.export.reader import QuantizedFiles


def check_output_fits(saved_dir: str | os.PathLike, spec: ModelSpec, config, verify: bool = True) -> None:
    from slimquant.loader import check_model_fits
    from slimquant.runtime.preflight import weightless_model

    files = QuantizedFiles(saved_dir, verify=verify)
    check_model_fits(weightless_model(spec, config), files.meta)
