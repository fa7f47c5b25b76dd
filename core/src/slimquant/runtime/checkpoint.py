"""Resume checkpoints of the layer-by-layer runtime: safetensors + JSON, each file written whole or not at all.

    <checkpoint_dir>/
      manifest.json               format, fingerprint, per finished layer: file, sha256, layer_state meta,
                                  LayerReport, its Linears' errors; the hidden-states file and its sha256
      layer.00003.safetensors     decoder layer 3's whole state_dict after quantization (see layer_state)
      hidden.00003.safetensors    the hidden states layer 3 gave, which feed layer 4 ("batch.<i>" per batch)

Every file is written to `<name>.tmp-<pid>` and renamed into place; the manifest is written last, so it is the
commit point: a run killed anywhere leaves a manifest naming only whole, checked files. Only the newest hidden
states are kept. A resume checks the fingerprint (`slimquant.runtime.fingerprint`) and every file's sha256 first.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from slimquant.errors import CheckpointError
from slimquant.export.names import sha256_file
from slimquant.runtime.fingerprint import differences
from slimquant.runtime.layer_state import layer_state, restore_layer_state

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
TMP_MARK = ".tmp-"


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


def remove_checkpoint(directory: str | os.PathLike) -> None:
    shutil.rmtree(directory, ignore_errors=True)


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
        if directory.exists() and not directory.is_dir():
            raise CheckpointError(f"checkpoint directory {directory} is a file")
        if not manifest_path.exists():
            if resume:
                log.warning("nothing to resume in %s: starting from the first layer", directory)
            if directory.exists():
                _remove_partial_files(directory)
            directory.mkdir(parents=True, exist_ok=True)
            return cls(directory, fingerprint, num_layers)
        if not resume:
            raise CheckpointError(f"checkpoint directory {directory} holds a checkpoint of an earlier run: resume it "
                                  "(--resume, runtime.resume: true) or delete the directory")
        _remove_partial_files(directory)
        manifest = _read_manifest(manifest_path)
        changed = differences(manifest.get("fingerprint", {}), fingerprint)
        if manifest.get("num_layers") != num_layers:
            changed.append(f"the model has {num_layers} decoder layers, the checkpoint {manifest.get('num_layers')}")
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
        restore_layer_state(layer, _read_tensors(self.directory / entry["file"]), entry["state"], assign)

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
        name = f"layer.{index:05d}.safetensors"
        entry = {"file": name, "sha256": _write_tensors(self.directory / name, tensors), "state": state,
                 "report": report, "linear_errors": linear_errors}
        old_hidden = self.manifest["hidden"]
        new_hidden = None
        if hidden is not None:
            hidden_name = f"hidden.{index:05d}.safetensors"
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
    if not isinstance(manifest.get("layers"), list):
        raise CheckpointError(f"checkpoint manifest {path} has no list of finished layers; delete {path.parent}")
    return manifest


def _remove_partial_files(directory: Path) -> None:
    """Files a killed run was writing when it died: never named by the manifest, safe to delete."""
    for path in directory.glob(f"*{TMP_MARK}*"):
        log.warning("removing %s, a checkpoint file a killed run did not finish writing", path)
        path.unlink(missing_ok=True)
