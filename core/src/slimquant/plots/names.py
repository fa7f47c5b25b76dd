"""A Linear's decoder layer and its name inside the layer, read from its full name."""

from __future__ import annotations

import re

_LAYER = re.compile(r"^.*?\.(\d+)\.(.+)$")


def layer_and_kind(name: str) -> tuple[int, str]:
    """'model.layers.3.self_attn.q_proj' -> (3, 'self_attn.q_proj'); a name without a layer index -> (-1, name)."""
    match = _LAYER.match(name)
    return (int(match.group(1)), match.group(2)) if match else (-1, name)


def kinds_in_order(names) -> list[str]:
    """Linear kinds in the order they first appear (q, k, v, o, gate, up, down for Llama)."""
    return list(dict.fromkeys(layer_and_kind(n)[1] for n in names))
