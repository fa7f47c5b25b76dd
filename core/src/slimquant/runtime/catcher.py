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


def batch_samples(samples: list[torch.Tensor], batch_tokens: int) -> list[torch.Tensor]:
    """Consecutive samples of one length stacked into batches of at most `batch_tokens` tokens (at least one sample
    each): one forward per batch instead of per sample, with no padding and so the same result per sample."""
    batches: list[list[torch.Tensor]] = []
    for ids in samples:
        row = ids.reshape(1, -1)
        last = batches[-1] if batches else None
        if last and last[0].shape[1] == row.shape[1] and (len(last) + 1) * row.shape[1] <= batch_tokens:
            last.append(row)
        else:
            batches.append([row])
    return [torch.cat(b) for b in batches]


@torch.no_grad()
def catch_layer_inputs(model: nn.Module, layers: nn.ModuleList, samples: list[torch.Tensor],
                       device: torch.device, progress: bool = True, batch_tokens: int = 1) -> list[LayerInput]:
    """The first decoder layer's (args, kwargs) per calibration batch (see `batch_samples`)."""
    batches = batch_samples(samples, batch_tokens)
    store: list[LayerInput] = []
    first = layers[0]
    layers[0] = _Catcher(first, store)
    try:
        for ids in tqdm(batches, desc="calibration inputs", disable=not progress, leave=False):
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Caught:
                pass
    finally:
        layers[0] = first
    if len(store) != len(batches):
        raise RuntimeError(f"caught {len(store)} layer inputs for {len(batches)} calibration batches")
    return store
