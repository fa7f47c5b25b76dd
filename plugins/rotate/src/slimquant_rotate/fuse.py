"""The rewrites, each exact in real arithmetic: fold a norm's weight into the Linears that read it, rotate the
residual stream (R1) and each attention head's values (R2). Products are taken in float64, then stored in the
weight's own dtype."""

from __future__ import annotations

import torch
from torch import nn

from slimquant.sdk import smoothing


def _store(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


def norm_gain(norm: nn.Module) -> torch.Tensor:
    """What the norm multiplies its normalized input by: its weight, or one plus it for an "offset" norm."""
    offset = smoothing.norm_flavor(norm) == "offset"
    return norm.weight.detach().double() + (1.0 if offset else 0.0)


def fold_norm(norm: nn.Module, readers: list[nn.Module]) -> None:
    """y = n(x) * g: g moves into every reader's input columns, the norm then scales by one."""
    offset = smoothing.norm_flavor(norm) == "offset"
    gain = norm_gain(norm)
    for reader in readers:
        _store(reader.weight, reader.weight.double() * gain.to(reader.weight.device))
    norm.weight.data.fill_(0.0 if offset else 1.0)


def rotate_inputs(module: nn.Module, q: torch.Tensor) -> None:
    """A module reading the rotated stream h' = h Q: W' = W Q (embeddings: E' = E Q, rows are tokens)."""
    _store(module.weight, module.weight.double() @ q.to(module.weight.device))


def rotate_outputs(linear: nn.Linear, q: torch.Tensor) -> None:
    """A Linear writing into the rotated stream: y' = y Q, so W' = Q^T W and b' = b Q."""
    q = q.to(linear.weight.device)
    _store(linear.weight, q.T @ linear.weight.double())
    if linear.bias is not None:
        _store(linear.bias, linear.bias.double() @ q)


def rotate_heads(v_proj: nn.Linear, o_proj: nn.Linear, r: torch.Tensor, head_dim: int) -> None:
    """Each head's values v_h' = v_h R (the v_proj rows of a head: R^T W_h), and o_proj's columns of each attention
    head W_h R: attention mixes value rows, so every head's output turns by R and o_proj turns it back."""
    r = r.to(v_proj.weight.device)
    w = v_proj.weight.double().view(-1, head_dim, v_proj.in_features)
    _store(v_proj.weight, torch.einsum("ji,hjk->hik", r, w).reshape(v_proj.weight.shape))
    if v_proj.bias is not None:
        _store(v_proj.bias, (v_proj.bias.double().view(-1, head_dim) @ r).reshape(-1))
    w = o_proj.weight.double().view(o_proj.out_features, -1, head_dim)
    _store(o_proj.weight, (w @ r).reshape(o_proj.weight.shape))


def untie(model: nn.Module) -> int:
    """Give the output embedding its own weight when it shares the input embedding's; the bytes added."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is not embedding.weight:
        return 0
    head.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if getattr(model.config, "get_text_config", None) is not None:
        model.config.get_text_config().tie_word_embeddings = False
    return head.weight.numel() * head.weight.element_size()
