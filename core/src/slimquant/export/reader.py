"""Open a saved msModelSlim-layout directory: find the description, check every weight file, read tensors.

Every problem becomes an OutputError naming the file or tensor: a missing or unparsable description, a
missing shard, a file whose sha256 differs from the one recorded at save time (corrupt or truncated), a
file safetensors cannot open, or a tensor the description names but no file holds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from slimquant.errors import OutputError
from slimquant.export import names

NOT_TENSOR_KEYS = {"model_quant_type", "version", "kv_cache_type", "model_quant_type_second",
                   "kv_cache_type_second", "fa_quant_type", "reduce_quant_type"}


def _find_description(directory: Path) -> Path:
    if not directory.is_dir():
        raise OutputError(f"{directory} is not a directory of quantized weights")
    found = sorted(directory.glob("quant_model_description*.json"))
    if not found:
        raise OutputError(f"{directory}: no quant_model_description_<type>.json (was it saved with safe_tensor?)")
    if len(found) > 1:
        raise OutputError(f"{directory}: several descriptions ({', '.join(p.name for p in found)}); keep one")
    return found[0]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OutputError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise OutputError(f"{path}: expected a JSON object")
    return data


class QuantizedFiles:
    """The tensors of one saved output, read lazily from its (possibly sharded) safetensors files."""

    def __init__(self, directory: str | os.PathLike, verify: bool = True):
        self.directory = Path(directory)
        self.description_path = _find_description(self.directory)
        self.description = _read_json(self.description_path)
        qtype = self.description.get("model_quant_type")
        if not isinstance(qtype, str):
            raise OutputError(f"{self.description_path.name}: no model_quant_type")
        self.quant_type = qtype
        meta = self.description.get("slimquant")
        if not isinstance(meta, dict) or not isinstance(meta.get("linears"), dict):
            raise OutputError(f"{self.description_path.name}: no slimquant metadata; only outputs written by "
                              "slimquant can be loaded")
        self.meta = meta
        self.types = {k: v for k, v in self.description.items() if isinstance(v, str) and k not in NOT_TENSOR_KEYS}
        self._where = self._locate(verify)
        missing = [k for k in self.types if k not in self._where]
        if missing:
            raise OutputError(f"{self.directory}: the description names {len(missing)} tensor(s) no weight file "
                              f"holds: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        self._handles: dict[Path, object] = {}

    def _weight_files(self) -> tuple[list[Path], dict[str, str] | None]:
        index = self.directory / names.index_name(self.quant_type)
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise OutputError(f"{index.name}: no weight_map")
            return [self.directory / f for f in dict.fromkeys(weight_map.values())], weight_map
        single = self.directory / names.single_name(self.quant_type)
        if not single.exists():
            raise OutputError(f"{self.directory}: neither {single.name} nor {index.name} exists (only "
                              "safetensors outputs can be loaded: save with save_type 'safe_tensor')")
        return [single], None

    def _locate(self, verify: bool) -> dict[str, Path]:
        files, weight_map = self._weight_files()
        sums = self.meta.get("files", {})
        where: dict[str, Path] = {}
        for path in files:
            if not path.is_file():
                raise OutputError(f"weight file {path.name} is missing from {self.directory}")
            expected = sums.get(path.name)
            if verify and expected and names.sha256_file(path) != expected:
                raise OutputError(f"weight file {path} is corrupt or truncated (sha256 differs from the description)")
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = list(f.keys())
            except Exception as exc:  # safetensors raises its own types for bad headers and short files
                raise OutputError(f"weight file {path} cannot be read: {exc}") from None
            for key in keys:
                where[key] = path
        if weight_map is not None:
            for key, file_name in weight_map.items():
                if where.get(key, Path()).name != file_name:
                    raise OutputError(f"index names tensor {key} in {file_name}, which does not hold it")
        return where

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self):
        return self._where.keys()

    def get(self, key: str) -> torch.Tensor:
        path = self._where.get(key)
        if path is None:
            raise OutputError(f"tensor {key} is in no weight file of {self.directory}")
        try:
            handle = self._handles.get(path)
            if handle is None:
                handle = self._handles[path] = safe_open(str(path), framework="pt")
            return handle.get_tensor(key)
        except Exception as exc:
            raise OutputError(f"cannot read tensor {key} from {path.name}: {exc}") from None
