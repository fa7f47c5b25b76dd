"""Resume checkpoints of the layer-by-layer runtime: safetensors + JSON, each file written whole or not at all.

    <checkpoint_dir>/
      .slimquant-checkpoint       the marker: this directory is a slimquant checkpoint, and whether slimquant
                                  created the directory (then it removes the directory too once it is empty)
      manifest.json               format, fingerprint, per finished layer: file, sha256, layer_state meta,
                                  LayerReport, its Linears' errors; the hidden-states file and its sha256
      layer.00003.safetensors     decoder layer 3's whole state_dict after quantization (see layer_state)
      hidden.00003.safetensors    the hidden states layer 3 gave, which feed layer 4 ("batch.<i>" per batch)

Every file is written to `<name>.tmp-<pid>` and renamed into place; the manifest is written last, so it is the
commit point: a run killed anywhere leaves a manifest naming only whole, checked files. Only the newest hidden
states are kept. A resume checks the fingerprint (`slimquant.runtime.fingerprint`) and every file's sha256 first.

slimquant deletes only what it wrote: an existing non-empty directory without the marker is refused, the
manifest may name only `layer.NNNNN.safetensors` / `hidden.NNNNN.safetensors` inside the directory, and
`remove_checkpoint` deletes the checkpoint's own files, then the directory only if slimquant created it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from slimquant.errors import CheckpointError
from slimquant.export.atomic import process_alive
from slimquant.export.names import sha256_file
from slimquant.runtime.fingerprint import differences
from slimquant.runtime.layer_state import layer_state, restore_layer_state

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
MARKER = ".slimquant-checkpoint"
TMP_MARK = ".tmp-"
LAYER_FILE = "layer.{:05d}.safetensors"
HIDDEN_FILE = "hidden.{:05d}.safetensors"
OWN_FILE = re.compile(r"(manifest\.json|(layer|hidden)\.\d{5}\.safetensors)")
PARTIAL_FILE = re.compile(r"(manifest\.json|(layer|hidden)\.\d{5}\.safetensors|\.slimquant-checkpoint)"
                          + re.escape(TMP_MARK) + r"(\d+)")


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    _write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, sort_keys=True)))


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    _write_atomically(path, lambda tmp: save_file(tensors, str(tmp)))
    return sha256_file(path)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def _read_marker(directory: Path) -> dict | None:
    try:
        marker = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


def _holds_only_checkpoint_files(directory: Path) -> bool:
    """A checkpoint written before checkpoints had a marker: a manifest and nothing but checkpoint files."""
    names = [p.name for p in directory.iterdir()]
    return MANIFEST in names and all(OWN_FILE.fullmatch(n) or PARTIAL_FILE.fullmatch(n) for n in names)


def is_checkpoint_dir(directory: Path) -> bool:
    return (directory / MARKER).is_file() or _holds_only_checkpoint_files(directory)


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_checkpoint_dir(directory: str | os.PathLike, output: str | os.PathLike | None = None,
                         inputs=(), resume: bool | None = None) -> Path:
    """Refuse, before any work, a checkpoint directory slimquant may not write into or later delete from: a file,
    an existing folder that is not a slimquant checkpoint, the output (or a folder inside it, which the saved
    output replaces), a folder that is or holds an input of the run. With `resume` given, also an earlier run's
    checkpoint that a fresh run would be refused (resume=False) or whose manifest is malformed (resume=True)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} is a file")
    resolved = directory.resolve()
    if output is not None and _contains(Path(output).resolve(), resolved):
        where = "is" if resolved == Path(output).resolve() else "is inside"
        raise CheckpointError(f"checkpoint directory {directory} {where} the output directory {output}, which the "
                              "saved output replaces: choose one outside it (default: <output>.checkpoint)")
    for item in (i for i in inputs if i):
        if _contains(resolved, Path(item).resolve()):
            relation = "is" if resolved == Path(item).resolve() else "holds"
            raise CheckpointError(f"checkpoint directory {directory} {relation} the run's input {item}: choose "
                                  "another --checkpoint-dir")
    if _contains(resolved, Path.cwd()):
        raise CheckpointError(f"checkpoint directory {directory} is or holds the current directory: choose another "
                              "--checkpoint-dir")
    if directory.is_dir() and any(directory.iterdir()) and not is_checkpoint_dir(directory):
        raise CheckpointError(f"checkpoint directory {directory} exists and is not a slimquant checkpoint (no "
                              f"{MARKER}): give a new or empty directory for the checkpoint")
    if resume is not None and (directory / MANIFEST).exists():
        if not resume:
            raise _earlier_run(directory)
        _read_manifest(directory / MANIFEST)
    return directory


