"""`slimquant export`: an output saved earlier (msModelSlim layout) rewritten in other installed formats.

The saved output holds codes and scales but not the model's configuration, so the float model it was quantized
from is loaded first (as `slimquant eval` does), turned into the fake-quantized model by `load_quantized`, and
saved again with `save_quantized`. The tokenizer comes from the saved output when it holds one, else from the
float model when that has one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from slimquant.config.recipe import ModelSpec
from slimquant.errors import ModelStructureError
from slimquant.export import OutputReservation, check_save_args, save_quantized
from slimquant.export.fit import check_output_fits
from slimquant.model.loading import TOKENIZER_FILES, load_config, load_model, load_tokenizer


def _tokenizer(saved: Path, spec: ModelSpec):
    from transformers import AutoTokenizer

    if any((saved / name).exists() for name in TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(str(saved), local_files_only=True)
    try:
        return load_tokenizer(spec)
    except ModelStructureError:
        return None


def convert_output(saved_dir: str | os.PathLike, formats: Sequence[str], output_dir: str | os.PathLike,
                   model: ModelSpec | None = None, overwrite: bool = False, part_file_size: float = 0,
                   verify: bool = True) -> list[Path]:
    from slimquant.loader import load_quantized

    saved = Path(saved_dir)
    if not saved.is_dir():
        raise FileNotFoundError(f"no saved output at {saved}")
    spec = model or ModelSpec()
    inputs = [saved, spec.path, spec.gguf_file]
    check_save_args(output_dir, list(formats), part_file_size, overwrite, inputs)
    config = load_config(spec)
    check_output_fits(saved, spec, config, verify)
    reservation = OutputReservation(output_dir, overwrite, inputs).open()
    try:
        quantized = load_quantized(load_model(spec, config), saved, verify=verify)
        return save_quantized(quantized, output_dir, save_type=list(formats), part_file_size=part_file_size,
                              overwrite=overwrite, tokenizer=_tokenizer(saved, spec), reservation=reservation)
    finally:
        reservation.abort()
