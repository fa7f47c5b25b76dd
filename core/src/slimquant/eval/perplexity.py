"""Perplexity over non-overlapping windows of a token stream."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, window: int = 2048, max_windows: int | None = None,
               progress: bool = True) -> float:
    """exp(mean next-token NLL) over windows of `window` tokens, each scored on its own (no overlap)."""
    ids = token_ids.reshape(-1)
    count = ids.numel() // window
    if max_windows:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {window}")
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    for i in tqdm(range(count), desc="perplexity", disable=not progress, leave=False):
        chunk = ids[i * window:(i + 1) * window][None].to(device)
        logits = model(input_ids=chunk, use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
        tokens += window - 1
    return math.exp(nll / tokens)
