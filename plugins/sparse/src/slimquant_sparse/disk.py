"""What a saved output really holds: per quantized Linear, the fraction of zero weights and the bytes it takes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from slimquant.sdk import QuantizedFiles, read_linear


@dataclass(frozen=True)
class SavedSparsity:
    pattern: str | None  # the description's sparsity (None: not pruned)
    weights: int  # out_features * in_features
    zero_codes: float  # fraction of codes that dequantize to 0 (the mask)
    zero_weights: float  # fraction of the weight, outliers added, that is 0
    outliers: int
    stored_bytes: int  # the bytes of this Linear's tensors in the files


def saved_sparsity(output_dir: str | os.PathLike) -> dict[str, SavedSparsity]:
    """Read every quantized Linear of a saved msModelSlim-layout output back from disk."""
    files = QuantizedFiles(output_dir)
    found = {}
    for name, meta in files.meta.linears.items():
        qweight, _, _ = read_linear(files, name, meta)
        stored = sum(t.numel() * t.element_size() for t in (files.get(k) for k in files.keys_of(name)))
        zero_codes = float((qweight.dequantize_codes() == 0).float().mean())
        zero_weights = float((qweight.dequantize() == 0).float().mean())
        found[name] = SavedSparsity(meta.sparsity, qweight.codes.numel(), zero_codes, zero_weights, meta.outliers,
                                    stored)
    return found


def bytes_on_disk(output_dir: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(output_dir).iterdir() if p.is_file())
