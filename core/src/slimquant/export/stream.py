"""Write safetensors shards as tensors arrive, holding none of them in memory.

Each tensor's bytes go to a spool file beside the shard as soon as it is added. When a shard closes (the next
tensor would take it past the size limit, or the writer finishes), its header is written and the spooled bytes
are copied after it in safetensors' own order (element size, then dtype, then name), so a shard is byte for byte
the file `safetensors.torch.save_file(tensors, path, metadata)` would write for the same tensors. Shards are
planned greedily in arrival order, as `slimquant.export.writers.plan_shards` plans them for a whole model.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimquant.errors import OutputError

# safetensors' dtype names, in the order of its Dtype enum: a file stores the later ones first
DTYPE_NAMES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32", torch.float64: "F64",
    torch.int64: "I64", torch.uint64: "U64",
}
_RANK = {name: rank for rank, name in enumerate(DTYPE_NAMES.values())}
_HEADER_ALIGN = 8
_COPY_CHUNK = 1 << 24


@dataclass
class _Entry:
    key: str
    dtype: str
    shape: list[int]
    start: int  # offset in the spool file
    nbytes: int


@dataclass
class _Shard:
    spool: Path
    entries: list[_Entry] = field(default_factory=list)
    nbytes: int = 0


def _header(entries: list[_Entry], metadata: dict[str, str] | None) -> tuple[bytes, list[_Entry]]:
    ordered = sorted(entries, key=lambda e: (-_RANK[e.dtype], e.key))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for e in ordered:
        header[e.key] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % _HEADER_ALIGN)
    return struct.pack("<Q", len(text)) + text, ordered


class SafetensorsStream:
    """`add(key, tensor)` as tensors come; `close()` writes the last shard and returns (shard paths, weight map).

    Shards are written as `<directory>/<stem>.part<i>` and renamed by the caller once their number is known
    (`slimquant.export.names.shard_name`). `limit` is the shard size in bytes (0: one shard)."""

    def __init__(self, directory: Path, stem: str, limit: int = 0, metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.stem = stem
        self.limit = limit
        self.metadata = metadata
        self.keys: set[str] = set()
        self.total_size = 0
        self.weight_map: dict[str, int] = {}  # key -> shard number (1-based)
        self.shards: list[Path] = []
        self._open: _Shard | None = None
        self._spool_file = None

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def __setitem__(self, key: str, tensor: torch.Tensor) -> None:  # a Layout's tensor sink
        self.add(key, tensor)

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.keys:
            raise OutputError(f"tensor key {key!r} would be written twice")
        if tensor.dtype not in DTYPE_NAMES:
            raise OutputError(f"{key}: safetensors cannot store dtype {tensor.dtype}")
        data = tensor.detach().cpu().contiguous()
        nbytes = data.numel() * data.element_size()
        if self.limit and self._open is not None and self._open.entries and self._open.nbytes + nbytes > self.limit:
            self._close_shard()
        if self._open is None:
            spool = self.directory / f".{self.stem}.spool{len(self.shards) + 1}"
            self._open = _Shard(spool)
            self._spool_file = open(spool, "wb")  # noqa: SIM115  (closed with its shard)
        shard = self._open
        if nbytes:
            self._spool_file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        shard.entries.append(_Entry(key, DTYPE_NAMES[data.dtype], list(data.shape), shard.nbytes, nbytes))
        shard.nbytes += nbytes
        self.keys.add(key)
        self.total_size += nbytes
        self.weight_map[key] = len(self.shards) + 1

    def _close_shard(self) -> None:
        shard, spool_file = self._open, self._spool_file
        self._open = self._spool_file = None
        spool_file.close()
        path = self.directory / f"{self.stem}.part{len(self.shards) + 1}"
        header, ordered = _header(shard.entries, self.metadata)
        with open(shard.spool, "rb") as src, open(path, "wb") as dst:
            dst.write(header)
            for e in ordered:
                src.seek(e.start)
                left = e.nbytes
                while left:
                    block = src.read(min(left, _COPY_CHUNK))
                    if not block:
                        raise OutputError(f"spool file {shard.spool} is shorter than written (disk full?)")
                    dst.write(block)
                    left -= len(block)
        os.remove(shard.spool)
        self.shards.append(path)

    def close(self) -> list[Path]:
        if self._open is not None:
            self._close_shard()
        return list(self.shards)

    def abort(self) -> None:
        """Remove the spool of an unfinished shard (the caller removes the whole directory anyway)."""
        if self._spool_file is not None:
            self._spool_file.close()
            self._spool_file = None
        if self._open is not None and self._open.spool.exists():
            os.remove(self._open.spool)
        self._open = None
