"""Capture the exact (args, kwargs) each calibration sample brings to the first decoder layer."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from slimquant.runtime.context import LayerInput
from slimquant.runtime.layer_inputs import stateless_input


class _Caught(Exception):
    pass


class _Catcher(nn.Module):
    def __init__(self, wrapped: nn.Module, store: list[LayerInput]):
        super().__init__()
        self.wrapped = wrapped
        self.store = store

    def __getattr__(self, name):  # models read attributes such as `attention_type` off their layers
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.wrapped, name)

    def forward(self, *args, **kwargs):
        self.store.append(stateless_input(args, kwargs))
        raise _Caught


@torch.no_grad()
def catch_layer_inputs(model: nn.Module, layers: nn.ModuleList, samples: list[torch.Tensor],
                       device: torch.device, progress: bool = True) -> list[LayerInput]:
    store: list[LayerInput] = []
    first = layers[0]
    layers[0] = _Catcher(first, store)
    try:
        for ids in tqdm(samples, desc="calibration inputs", disable=not progress, leave=False):
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Caught:
                pass
    finally:
        layers[0] = first
    if len(store) != len(samples):
        raise RuntimeError(f"caught {len(store)} layer inputs for {len(samples)} samples")
    return store
