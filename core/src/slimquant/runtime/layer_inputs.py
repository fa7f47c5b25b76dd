"""Decoder-layer inputs kept for replay: only what a stateless forward of the same sample needs.

A layer's call carries state that belongs to that one call: a KV cache (its kwarg has been `layer_past`,
`past_key_value`, `past_key_values` and, since transformers 5.24, `cache`), a cache position, a mask built for
the cache's length. Replaying such a call would append to the cache again and attend over keys of another
length. `stateless_input` drops every cache object whatever its name, turns caching off, and refuses a call
that attended over earlier tokens (a generation step), whose mask cannot be replayed on its own.
"""

from __future__ import annotations

import torch

CACHE_KWARGS = ("cache", "past_key_value", "past_key_values", "layer_past")


class NotReplayable(Exception):
    """The layer call attended over cached tokens: its inputs cannot be replayed statelessly."""


def _is_cache(value) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(value, Cache)


def _hidden_length(args: tuple, kwargs: dict) -> int | None:
    hidden = args[0] if args else kwargs.get("hidden_states")
    return hidden.shape[-2] if torch.is_tensor(hidden) and hidden.dim() >= 2 else None


def stateless_input(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A detached copy of one decoder-layer call's (args, kwargs) that can be replayed any number of times."""
    length = _hidden_length(args, kwargs)
    mask = kwargs.get("attention_mask")
    if torch.is_tensor(mask) and mask.dim() == 4 and length is not None and mask.shape[-1] != length:
        raise NotReplayable(f"the attention mask covers {mask.shape[-1]} key positions for {length} new tokens")
    position = kwargs.get("cache_position")
    if torch.is_tensor(position) and position.numel() and int(position.reshape(-1)[0]) != 0:
        raise NotReplayable(f"the call continues a cached sequence at position {int(position.reshape(-1)[0])}")
    clean = {}
    for key, value in kwargs.items():
        if key in CACHE_KWARGS or _is_cache(value):
            continue
        clean[key] = value.detach() if torch.is_tensor(value) else value
    if "use_cache" in clean:
        clean["use_cache"] = False
    args = tuple(None if _is_cache(a) else a.detach() if torch.is_tensor(a) else a for a in args)  # GPT-2: positional
    return args, clean


def batch_size(inp: tuple[tuple, dict]) -> int:
    """The samples in one layer (or sub-block) call: the first dimension of its [batch, tokens, hidden] states."""
    args, kwargs = inp
    hidden = args[0] if args else kwargs.get("hidden_states")
    return hidden.shape[0] if torch.is_tensor(hidden) and hidden.dim() == 3 else 1


def leading_samples(inp: tuple[tuple, dict], count: int) -> tuple[tuple, dict]:
    """One batched layer (or sub-block) call cut down to its first `count` samples: every tensor whose first
    dimension is the batch of the hidden states (masks, position tables built per sample) keeps its first `count`
    rows; the rest is shared."""
    batch = batch_size(inp)
    if batch <= count:
        return inp
    return _map_tensors(inp, lambda t: t[:count] if t.dim() >= 2 and t.shape[0] == batch else t)


def first_sample(inp: tuple[tuple, dict]) -> tuple[tuple, dict]:
    return leading_samples(inp, 1)


def leading_tokens(inp: tuple[tuple, dict], count: int) -> tuple[tuple, dict]:
    """One layer call cut down to its first `count` tokens: every dimension of every tensor that has the hidden
    states' length (the tokens; a mask has two) keeps its first `count` entries. A causal layer gives the first
    `count` rows of its full output on it. Another dimension of that length by chance would be cut too: a caller
    checks the result against the full call before relying on it."""
    length = _hidden_length(*inp)
    if length is None or length <= count:
        return inp

    def cut(t: torch.Tensor) -> torch.Tensor:
        for dim, size in enumerate(t.shape):
            if size == length:
                t = t.narrow(dim, 0, count)
        return t

    return _map_tensors(inp, cut)


def _map_tensors(inp: tuple[tuple, dict], fn) -> tuple[tuple, dict]:
    """The call with `fn` applied to every tensor in its args and kwargs, inside tuples and lists too."""
    def walk(value):
        if torch.is_tensor(value):
            return fn(value)
        if isinstance(value, tuple | list):
            return type(value)(walk(v) for v in value)
        return value

    args, kwargs = inp
    return tuple(walk(a) for a in args), {k: walk(v) for k, v in kwargs.items()}
