"""MoE experts stored as 3-D tensors (transformers >= 5) rewritten as one gate/up/down Linear triple per expert.

The rewrite is exact: the same routing, the same matmuls, now on nn.Linear modules that the runtime can
observe and quantize one by one.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class ExpertMLP(nn.Module):
    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act_fn):
        super().__init__()
        intermediate = gate_up.shape[0] // 2
        hidden = gate_up.shape[1]
        kw = {"bias": False, "device": gate_up.device, "dtype": gate_up.dtype}
        self.gate_proj = nn.Linear(hidden, intermediate, **kw)
        self.up_proj = nn.Linear(hidden, intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)
        self.gate_proj.weight.data.copy_(gate_up[:intermediate])
        self.up_proj.weight.data.copy_(gate_up[intermediate:])
        self.down_proj.weight.data.copy_(down)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LinearExperts(nn.ModuleList):
    """Same call signature as transformers' fused experts: (hidden_states, top_k_index, top_k_weights).

    A ModuleList, so expert e's Linears are named `...experts.<e>.gate_proj` as in per-expert checkpoints.
    """

    def __init__(self, fused: nn.Module):
        super().__init__(ExpertMLP(fused.gate_up_proj.data[e], fused.down_proj.data[e], fused.act_fn)
                         for e in range(fused.gate_up_proj.shape[0]))
        self.num_experts = len(self)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        flat_experts = top_k_index.reshape(-1)
        flat_tokens = torch.arange(hidden_states.shape[0], device=hidden_states.device)
        flat_tokens = flat_tokens.repeat_interleave(top_k_index.shape[1])
        flat_weights = top_k_weights.reshape(-1)
        for e in torch.unique(flat_experts).tolist():
            if e >= self.num_experts:
                continue
            sel = flat_experts == e
            tokens = flat_tokens[sel]
            y = self[e](hidden_states[tokens]) * flat_weights[sel, None].to(hidden_states.dtype)
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return (isinstance(gate_up, nn.Parameter) and gate_up.dim() == 3 and isinstance(down, nn.Parameter)
            and down.dim() == 3 and hasattr(module, "act_fn"))


def unfuse_experts(model: nn.Module) -> int:
    count = 0
    for name, module in list(model.named_modules()):
        if not _is_fused_experts(module):
            continue
        layout = (getattr(module, "is_transposed", False), getattr(module, "has_bias", False),
                  getattr(module, "is_concatenated", True), getattr(module, "has_gate", True))
        if layout != (False, False, True, True):
            log.warning("%s: expert layout %s is not supported; these experts stay in float", name, layout)
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LinearExperts(module))
        count += 1
    return count
