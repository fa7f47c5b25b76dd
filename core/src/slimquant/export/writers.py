"""Write a Layout as msModelSlim safetensors (one file or shards + index) or as numpy .npz groups."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from slimquant.errors import OutputError
from slimquant.export import names
from slimquant.export.layout import Layout, description

FLOAT_NPZ = "float_weights.npz"
NPZ_OF_SUFFIX = {"weight": "quant_weight.npz"}  # msModelSlim's quant_weight.npy; other suffixes keep their name


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, its failures (a full disk: SafetensorError without the path) naming the file."""
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except (OSError, SafetensorError) as exc:
        raise OutputError(f"cannot write {path}: {exc}") from None


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_safetensors(_unshared(tensors), path)
    path.chmod(0o666 & ~process_umask())  # safetensors creates files 0600; give them the permissions of the other files


def process_umask() -> int:
    """The process umask, read without setting it (os.umask would change it for every thread for a moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(tensors: dict[str, torch.Tensor], part_file_size: float) -> list[list[str]]:
    """Greedy, in key order: a shard closes when the next tensor would take it past part_file_size GiB
    (1 GiB = 1024**3 bytes; 0 = one shard). A tensor larger than the limit gets a shard of its own."""
    if part_file_size < 0:
        raise OutputError(f"part_file_size must be >= 0 (GiB, 0 = one file), got {part_file_size}")
    limit = part_file_size * names.GIB
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        if limit and shards[-1] and size + _nbytes(t) > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += _nbytes(t)
    return shards


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage; give such tensors their own copy."""
    seen: set[int] = set()
    out = {}
    for key, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        out[key] = t.clone() if ptr is not None and ptr in seen else t
        if ptr is not None:
            seen.add(ptr)
    return out


def write_safetensors(layout: Layout, out_dir: Path, part_file_size: float = 0) -> list[Path]:
    qtype = layout.model_quant_type
    shards = plan_shards(layout.tensors, part_file_size)
    if not part_file_size:
        path = out_dir / names.single_name(qtype)
        _save(layout.tensors, path)
        return [path]
    written: list[Path] = []
    weight_map = {}
    for i, keys in enumerate(shards, start=1):
        path = out_dir / names.shard_name(qtype, i, len(shards))
        _save({k: layout.tensors[k] for k in keys}, path)
        weight_map.update(dict.fromkeys(keys, path.name))
        written.append(path)
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in layout.tensors.values())}, "weight_map": weight_map}
    index_path = out_dir / names.index_name(qtype)
    index_path.write_text(json.dumps(index, indent=2))
    return [*written, index_path]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds every bfloat16 value exactly
        t = t.float()
    return t.numpy()


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez, without its keyword-argument names (a key may be any string), never pickled."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, array in arrays.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


def write_numpy(layout: Layout, out_dir: Path) -> list[Path]:
    """One .npz per tensor kind, keyed by Linear name (quant_weight.npz, weight_scale.npz, deq_scale.npz, ...),
    plus float_weights.npz keyed by full tensor name. np.load(path, allow_pickle=False) reads every file."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, t in layout.tensors.items():
        owner = layout.owner[key]
        if owner is None:
            groups.setdefault(FLOAT_NPZ, {})[key] = _to_numpy(t)
            continue
        suffix = key[len(owner) + 1:]
        groups.setdefault(NPZ_OF_SUFFIX.get(suffix, f"{suffix}.npz"), {})[owner] = _to_numpy(t)
    written = []
    for file_name, arrays in groups.items():
        path = out_dir / file_name
        _write_npz(path, arrays)
        written.append(path)
    return written


def write_description(layout: Layout, out_dir: Path, new_files: list[Path]) -> Path:
    """Write (or extend, when another format already wrote it) the description with checksums of new_files."""
    path = out_dir / names.description_name(layout.model_quant_type)
    files = {}
    if path.exists():
        files = json.loads(path.read_text())["slimquant"]["files"]
    files.update({p.name: names.sha256_file(p) for p in new_files})
    path.write_text(json.dumps(description(layout, files), indent=2))
    return path
