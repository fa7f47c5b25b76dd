"""Give freed heap memory back to the operating system (glibc keeps it for reuse, and RSS stays high)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def return_free_memory() -> None:
    """glibc's malloc_trim(0); nothing elsewhere (musl, macOS, Windows)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