def _earlier_run(directory: Path) -> CheckpointError:
    return CheckpointError(f"checkpoint directory {directory} holds a checkpoint of an earlier run: resume it "
                           "(--resume, runtime.resume: true) or delete the directory")


def claim_checkpoint_dir(directory: str | os.PathLike) -> bool:
    """Create `directory` (or take an empty one, or one of slimquant's) and write its marker; True if this call
    wrote the marker. A directory that cannot be created or written is refused here, before any work."""
    directory = check_checkpoint_dir(directory)
    if (directory / MARKER).is_file():
        return False
    try:
        directory.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
    except OSError as exc:
        raise CheckpointError(f"cannot create checkpoint directory {directory}: {exc.strerror or exc}") from None
    try:
        _write_json(directory / MARKER, {"format": FORMAT, "created_by_slimquant": created})
    except BaseException as exc:
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()
        if isinstance(exc, OSError):
            raise CheckpointError(f"cannot write into checkpoint directory {directory}: {exc.strerror or exc}") \
                from None
        raise
    return True


def release_unused_checkpoint_dir(directory: str | os.PathLike) -> None:
    """After a run that stopped before any layer was checkpointed: remove the marker, and the directory when
    slimquant created it, so that nothing is left behind. A checkpoint with finished layers is kept."""
    directory = Path(directory)
    if not (directory / MARKER).is_file() or (directory / MANIFEST).exists():
        return
    remove_checkpoint(directory)


def remove_checkpoint(directory: str | os.PathLike) -> None:
    """Delete the checkpoint's own files (the manifest's layer and hidden-states files, the manifest, partial
    `*.tmp-PID` files, the marker), then the directory if slimquant created it and it is empty. A directory that
    is not a slimquant checkpoint is left alone."""
    directory = Path(directory)
    if not directory.is_dir() or not is_checkpoint_dir(directory):
        if directory.exists():
            log.warning("not removing %s: it is not a slimquant checkpoint", directory)
        return
    marker = _read_marker(directory)
    for path in directory.iterdir():
        if OWN_FILE.fullmatch(path.name) or PARTIAL_FILE.fullmatch(path.name):
            path.unlink(missing_ok=True)
    (directory / MARKER).unlink(missing_ok=True)
    if marker is not None and marker.get("created_by_slimquant") is True:
        with contextlib.suppress(OSError):
            directory.rmdir()  # only while empty: whatever else is there stays


