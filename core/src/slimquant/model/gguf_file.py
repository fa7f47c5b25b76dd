"""Is a file a whole GGUF file? Its header, metadata and tensor table are walked, and the tensors' data must fit in
the file, before transformers reads it (which fails on a truncated file with struct or numpy errors, or after
dequantizing half of it)."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from slimquant.errors import ModelStructureError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
STRING, ARRAY = 8, 9
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                  12: "<d"}


class _Truncated(Exception):
    """The file ends inside what its header says comes next."""


class _Cursor:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _Truncated(f"it ends at byte {len(self.data)}, inside a field that needs {n} bytes at {self.pos}")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item_kind, count = self.unpack("<I"), self.unpack("<Q")
            if item_kind in SCALAR_FORMATS:  # skipped whole: only its size matters here
                self.take(count * struct.calcsize(SCALAR_FORMATS[item_kind]))
                return None
            for _ in range(count):
                self.value(item_kind)
            return None
        if kind not in SCALAR_FORMATS:
            raise ValueError(f"unknown metadata value type {kind}")
        return self.unpack(SCALAR_FORMATS[kind])


def _tensor_bytes(kind: int, dims: list[int]) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    count = 1
    for d in dims:
        count *= d
    return count // block * size


def _needed_size(cursor: _Cursor) -> int:
    """The file size the header, metadata and tensor table call for."""
    if cursor.take(4) != MAGIC:
        raise ValueError("it does not start with the GGUF magic bytes")
    version = cursor.unpack("<I")
    if version not in VERSIONS:
        raise ValueError(f"GGUF version {version} is not one of {VERSIONS}")
    tensors, entries = cursor.unpack("<Q"), cursor.unpack("<Q")
    alignment = DEFAULT_ALIGNMENT
    for _ in range(entries):
        key = cursor.string()
        value = cursor.value(cursor.unpack("<I"))
        if key == ALIGNMENT_KEY and isinstance(value, int) and value > 0:
            alignment = value
    end = 0
    for _ in range(tensors):
        cursor.string()
        dims = [cursor.unpack("<Q") for _ in range(cursor.unpack("<I"))]
        kind, offset = cursor.unpack("<I"), cursor.unpack("<Q")
        end = max(end, offset + _tensor_bytes(kind, dims))
    data_start = -(-cursor.pos // alignment) * alignment
    return data_start + end


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def check_gguf_file(path: str | Path) -> None:
    """Refuse a file that is not a whole GGUF file, naming what is wrong."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f, (mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else
                                     memoryview(b"")) as data:
            needed = _needed_size(_Cursor(data))
    except OSError as exc:
        raise ModelStructureError(f"cannot read GGUF file {path}: {exc.strerror}") from None
    except _Truncated as exc:
        raise ModelStructureError(f"{path} is not a valid GGUF file (truncated?): {exc}") from None
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise ModelStructureError(f"{path} is not a valid GGUF file: {exc}") from None
    if needed > size:
        raise ModelStructureError(f"{path} is not a valid GGUF file (truncated?): its tensors need {needed} bytes, "
                                  f"the file has {size}")
