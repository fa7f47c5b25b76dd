"""File names of the msModelSlim layout, and file checksums."""

from __future__ import annotations

import hashlib
from pathlib import Path

GIB = 1024**3


def weight_stem(quant_type: str) -> str:
    return f"quant_model_weight_{quant_type.lower()}"


def description_name(quant_type: str) -> str:
    return f"quant_model_description_{quant_type.lower()}.json"


def index_name(quant_type: str) -> str:
    return f"{weight_stem(quant_type)}.safetensors.index.json"


def single_name(quant_type: str) -> str:
    return f"{weight_stem(quant_type)}.safetensors"


def shard_name(quant_type: str, index: int, count: int) -> str:
    """1-based; five-digit numbers as Hugging Face and msModelSlim write them, plain numbers past 99999 parts."""
    if count > 99999:
        return f"{weight_stem(quant_type)}-{index}-of-{count}.safetensors"
    return f"{weight_stem(quant_type)}-{index:05d}-of-{count:05d}.safetensors"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