class Checkpoint:
    """One run's checkpoint directory. `start` opens it for a fresh run or a resume; `finished` lists what an
    earlier run completed (empty on a fresh run)."""

    def __init__(self, directory: Path, fingerprint: dict, num_layers: int, manifest: dict | None = None):
        self.directory = directory
        self.manifest = manifest or {"format": FORMAT, "fingerprint": fingerprint, "num_layers": num_layers,
                                     "layers": [], "hidden": None}

    @classmethod
    def start(cls, directory: str | os.PathLike, fingerprint: dict, num_layers: int, resume: bool) -> Checkpoint:
        directory = Path(directory)
        manifest_path = directory / MANIFEST
        claim_checkpoint_dir(directory)
        if not manifest_path.exists():
            if resume:
                log.warning("nothing to resume in %s: starting from the first layer", directory)
            _remove_partial_files(directory)
            return cls(directory, fingerprint, num_layers)
        if not resume:
            raise _earlier_run(directory)
        manifest = _read_manifest(manifest_path)
        _remove_partial_files(directory)
        changed = differences(manifest["fingerprint"], fingerprint)
        if manifest["num_layers"] != num_layers:
            changed.append(f"the model has {num_layers} decoder layers, the checkpoint {manifest['num_layers']}")
        if changed:
            raise CheckpointError(f"cannot resume from {directory}: it was written by another run ("
                                  + "; ".join(changed) + "). Run without resume after deleting the directory")
        checkpoint = cls(directory, fingerprint, num_layers, manifest)
        checkpoint._check_files()
        return checkpoint

    @property
    def finished(self) -> list[dict]:
        return self.manifest["layers"]

    def _check_files(self) -> None:
        entries = [*self.finished, *([self.manifest["hidden"]] if self.manifest["hidden"] else [])]
        for entry in entries:
            path = self.directory / entry["file"]
            if not path.is_file():
                raise CheckpointError(f"checkpoint file {path} is missing; delete {self.directory} to start over")
            if sha256_file(path) != entry["sha256"]:
                raise CheckpointError(f"checkpoint file {path} is corrupt or truncated (its sha256 differs from "
                                      f"{MANIFEST}); delete {self.directory} to start over")

    def restore_layer(self, index: int, layer: nn.Module, assign: bool = False) -> None:
        """Layer `index` as it was finished; assign=True fills a meta-device skeleton with the saved tensors."""
        entry = self.finished[index]
        try:
            restore_layer_state(layer, _read_tensors(self.directory / entry["file"]), entry["state"], assign)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CheckpointError(f"checkpoint of layer {index} in {self.directory} does not fit the model or its "
                                  f"manifest entry ({type(exc).__name__}: {exc}); delete the directory to start "
                                  "over") from None

    def hidden(self) -> list[torch.Tensor] | None:
        entry = self.manifest["hidden"]
        if entry is None:
            return None
        tensors = _read_tensors(self.directory / entry["file"])
        return [tensors[f"batch.{i}"] for i in range(entry["batches"])]

    def save_layer(self, index: int, layer: nn.Module, hidden: list[torch.Tensor] | None, report: dict,
                   linear_errors: dict[str, float]) -> None:
        """Record layer `index` as finished, with the hidden states it gave (None on the data-free path)."""
        if index != len(self.finished):
            raise RuntimeError(f"checkpoint of layer {index} after {len(self.finished)} finished layers")
        tensors, state = layer_state(layer)
        name = LAYER_FILE.format(index)
        entry = {"file": name, "sha256": _write_tensors(self.directory / name, tensors), "state": state,
                 "report": report, "linear_errors": linear_errors}
        old_hidden = self.manifest["hidden"]
        new_hidden = None
        if hidden is not None:
            hidden_name = HIDDEN_FILE.format(index)
            batches = {f"batch.{i}": h.detach().to("cpu").contiguous() for i, h in enumerate(hidden)}
            new_hidden = {"file": hidden_name, "batches": len(hidden),
                          "sha256": _write_tensors(self.directory / hidden_name, batches)}
        self.manifest = {**self.manifest, "layers": [*self.finished, entry], "hidden": new_hidden}
        _write_json(self.directory / MANIFEST, self.manifest)
        if old_hidden is not None:
            (self.directory / old_hidden["file"]).unlink(missing_ok=True)


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint manifest {path} cannot be read ({exc}); delete {path.parent} to start "
                              "over") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint manifest {path} is not a slimquant checkpoint of format {FORMAT}; delete "
                              f"{path.parent} to start over")
    problem = _manifest_problem(manifest)
    if problem:
        raise CheckpointError(f"checkpoint manifest {path} is malformed: {problem}; delete {path.parent} to start "
                              "over")
    return manifest


_LAYER_FIELDS = {"file": str, "sha256": str, "state": dict, "report": dict, "linear_errors": dict}
_HIDDEN_FIELDS = {"file": str, "sha256": str, "batches": int}


def _field_problem(entry, fields: dict[str, type], what: str) -> str | None:
    if not isinstance(entry, dict):
        return f"{what} is not an object"
    for key, kind in fields.items():
        if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
            return f"{what} has no {key} ({kind.__name__})"
    return None


def _manifest_problem(manifest: dict) -> str | None:
    """What is wrong with a manifest's structure; file names must be exactly those a run writes (plain names in
    the checkpoint directory), so that nothing outside it is read or deleted."""
    if not isinstance(manifest.get("fingerprint"), dict):
        return "no fingerprint object"
    if not isinstance(manifest.get("num_layers"), int) or isinstance(manifest.get("num_layers"), bool):
        return "no num_layers number"
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        return "no list of finished layers"
    for index, entry in enumerate(layers):
        problem = _field_problem(entry, _LAYER_FIELDS, f"layer entry {index}")
        if problem:
            return problem
        if entry["file"] != LAYER_FILE.format(index):
            return f"layer entry {index} names file {entry['file']!r}, not {LAYER_FILE.format(index)}"
    hidden = manifest.get("hidden")
    if hidden is not None:
        problem = _field_problem(hidden, _HIDDEN_FIELDS, "the hidden-states entry")
        if problem:
            return problem
        expected = HIDDEN_FILE.format(len(layers) - 1)
        if not layers or hidden["file"] != expected:
            return f"the hidden-states entry names file {hidden['file']!r}, not {expected}"
        if hidden["batches"] < 0:
            return "the hidden-states entry has a negative number of batches"
    return None


def _remove_partial_files(directory: Path) -> None:
    """Files a killed run was writing when it died: never named by the manifest, safe to delete (only those of
    processes that are gone: another run may be writing its own)."""
    for path in directory.iterdir():
        match = PARTIAL_FILE.fullmatch(path.name)
        pid = int(match.group(3)) if match else None
        if match and (pid == os.getpid() or not process_alive(pid)):
            log.warning("removing %s, a checkpoint file a killed run did not finish writing", path)
            path.unlink(missing_ok=True)
