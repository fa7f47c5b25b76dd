"""Saving quantized models, atomically, in the formats of the installed exporter plugins.

`save_quantized` is what the Calibrator API and the CLI call. Each format is an exporter found through the
entry-point group `slimquant.exporters` (the msModelSlim layout's `safe_tensor` and `numpy` come with the core,
`slimquant.export.ascend`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from slimquant.errors import OutputError, PluginError
from slimquant.export.atomic import (
    LOCK_MARK,
    OLD_MARK,
    OUTPUT_MARKER,
    TMP_MARK,
    OutputReservation,
    atomic_output_dir,
    check_output_dir,
    remove_stale_siblings,
)
from slimquant.plugins import EXPORTERS, PluginSet, installed, load_exporters, refuse_features

__all__ = ["OutputReservation", "atomic_output_dir", "check_save_args", "formats_installed", "save_quantized"]

log = logging.getLogger(__name__)
# what other slimquant runs put beside their outputs meanwhile: temporary, set-aside and lock entries
_RUN_SIBLING = re.compile(rf"^\..+({re.escape(TMP_MARK)}|{re.escape(OLD_MARK)})\d+-[0-9a-f]+$"
                          rf"|^\..+{re.escape(LOCK_MARK)}$")


def formats_installed() -> list[str]:
    return list(installed(EXPORTERS))


def _formats(save_type: str | Sequence[str]) -> list[str]:
    formats = [save_type] if isinstance(save_type, str) else list(save_type)
    known = formats_installed()
    if not formats:
        raise OutputError(f"save_type is empty; use one or more of {', '.join(known)}")
    for fmt in formats:
        if fmt not in known:
            raise OutputError(f"unknown save_type {fmt!r}; installed formats: {', '.join(known)}")
    return list(dict.fromkeys(formats))


def check_save_args(output_dir, save_type, part_file_size, overwrite: bool, inputs=()) -> tuple[list[str], Path]:
    """Everything about a save that can be wrong before any work: the formats, the shard size, the directory
    (`inputs`: paths the run reads, which the output must neither be nor hold)."""
    formats = _formats(save_type)
    if isinstance(part_file_size, bool) or not isinstance(part_file_size, int | float) or not part_file_size >= 0:
        raise OutputError(f"part_file_size must be a number of GiB >= 0 (0 = one file), got {part_file_size!r}")
    remove_stale_siblings(Path(output_dir))
    return formats, check_output_dir(output_dir, overwrite, inputs)


def save_quantized(model: nn.Module, output_dir: str | os.PathLike, save_type: str | Sequence[str] = ("safe_tensor",),
                   part_file_size: float = 0, overwrite: bool = False, linear_types: dict[str, str] | None = None,
                   tokenizer=None, pack_int4: bool = True, reservation: OutputReservation | None = None) -> list[Path]:
    """Write the fake-quantized `model` to `output_dir` in each format of `save_type`; return the files written.

    part_file_size: shard size in GiB for safetensors (0 = one file). The directory appears complete or not at
    all; an existing non-empty directory is refused unless overwrite=True. `tokenizer`, when given, is saved
    alongside (MindIE and vLLM Ascend load tokenizer files from the weights directory). `reservation`: the
    output's place taken before the work (`OutputReservation`), written into instead of reserving it now.
    """
    formats, final = check_save_args(output_dir, save_type, part_file_size, overwrite)
    exporters = PluginSet(load_exporters(formats))
    options = {"part_file_size": part_file_size, "linear_types": linear_types, "pack_int4": pack_int4}
    written: set[Path] = set()
    with atomic_output_dir(final, overwrite, reservation) as tmp:
        for fmt in formats:  # what no format can hold is refused before any of them writes
            refuse_features(model, exporters.get(fmt), fmt)
        for fmt in formats:
            beside = _entries(tmp.parent)
            try:
                files = exporters.call(fmt, "export", model=model, output_dir=tmp, options=options)
            finally:
                strays = _remove_strays(fmt, tmp, beside)
            if strays:
                raise PluginError(f"exporter {fmt!r} wrote {', '.join(map(str, strays))} outside its output folder "
                                  f"{tmp} (removed); an exporter writes only under its output_dir")
            if files is None:
                raise OutputError(f"the {fmt!r} exporter wrote nothing")
            written.update(_relative(fmt, tmp, files))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
            written.update(p.relative_to(tmp) for p in tmp.iterdir() if p.is_file())
    return sorted(final / p for p in written)


def _entries(folder: Path) -> dict[str, tuple[int, int] | None]:
    """Each entry of `folder`: for a file its modification time and size, None for anything else."""
    entries = {}
    for path in folder.iterdir():
        try:
            stat = path.lstat()
        except FileNotFoundError:  # removed meanwhile
            continue
        entries[path.name] = (stat.st_mtime_ns, stat.st_size) if path.is_file() else None
    return entries


def _remove_strays(fmt: str, tmp: Path, before: dict[str, tuple[int, int] | None]) -> list[Path]:
    """The entries an exporter created beside its temporary output folder, removed; another slimquant run's entries
    are not its doing. A file that was there and changed is only warned about: a log written meanwhile by another
    process (`... | tee out.log` beside the output) changes too."""
    strays = []
    for name, state in _entries(tmp.parent).items():
        path = tmp.parent / name
        if name == tmp.name or _RUN_SIBLING.match(name) or (path / OUTPUT_MARKER).is_file():
            continue
        if name not in before:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            strays.append(path)
        elif state is not None and state != before[name]:
            log.warning("%s changed while exporter %r wrote %s: an exporter writes only under its output_dir", path,
                        fmt, tmp)
    return strays


def _relative(fmt: str, tmp: Path, files) -> list[Path]:
    """The files an exporter says it wrote, relative to its output folder, which must hold them."""
    relative = []
    for file in files:
        try:
            relative.append(Path(file).relative_to(tmp))
        except ValueError:
            raise PluginError(f"exporter {fmt!r} returned {file}, which is not inside its output folder "
                              f"{tmp}") from None
    return relative
