"""Write a whole output directory or nothing: build it in a hidden sibling, rename it into place at the end.

    with atomic_output_dir("out/model-w8a8", overwrite=False) as tmp:
        ...write files under tmp...

- A non-empty `path` is refused unless `overwrite=True`; an empty directory is replaced silently.
- With `overwrite=True` the old directory is renamed aside, the new one renamed in, then the old one deleted;
  if the second rename fails the old directory is put back. `path` never holds a half-written tree.
- On any exception inside the block the temporary directory is deleted and the exception propagates
  (an OSError becomes an OutputError naming the path).
- A run killed outright (SIGKILL, power loss) cannot clean up: its temporary directory carries the process id,
  and the next run for the same path deletes it, with a warning, once that process is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from slimquant.errors import OutputError

log = logging.getLogger(__name__)

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


def _existing_ancestor(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return Path(".")


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (before any work) if `path` cannot become the output directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output path {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputError(f"output directory {path} exists and is not empty; pass --overwrite (overwrite=True) "
                          "to replace it")
    ancestor = _existing_ancestor(path.parent.absolute())
    if not ancestor.is_dir():
        raise OutputError(f"cannot create output directory {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create output directory {path}: {ancestor} is not writable "
                          "(permissions or a read-only file system)")
    return path


def _sibling(path: Path, mark: str) -> Path:
    return path.parent / f".{path.name}{mark}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_siblings(path: Path) -> None:
    """Delete what a killed run left next to `path`: `.NAME.tmp-PID-*` / `.NAME.old-PID-*` of dead processes."""
    if not path.parent.is_dir():
        return
    pattern = re.compile(re.escape(f".{path.name}") + r"\.(tmp|old)-(\d+)-[0-9a-f]+$")
    for sibling in path.parent.iterdir():
        match = pattern.match(sibling.name)
        if not match or not sibling.is_dir() or _process_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not path.exists():  # the swap was cut between its two renames
            os.replace(sibling, path)
            log.warning("restored %s from %s, left by an interrupted run", path, sibling.name)
            continue
        shutil.rmtree(sibling, ignore_errors=True)
        log.warning("removed %s, left by an interrupted run (process %s)", sibling, match.group(2))


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
    remove_stale_siblings(Path(path))
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
