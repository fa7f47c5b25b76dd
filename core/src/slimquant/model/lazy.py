"""A safetensors checkpoint opened without reading its weights: a meta-device skeleton, filled one part at a time.

    lazy = LazyCheckpoint.open(spec, config)
    lazy.model                        # the model with every parameter on the meta device (buffers are real)
    layer = lazy.load_layer(3, dev)   # decoder layer 3 read from disk into lazy.layers[3]
    lazy.release_layer(3)             # back to a meta skeleton: its memory is free again

Files are opened for each read and closed after it, so the pages a read mapped leave the process with it.
Tensors are converted to the dtype the skeleton gives them (the recipe's `model.dtype`). The checkpoint's tensor
names must be the model's own (Llama, Qwen2/3, Mistral, Gemma, Phi, OPT, GPT-2 and most others); a checkpoint
that transformers renames on loading is refused, naming the tensors it lacks.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from slimquant.config.recipe import ModelSpec
from slimquant.errors import ModelStructureError
from slimquant.export.names import sha256_file
from slimquant.model.structure import find_decoder_layers, normalize_layer

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device and their buffers (rotary tables) for real."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:  # a parameter tied to another is already on meta
            kind = type(module._parameters[name])
            module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> file, from model.safetensors.index.json or from the headers of every *.safetensors."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelStructureError(f"{index} is not a safetensors index (no weight_map): {exc}") from None
        return {key: folder / name for key, name in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelStructureError(f"lazy loading reads safetensors checkpoints; {folder} holds no *.safetensors file")
    location: dict[str, Path] = {}
    for path in files:
        for key in _keys(path):
            location.setdefault(key, path)
    return location


def _keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as exc:
        raise ModelStructureError(f"cannot read the safetensors file {path}: {exc}") from None


class LazyCheckpoint:
    def __init__(self, model: nn.Module, location: dict[str, Path], folder: Path):
        self.model = model
        self.location = location
        self.folder = folder
        self.prefix, self.layers = find_decoder_layers(model)
        # each layer as the checkpoint stores it, before Conv1D / fused experts are rewritten
        self._stored = [copy.deepcopy(layer) for layer in self.layers]
        self._skeleton: dict[int, nn.Module] = {}  # a loaded layer's meta skeleton, put back on release
        self._check_tensors()

    @classmethod
    def open(cls, spec: ModelSpec, config) -> LazyCheckpoint:
        from transformers import AutoModelForCausalLM

        if spec.path is None or spec.gguf_file or not Path(spec.path).is_dir():
            raise ModelStructureError("lazy loading needs model.path to be a folder with a safetensors checkpoint "
                                      f"(config.json + *.safetensors), got {spec.path or 'the embedded GGUF model'}")
        folder = Path(spec.path)
        location = checkpoint_files(folder)
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec.dtype),
                                                     trust_remote_code=spec.trust_remote_code)
        model.eval()
        return cls(model, location, folder)

    def _check_tensors(self) -> None:
        """Every tensor the model needs is in the checkpoint with the shape the model gives it."""
        shapes = self._stored_shapes()
        missing = [k for k in shapes if k not in self.location]
        if missing:
            raise ModelStructureError(
                f"the checkpoint at {self.folder} has no tensor named {missing[0]!r} ({len(missing)} of "
                f"{len(shapes)} model tensors are missing): it stores them under other names, which transformers "
                "renames while loading. Load this model without lazy loading")
        for path in sorted(set(self.location[k] for k in shapes)):
            with self._open(path) as f:
                for key in f.keys():
                    if key in shapes and list(f.get_slice(key).get_shape()) != shapes[key]:
                        raise ModelStructureError(f"{path}: tensor {key} has shape "
                                                  f"{list(f.get_slice(key).get_shape())}, the model expects "
                                                  f"{shapes[key]}")

    def _stored_shapes(self) -> dict[str, list[int]]:
        shapes = {k: list(t.shape) for k, t in self.outer_state().items()}
        for i, layer in enumerate(self._stored):
            shapes.update({f"{self.prefix}.{i}.{k}": list(t.shape) for k, t in layer.state_dict().items()})
        return shapes

    def outer_state(self) -> dict[str, torch.Tensor]:
        """The model's state outside its decoder layers (embeddings, final norm, lm_head), tied copies left out."""
        tied = self.tied()
        return {key: tensor for key, tensor in self.model.state_dict(keep_vars=True).items()
                if not key.startswith(self.prefix + ".") and key not in tied}

    def tied(self) -> dict[str, str]:
        """Outer keys that are another key's tensor (a tied lm_head), as {tied key: stored key}."""
        first: dict[int, str] = {}
        tied = {}
        for key, tensor in self.model.state_dict(keep_vars=True).items():
            if id(tensor) in first:
                tied[key] = first[id(tensor)]
            else:
                first[id(tensor)] = key
        return tied

    @contextlib.contextmanager
    def _open(self, path: Path):
        try:
            with safe_open(str(path), framework="pt") as f:
                yield f
        except SafetensorError as exc:
            raise ModelStructureError(f"cannot read the safetensors file {path}: {exc}") from None

    def read(self, keys: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The checkpoint's tensors for `keys` (name -> skeleton tensor giving the dtype), each file opened once."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.location[key], []).append(key)
        out = {}
        for path, names in by_file.items():
            with self._open(path) as f:
                for key in names:
                    tensor = f.get_tensor(key)
                    want = keys[key].dtype
                    if tensor.is_floating_point() and want.is_floating_point:
                        tensor = tensor.to(want)
                    out[key] = tensor.to(device)
        return out

    def load_outer(self, device: torch.device | str = "cpu") -> None:
        """Embeddings, final norm and lm_head into the skeleton (what runs around the decoder layers)."""
        self.model.load_state_dict(self.read(self.outer_state(), device), strict=False, assign=True)
        self.model.tie_weights()

    def release_outer(self) -> None:
        for key, tensor in self.outer_state().items():
            owner, _, leaf = key.rpartition(".")
            module = self.model.get_submodule(owner)
            meta = tensor.to("meta")
            if leaf in module._parameters:
                module._parameters[leaf] = nn.Parameter(meta, requires_grad=False)
            else:
                module._buffers[leaf] = meta
        self.model.tie_weights()

    def load_layer(self, index: int, device: torch.device | str = "cpu") -> nn.Module:
        """Decoder layer `index` read from disk, rewritten as the runtime expects, in place of its skeleton."""
        layer = copy.deepcopy(self._stored[index])
        prefix = f"{self.prefix}.{index}."
        state = {prefix + k: t for k, t in layer.state_dict(keep_vars=True).items()}
        tensors = self.read(state, device)
        layer.load_state_dict({k[len(prefix):]: t for k, t in tensors.items()}, assign=True)
        normalize_layer(layer)
        self._skeleton[index] = self.layers[index]
        self.layers[index] = layer
        return layer

    def empty_layer(self, index: int) -> nn.Module:
        """A meta-device copy of layer `index` (as the runtime rewrote it) in its place, to be filled by the caller."""
        layer = copy.deepcopy(self.layers[index])
        self._skeleton[index] = self.layers[index]
        self.layers[index] = layer
        return layer

    def digest(self) -> str:
        """sha256 of the config and of every checkpoint file's bytes (one read of the weights, as the in-memory
        fingerprint costs), so a resume notices a changed checkpoint."""
        digest = hashlib.sha256()
        config = {k: v for k, v in self.model.config.to_dict().items() if k != "_name_or_path"}
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        for path in sorted(set(self.location.values())):
            digest.update(f"{path.name}|{sha256_file(path)}|".encode())
        return digest.hexdigest()

    def release_layer(self, index: int) -> None:
        self.layers[index] = self._skeleton.pop(index)
