"""Which norm or Linear feeds which Linears inside a decoder layer: the one table smoothers read.

Norm -> Linears is found by tracing: one forward of the layer records each norm's output tensor and each
Linear's input; a Linear fed by a norm receives that very tensor, maybe reshaped (or, for MoE experts, rows
of it). Linear -> Linear pairs cannot be traced through attention or the gated activation, so they come from
a small table of names, resolved inside one parent module, and only where the rewrite is exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

# (producer, consumer, kind): the consumer's input is linear in the producer's output channels.
LINEAR_PAIRS = (
    ("v_proj", "o_proj", "attention"),
    ("v_proj", "dense", "attention"),
    ("v_proj", "out_proj", "attention"),
    ("up_proj", "down_proj", "gated"),
    ("w3", "w2", "gated"),
)
GATE_NAMES = ("gate_proj", "w1")


@dataclass
class Subgraph:
    source: str  # full module name of the norm or Linear whose output feeds `targets`
    kind: str  # "norm", "attention" (v -> o) or "gated" (up -> down)
    targets: list[str] = field(default_factory=list)
    # modules left in float that read the same norm output (MoE routers): a rewrite must update them too
    extra: list[str] = field(default_factory=list)


def is_norm(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "norm" in name and hasattr(module, "weight") and isinstance(module.weight, torch.Tensor)


def _reads_channels(module: nn.Module) -> bool:
    """A leaf module other than a norm that multiplies its input by a 2-D weight (a router, a float Linear)."""
    w = getattr(module, "weight", None)
    return (isinstance(w, torch.Tensor) and w.dim() == 2 and not is_norm(module)
            and not isinstance(module, nn.Embedding) and next(module.children(), None) is None)


def _rows_of(x: torch.Tensor, y: torch.Tensor) -> bool:
    """True if every row of x (checked on a few) is a row of y: experts see a gathered subset of tokens."""
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    if x2.shape[-1] != y2.shape[-1] or x2.shape[0] == 0:
        return False
    probe = x2[torch.linspace(0, x2.shape[0] - 1, min(4, x2.shape[0])).long()]
    return bool((probe[:, None, :] == y2[None, :, :]).all(-1).any(-1).all())


def _same_tensor(x: torch.Tensor, y: torch.Tensor) -> bool:
    """x is y, or a view of y with the same elements, such as y flattened to [tokens, hidden] by an MoE block."""
    if x is y:
        return True
    if x.data_ptr() != y.data_ptr() or x.numel() != y.numel() or x.shape[-1] != y.shape[-1]:
        return False
    return x.stride() == y.stride() or (x.is_contiguous() and y.is_contiguous())


def _sibling_key(name: str) -> str:
    return re.sub(r"\.experts\.\d+\.", ".experts.*.", name)


@dataclass
class LayerTrace:
    norm_subgraphs: list[Subgraph]
    groups: list[list[str]]  # call order; one input tensor or sibling experts per group (q/k/v, gate/up)


@torch.no_grad()
def trace_layer(layer: nn.Module, prefix: str, linears: dict[str, nn.Linear], run) -> LayerTrace:
    """`run()` calls the layer once on real inputs."""
    norm_out: dict[str, torch.Tensor] = {}
    lin_in: dict[str, torch.Tensor] = {}
    other_in: dict[str, torch.Tensor] = {}

    # Forward hooks must return None: a returned value would replace the module's output.
    def record_norm(full):
        def hook(module, inputs, output):
            norm_out.setdefault(full, output[0] if isinstance(output, tuple) else output)
        return hook

    def record_linear(full, into):
        def hook(module, inputs, output):
            if inputs and isinstance(inputs[0], torch.Tensor):
                into.setdefault(full, inputs[0])
        return hook

    handles = []
    for name, module in layer.named_modules():
        full = f"{prefix}.{name}"
        if is_norm(module):
            handles.append(module.register_forward_hook(record_norm(full)))
        elif full in linears:
            handles.append(module.register_forward_hook(record_linear(full, lin_in)))
        elif _reads_channels(module):
            handles.append(module.register_forward_hook(record_linear(full, other_in)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return LayerTrace(_norm_subgraphs(linears, norm_out, lin_in, other_in), _call_groups(linears, lin_in))


def _call_groups(linears: dict[str, nn.Linear], lin_in: dict[str, torch.Tensor]) -> list[list[str]]:
    """Linears in call order, those sharing one input tensor together. The same Linear of every MoE expert
    joins one group (the experts run side by side), and so do experts no token reached in the trace."""
    groups: list[list[str]] = []
    group_of: dict[str, list[str]] = {}  # sibling key -> the group holding that Linear
    last_key, last_group = None, None
    for name, x in lin_in.items():  # dicts keep insertion order = call order
        key = (x.data_ptr(), tuple(x.shape))
        group = group_of.get(_sibling_key(name)) or (last_group if key == last_key else None)
        if group is None:
            group = []
            groups.append(group)
        group.append(name)
        group_of.setdefault(_sibling_key(name), group)
        last_key, last_group = key, group
    never_called: list[str] = []
    for name in linears:
        if name not in lin_in:
            group_of.get(_sibling_key(name), never_called).append(name)
    if never_called:
        groups.append(never_called)
    return groups


def _source_norm(name: str, x: torch.Tensor, norm_out: dict[str, torch.Tensor]) -> str | None:
    for norm, y in norm_out.items():
        if _same_tensor(x, y) or (".experts." in name and _rows_of(x, y)):
            return norm
    return None


def _norm_subgraphs(linears, norm_out, lin_in, other_in) -> list[Subgraph]:
    graphs: dict[str, Subgraph] = {}
    matched: dict[str, str] = {}
    for lin, x in lin_in.items():
        norm = _source_norm(lin, x, norm_out)
        if norm is not None:
            matched[lin] = norm
    by_key = {_sibling_key(lin): norm for lin, norm in matched.items()}
    for lin in linears:
        norm = matched.get(lin) or by_key.get(_sibling_key(lin))
        if norm is not None:
            graphs.setdefault(norm, Subgraph(norm, "norm")).targets.append(lin)
    for name, x in other_in.items():
        norm = _source_norm(name, x, norm_out)
        if norm in graphs:
            graphs[norm].extra.append(name)
    return list(graphs.values())


def linear_pairs(linears: dict[str, nn.Linear]) -> list[Subgraph]:
    out = []
    for name in linears:
        parent, _, leaf = name.rpartition(".")
        for producer, consumer, kind in LINEAR_PAIRS:
            if leaf != producer or f"{parent}.{consumer}" not in linears:
                continue
            if kind == "gated" and not any(f"{parent}.{g}" in linears for g in GATE_NAMES):
                continue
            out.append(Subgraph(name, kind, [f"{parent}.{consumer}"]))
    return out
