"""Write a whole output directory or nothing: build it in a hidden sibling, rename it into place at the end.

    with atomic_output_dir("out/model-w8a8", overwrite=False) as tmp:
        ...write files under tmp...

- A non-empty `path` is refused unless `overwrite=True`; an empty directory is replaced silently. `overwrite`
  replaces only a slimquant output (its `.slimquant-output` marker, which every output gets, or the
  `quant_model_description_*.json` of an older one) that is not an input of the run nor holds one.
- The output's place is reserved before any work (`OutputReservation`): the parent folders it needs, a lock file
  `.NAME.lock` that a second run on the same output finds taken, and the temporary directory.
- With `overwrite=True` the old directory is renamed aside, the new one renamed in, then the old one deleted;
  if the second rename fails the old directory is put back. `path` never holds a half-written tree.
- On any exception inside the block the temporary directory is deleted and the exception propagates
  (an OSError becomes an OutputError naming the path).
- A run killed outright (SIGKILL, power loss) cannot clean up: its temporary directory carries the process id,
  and the next run for the same path deletes it, with a warning, once that process is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from slimquant.errors import OutputError

log = logging.getLogger(__name__)

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"
LOCK_MARK = ".lock"
OUTPUT_MARKER = ".slimquant-output"
OUTPUT_MARKER_TEXT = '{"slimquant_output": 1}\n'  # the same bytes in every output: outputs compare byte for byte


def _existing_ancestor(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return Path(".")


def is_slimquant_output(path: Path) -> bool:
    return (path / OUTPUT_MARKER).is_file() or any(path.glob("quant_model_description_*.json"))


def _contains(outer: Path, inner: Path) -> bool:
    """`inner` is `outer` or lies inside it (both resolved)."""
    return inner == outer or outer in inner.parents


def check_not_an_input(path: Path, inputs: Iterable[str | os.PathLike | None], what: str = "output directory") -> None:
    """Refuse `path` when it is, or holds, an input of the run or the current directory: replacing or emptying it
    would delete what the run reads."""
    resolved = path.resolve()
    for item in [*(i for i in inputs if i), Path.cwd()]:
        source = Path(item).resolve()
        if _contains(resolved, source):
            name = "the current directory" if item == Path.cwd() else f"the run's input {item}"
            relation = "is" if resolved == source else "holds"
            raise OutputError(f"{what} {path} {relation} {name}: choose another directory")


def check_output_dir(path: str | os.PathLike, overwrite: bool, inputs: Iterable = ()) -> Path:
    """Fail early (before any work) if `path` cannot become the output directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output path {path} exists and is not a directory")
    if path.exists():
        check_not_an_input(path, inputs)
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise OutputError(f"output directory {path} exists and is not empty; pass --overwrite (overwrite=True) "
                              "to replace it")
        if not is_slimquant_output(path):
            raise OutputError(f"output directory {path} is not a slimquant output (no {OUTPUT_MARKER} or "
                              "quant_model_description_*.json): --overwrite replaces only slimquant outputs; "
                              "choose another directory")
    ancestor = _existing_ancestor(path.parent.absolute())
    if not ancestor.is_dir():
        raise OutputError(f"cannot create output directory {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create output directory {path}: {ancestor} is not writable "
                          "(permissions or a read-only file system)")
    return path


def _sibling(path: Path, mark: str) -> Path:
    return path.parent / f".{path.name}{mark}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def process_alive(pid: int) -> bool:
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
        if not match or not sibling.is_dir() or process_alive(int(match.group(2))):
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


def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}{LOCK_MARK}"


def _take_lock(path: Path) -> int:
    """An exclusive flock on `.NAME.lock` beside the output, holding this process's id; a second run on the same
    output is refused naming the first."""
    lock = _lock_path(path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(f"output directory {path} is being written by another slimquant run (process "
                              f"{holder}); wait for it to finish or choose another output") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino  # not a lock file its last holder just removed
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)


def _make_parents(directory: Path) -> list[Path]:
    """Create `directory` and its missing parents; return those created, deepest first."""
    missing = [p for p in [directory, *directory.parents] if not p.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    return missing


class OutputReservation:
    """An output directory's place, taken before any work: its parent folders, the lock, the temporary directory.

        reservation = OutputReservation(path, overwrite, inputs=[model_path]).open()   # fails up front
        ...work..., write under reservation.tmp
        reservation.commit()    # swap in; or reservation.abort() to remove all it created
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False, inputs: Iterable = ()):
        self.path = Path(path)
        self.overwrite = overwrite
        self.inputs = [i for i in inputs if i]
        self.tmp: Path | None = None
        self.committed = False
        self._lock_fd: int | None = None
        self._created_parents: list[Path] = []

    def open(self) -> OutputReservation:
        remove_stale_siblings(self.path)
        check_output_dir(self.path, self.overwrite, self.inputs)
        try:
            try:
                self._created_parents = _make_parents(self.path.parent)
                self._lock_fd = _take_lock(self.path)
                self.tmp = _sibling(self.path, TMP_MARK)
                self.tmp.mkdir()
            except OSError as exc:
                raise OutputError(f"cannot create output directory next to {self.path}: {exc}") from exc
        except BaseException:  # also a SIGTERM/Ctrl-C right here: leave nothing behind
            self.abort()
            raise
        return self

    @contextlib.contextmanager
    def aborted_on_failure(self) -> Iterator[None]:
        """Any exception inside removes what the reservation created; an OSError becomes an OutputError."""
        try:
            yield
        except OSError as exc:
            self.abort()
            raise OutputError(f"cannot write output directory {self.path}: {exc}") from exc
        except BaseException:
            self.abort()
            raise

    def commit(self) -> None:
        """Put the finished temporary directory in place of the output (marked as a slimquant output)."""
        with self.aborted_on_failure():
            check_output_dir(self.path, self.overwrite, self.inputs)  # someone may have written there meanwhile
            (self.tmp / OUTPUT_MARKER).write_text(OUTPUT_MARKER_TEXT)
            _swap_in(self.tmp, self.path)
        self.committed = True
        self._created_parents = []
        self._release_lock()

    def abort(self) -> None:
        """Remove what the reservation created (temporary directory, lock, parent folders); safe to call twice."""
        if self.tmp is not None and not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._release_lock()
        for parent in self._created_parents:
            with contextlib.suppress(OSError):
                parent.rmdir()  # only while empty
        self._created_parents = []

    def _release_lock(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            _lock_path(self.path).unlink()
        os.close(self._lock_fd)
        self._lock_fd = None


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False,
                      reservation: OutputReservation | None = None) -> Iterator[Path]:
    """Yield the temporary directory to write into (`reservation`'s, when the place was reserved up front)."""
    reservation = reservation or OutputReservation(path, overwrite).open()
    with reservation.aborted_on_failure():
        yield reservation.tmp
    reservation.commit()
