"""Generic knowledge of Hugging Face causal LMs: decoder layers, their Linears, embeddings and head."""

from __future__ import annotations

import logging

from torch import nn

from slimquant.errors import ModelStructureError
from slimquant.model.experts import unfuse_experts

log = logging.getLogger(__name__)


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a Linear whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def conv1d_to_linear(module: nn.Module) -> nn.Linear:
    in_features, out_features = module.weight.shape
    linear = nn.Linear(in_features, out_features, bias=module.bias is not None,
                       device=module.weight.device, dtype=module.weight.dtype)
    linear.weight.data = module.weight.data.t().contiguous()
    if module.bias is not None:
        linear.bias.data = module.bias.data
    return linear


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def normalize_linears(model: nn.Module) -> None:
    """Rewrite GPT-2 Conv1D as nn.Linear and fused MoE expert tensors as per-expert Linears (equivalent)."""
    _, layers = find_decoder_layers(model)
    for layer in layers:
        normalize_layer(layer)


def normalize_layer(layer: nn.Module) -> None:
    """`normalize_linears` for one decoder layer."""
    for name, module in list(layer.named_modules()):
        if name and _is_conv1d(module):
            set_submodule(layer, name, conv1d_to_linear(module))
    unfuse_experts(layer)


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated blocks holding most of the parameters (model.layers, transformer.h, ...)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) or _is_conv1d(m) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ModelStructureError(
            f"{type(model).__name__}: found no list of decoder layers (a ModuleList of blocks with Linears)")
    return best[1], best[2]


def layer_linears(layer: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    """Every quantizable Linear in one decoder layer, by full name (MoE routers are left out: they are tiny
    and decide which expert runs, so their errors cost far more than they save)."""
    out = {}
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear) and not _is_router(name, module):
            out[f"{prefix}.{name}"] = module
    return out


def _is_router(name: str, module: nn.Linear) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("gate", "router", "shared_expert_gate") and ".experts." not in name


def all_quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    prefix, layers = find_decoder_layers(model)
    out: dict[str, nn.Linear] = {}
    for i, layer in enumerate(layers):
        out.update(layer_linears(layer, f"{prefix}.{i}"))
    return out


def float_module_names(model: nn.Module) -> list[str]:
    """Modules outside the decoder layers: embeddings, final norm, lm_head. They stay in float."""
    prefix, _ = find_decoder_layers(model)
    return [n for n, _ in model.named_modules()
            if n and not (n == prefix or n.startswith(prefix + ".") or prefix.startswith(n + "."))]


def tied_parameter_names(model: nn.Module) -> dict[str, str]:
    """Names that share storage with an earlier parameter (e.g. lm_head.weight -> model.embed_tokens.weight)."""
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = p.data_ptr()
        if key in seen and seen[key] != name:
            tied[name] = seen[key]
        else:
            seen.setdefault(key, name)
    return tied
