"""Where the runtime's decoder layers come from and go to once quantized.

The pipeline talks to one `RuntimeSource` whatever the model: `InMemoryLayers` when the model is whole in memory,
`StreamedLayers` around a caller's `LayerSource` (`slimquant.lazy`) when it is never whole in memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from slimquant.model.checks import check_finite

if TYPE_CHECKING:
    from slimquant.runtime.checkpoint import Checkpoint


class LayerSource(Protocol):
    """Where decoder layers come from and go to when the model is never whole in memory (`slimquant.lazy`):
    the runtime's model then holds meta-device skeletons, and each part is read when its turn comes."""

    def load_outer(self, device: torch.device) -> None:
        """Read what runs before the first decoder layer (embeddings), for catching its inputs."""

    def release_outer(self) -> None: ...

    def load_layer(self, index: int, device: torch.device) -> nn.Module:
        """Read decoder layer `index` onto `device`, in place of its skeleton in the model's layer list."""

    def finish_layer(self, index: int, layer: nn.Module) -> None:
        """The layer is quantized and has fed the next one: save it, and put its skeleton back."""

    def empty_layer(self, index: int) -> nn.Module:
        """A meta-device copy of layer `index`'s skeleton in its place, for a resume checkpoint to fill."""

    def model_digest(self) -> str | None:
        """A sha256 of the model this source reads (the resume fingerprint's model part); None when the
        fingerprint reads the model in memory itself."""


class RuntimeSource(LayerSource, Protocol):
    """A LayerSource as the pipeline uses it: it also puts back a layer an earlier run finished."""

    def restore_layer(self, index: int, checkpoint: Checkpoint) -> None:
        """Layer `index` as `checkpoint` recorded it, where a finished layer goes."""


class InMemoryLayers:
    """The decoder layers of a model whole in memory: each moves to the work device for its turn, and back to the
    CPU when finished if `offload_layers`; everything else goes to the work device only to catch layer-0 inputs."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, device: torch.device, offload_layers: bool):
        self.model = model
        self.layers = layers
        self.device = device
        self.offload_layers = offload_layers

    def load_outer(self, device: torch.device) -> None:
        if device.type != "cpu":
            for module in self.model.children():
                module.to(device)
            self.layers.to("cpu")
        try:
            self.layers[0].to(device)
        except BaseException:
            self.release_outer()
            raise

    def release_outer(self) -> None:
        if self.device.type != "cpu":
            self.model.to("cpu")

    def load_layer(self, index: int, device: torch.device) -> nn.Module:
        return self.layers[index].to(device)

    def finish_layer(self, index: int, layer: nn.Module) -> None:
        if self.offload_layers and self.device.type != "cpu":
            layer.to("cpu")

    def empty_layer(self, index: int) -> nn.Module:
        """The layer itself: a checkpoint fills it in place (`restore_layer`)."""
        return self.layers[index]

    def model_digest(self) -> None:
        return None

    def restore_layer(self, index: int, checkpoint: Checkpoint) -> None:
        checkpoint.restore_layer(index, self.layers[index])
        if not self.offload_layers:
            self.layers[index].to(self.device)


class StreamedLayers:
    """A caller's LayerSource: each layer read is checked for non-finite values (with `check_finite`, as the
    tensors of a model in memory are when the run starts), and a resumed layer is filled into an empty skeleton and
    passed on as if just quantized."""

    def __init__(self, source: LayerSource, prefix: str, check_finite: bool):
        self.source = source
        self.prefix = prefix
        self.check_finite = check_finite

    def load_outer(self, device: torch.device) -> None:
        self.source.load_outer(device)

    def release_outer(self) -> None:
        self.source.release_outer()

    def load_layer(self, index: int, device: torch.device) -> nn.Module:
        layer = self.source.load_layer(index, device)
        if self.check_finite:
            for name, tensor in layer.state_dict(prefix=f"{self.prefix}.{index}.").items():
                if tensor.is_floating_point():
                    check_finite(tensor, name)
        return layer

    def finish_layer(self, index: int, layer: nn.Module) -> None:
        self.source.finish_layer(index, layer)

    def empty_layer(self, index: int) -> nn.Module:
        return self.source.empty_layer(index)

    def model_digest(self) -> str | None:
        return self.source.model_digest()

    def restore_layer(self, index: int, checkpoint: Checkpoint) -> None:
        layer = self.source.empty_layer(index)
        checkpoint.restore_layer(index, layer, assign=True)
        self.source.finish_layer(index, layer)


def layer_source(model: nn.Module, layers: nn.ModuleList, prefix: str, device: torch.device, offload_layers: bool,
                 check_finite: bool, source: LayerSource | None = None) -> RuntimeSource:
    """The runtime's source: `source` (lazy loading) checked as it is read, else the model's own layers."""
    if source is None:
        return InMemoryLayers(model, layers, device, offload_layers)
    return StreamedLayers(source, prefix, check_finite)
