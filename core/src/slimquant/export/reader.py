"""Open a saved msModelSlim-layout directory: find the description, check every weight file, read tensors.

Every problem becomes an OutputError naming the file or tensor: a missing or unparsable description, slimquant
metadata that fails its schema (`slimquant.export.description`), a weight-file name that is not a plain file
name inside the directory (refused before anything is opened), a missing shard, a weight file without a
recorded sha256 (unless verify=False) or whose sha256 differs from the recorded one (corrupt or truncated), a
file safetensors cannot open, a tensor the description names but no file holds (or the reverse), or a tensor
typed otherwise than its Linear, or a floating-point tensor holding NaN or Inf.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from slimquant.errors import OutputError
from slimquant.export import kv_cache, names
from slimquant.export.description import OutputMeta, is_plain_file_name, parse_output_meta

NOT_TENSOR_KEYS = {"model_quant_type", "version", "kv_cache_type", "model_quant_type_second",
                   "kv_cache_type_second", "fa_quant_type", "reduce_quant_type", "group_size", "weight_bits",
                   "slimquant"}
FLOAT = "FLOAT"
QUANT_TYPE = re.compile(r"[A-Za-z0-9_]+")


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
    except RecursionError:
        raise OutputError(f"cannot read {path}: the JSON is nested too deeply") from None
    if not isinstance(data, dict):
        raise OutputError(f"{path}: expected a JSON object")
    return data


def _quant_type(description: dict, source: str) -> str:
    qtype = description.get("model_quant_type")
    if not isinstance(qtype, str):
        raise OutputError(f"{source}: no model_quant_type")
    if not QUANT_TYPE.fullmatch(qtype):
        raise OutputError(f"{source}: model_quant_type {qtype!r} is not a scheme name like W8A8")
    return qtype


def _tensor_types(description: dict, meta: OutputMeta, source: str) -> dict[str, str]:
    """{tensor key: type}: each key of a quantized Linear typed as its Linear, every other key FLOAT."""
    types = {}
    cache = kv_cache.tensor_types(meta.kv_cache)
    for key, kind in description.items():
        if key in NOT_TENSOR_KEYS:
            continue
        linear = meta.linears.get(key.rpartition(".")[0])
        expected = cache.get(key) or (FLOAT if linear is None else linear.type)
        if kind != expected:
            raise OutputError(f"{source}: tensor {key} is typed {kind!r}, expected {expected!r}")
        types[key] = kind
    return types


def _weight_map(index: Path) -> dict[str, str]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise OutputError(f"{index.name}: no weight_map of tensor name -> file name")
    for file_name in dict.fromkeys(weight_map.values()):
        if not is_plain_file_name(file_name):
            raise OutputError(f"{index.name}: weight file {file_name!r} is not a plain file name inside the output "
                              "directory; refusing to read it")
    return weight_map


def _safetensors_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own types for bad headers and short files
        raise OutputError(f"weight file {path} cannot be read: {exc}") from None


class QuantizedFiles:
    """The tensors of one saved output, read lazily from its (possibly sharded) safetensors files.

    verify: require a sha256 in the description for every weight file read (the index too) and check it;
    verify=False reads files without checksums (and skips hashing).
    """

    def __init__(self, directory: str | os.PathLike, verify: bool = True):
        self.directory = Path(directory)
        self.verify = verify
        self.description_path = _find_description(self.directory)
        source = self.description_path.name
        self.description = _read_json(self.description_path)
        self.quant_type = _quant_type(self.description, source)
        self.meta = parse_output_meta(self.description.get("slimquant"), source)
        self.types = _tensor_types(self.description, self.meta, source)
        self._where = self._locate()
        missing = [k for k in self.types if k not in self._where]
        if missing:
            raise OutputError(f"{self.directory}: the description names {len(missing)} tensor(s) no weight file "
                              f"holds: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        untyped = [k for k in self._where if k not in self.types]
        if untyped:
            raise OutputError(f"{self.directory}: the weight files hold {len(untyped)} tensor(s) the description "
                              f"does not type: {', '.join(untyped[:5])}{' ...' if len(untyped) > 5 else ''}")
        self._owned: dict[str, list[str]] = defaultdict(list)
        self.cache_keys = set(kv_cache.tensor_types(self.meta.kv_cache))  # not a Linear's, though under k_proj
        for key in self._where:
            if key not in self.cache_keys:
                self._owned[key.rpartition(".")[0]].append(key)
        self._handles: dict[Path, object] = {}

    def _check_sum(self, path: Path) -> None:
        if not self.verify:
            return
        expected = self.meta.files.get(path.name)
        if expected is None:
            raise OutputError(f"weight file {path.name}: its sha256 checksum is missing from "
                              f"{self.description_path.name} (slimquant.files), so its integrity cannot be "
                              "checked; re-save the output, or opt out of the check with "
                              "load_quantized(model, dir, verify=False) / QuantizedFiles(dir, verify=False) "
                              "(slimquant eval --no-verify)")
        try:
            actual = names.sha256_file(path)
        except OSError as exc:
            raise OutputError(f"cannot read weight file {path}: {exc}") from None
        if actual != expected:
            raise OutputError(f"weight file {path} is corrupt or truncated (sha256 differs from the description)")

    def _weight_files(self) -> tuple[list[Path], dict[str, str] | None]:
        index = self.directory / names.index_name(self.quant_type)
        if index.exists():
            if not index.is_file():
                raise OutputError(f"{index} is not a file")
            self._check_sum(index)
            weight_map = _weight_map(index)
            return [self.directory / f for f in dict.fromkeys(weight_map.values())], weight_map
        single = self.directory / names.single_name(self.quant_type)
        if not single.exists():
            raise OutputError(f"{self.directory}: neither {single.name} nor {index.name} exists (only "
                              "safetensors outputs can be loaded: save with save_type 'safe_tensor')")
        return [single], None

    def _locate(self) -> dict[str, Path]:
        files, weight_map = self._weight_files()
        where: dict[str, Path] = {}
        for path in files:
            if not path.is_file():
                raise OutputError(f"weight file {path.name} is missing from {self.directory}")
            self._check_sum(path)
            for key in _safetensors_keys(path):
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

    def keys_of(self, owner: str) -> list[str]:
        """The keys `<owner>.<leaf>` (a Linear's tensors)."""
        return list(self._owned.get(owner, []))

    def get(self, key: str) -> torch.Tensor:
        path = self._where.get(key)
        if path is None:
            raise OutputError(f"tensor {key} is in no weight file of {self.directory}")
        try:
            handle = self._handles.get(path)
            if handle is None:
                handle = self._handles[path] = safe_open(str(path), framework="pt")
            tensor = handle.get_tensor(key)
        except Exception as exc:
            raise OutputError(f"cannot read tensor {key} from {path.name}: {exc}") from None
        _check_finite(tensor, key, path)
        return tensor


def _check_finite(tensor: torch.Tensor, key: str, path: Path) -> None:
    """A saved float tensor holding NaN or Inf is corrupt, whatever its checksum says."""
    if not tensor.is_floating_point():
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise OutputError(f"tensor {key} holds NaN or Inf ({bad} value(s)) in weight file {path}; the output is "
                          "corrupt")
