"""The msModelSlim safetensors layout (format `safe_tensor`) written while a model is quantized, part by part.

    with atomic_output_dir(path) as tmp:
        out = StreamingSave(tmp, part_file_size=0, model_type="llama", architectures=["LlamaForCausalLM"])
        out.add_tensor("model.embed_tokens.weight", embeddings)      # what comes before the decoder layers
        out.add_module(layer, "model.layers.0")                      # each decoder layer once it is quantized
        out.add_tensor("model.norm.weight", norm); out.add_tied("lm_head.weight", "model.embed_tokens.weight")
        files = out.finish()

Given the parts in the order of the model's state_dict, the files are those `save_quantized(model, path)` writes
for the whole quantized model, byte for byte: the same shards, the same description.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from slimquant.export import names
from slimquant.export.layout import Layout, add_module, finish_quant_type
from slimquant.export.stream import SafetensorsStream
from slimquant.export.writers import process_umask, write_description

STEM = "weights"


class StreamingSave:
    def __init__(self, directory: Path, part_file_size: float = 0, pack: bool = True, model_type: str | None = None,
                 architectures: list[str] | None = None):
        self.directory = Path(directory)
        self.pack = pack
        self.stream = SafetensorsStream(self.directory, STEM, int(part_file_size * names.GIB),
                                        metadata={"format": "pt"})
        self.layout = Layout(tensors=self.stream, model_type=model_type, architectures=architectures)

    def add_tensor(self, key: str, tensor: torch.Tensor) -> None:
        self.layout.add(key, tensor, "FLOAT")
        self.layout.float_tensors.append(key)

    def add_tied(self, key: str, stored_as: str) -> None:
        self.layout.tied[key] = stored_as
        self.layout.float_tensors.append(key)

    def add_module(self, module: nn.Module, prefix: str) -> None:
        add_module(self.layout, module, prefix, pack=self.pack)

    def finish(self) -> list[Path]:
        finish_quant_type(self.layout)
        qtype = self.layout.model_quant_type
        parts = self.stream.close()
        if len(parts) == 1 and not self.stream.limit:
            files = [parts[0].rename(self.directory / names.single_name(qtype))]
        else:
            files = [part.rename(self.directory / names.shard_name(qtype, i, len(parts)))
                     for i, part in enumerate(parts, start=1)]
            weight_map = {key: files[shard - 1].name for key, shard in self.stream.weight_map.items()}
            index = {"metadata": {"total_size": self.stream.total_size}, "weight_map": weight_map}
            index_path = self.directory / names.index_name(qtype)
            index_path.write_text(json.dumps(index, indent=2))
            files.append(index_path)
        for path in files:
            path.chmod(0o666 & ~process_umask())  # as the whole-model writer leaves them
        return [*files, write_description(self.layout, self.directory, files)]

    def abort(self) -> None:
        self.stream.abort()

