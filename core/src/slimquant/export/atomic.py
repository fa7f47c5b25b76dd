"""Write a whole output directory or nothing: build it in a hidden sibling, rename it into place at the end.

    with atomic_output_dir("out/model-w8a8", overwrite=False) as tmp:
        ...write files under tmp...

- A non-empty `path` is refused unless `overwrite=True`; an empty directory is replaced silently.
- With `overwrite=True` the old directory is renamed aside, the new one renamed in, then the old one deleted;
  if the second rename fails the old directory is put back. `path` never holds a half-written tree.
- On any exception inside the block the temporary directory is deleted and the exception propagates
  (an OSError becomes an OutputError naming the path).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from slimquant.errors import OutputError

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (before any work) if `path` cannot become the output directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output path {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputError(f"output directory {path} exists and is not empty; pass overwrite=True to replace it")
    return path


def _sibling(path: Path, mark: str) -> Path:
    return path.parent / f".{path.name}{mark}{uuid.uuid4().hex[:8]}"


def _swap_in(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.replace(tmp, path)
        return
    old = _sibling(path, OLD_MARK)
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    path = check_output_dir(path, overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _sibling(path, TMP_MARK)
        tmp.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot create output directory next to {path}: {exc}") from exc
    try:
        yield tmp
        check_output_dir(path, overwrite)  # someone may have written there meanwhile
        _swap_in(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot write output directory {path}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
