"""Where the residual stream is read and written in a pre-norm decoder, found by running the model once.

Each decoder layer is run with hooks that record the order in which its modules are called. A norm over the hidden
size starts a sublayer; every module with a 2-D weight over the hidden size called after it, up to the next such
norm, reads that norm's output (q/k/v, gate/up, a router, experts); the Linears that write back into the residual
stream are those named in WRITERS. The model-level test that the rotated model computes what the original did
catches anything this misreads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

WRITERS = ("o_proj", "down_proj", "w2")
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "gemma")
WHY_NOT = {
    "gemma2": "normalizes each sublayer's output before the residual add (post_feedforward_layernorm)",
    "gemma3": "normalizes each sublayer's output before the residual add (post_feedforward_layernorm)",
    "gemma3_text": "normalizes each sublayer's output before the residual add (post_feedforward_layernorm)",
    "opt": "uses LayerNorm with a bias, which a rotation does not commute with",
    "gpt2": "uses LayerNorm with a bias and adds absolute position embeddings to the residual stream",
    "phi": "uses LayerNorm with a bias and runs attention and MLP in parallel on one norm",
}


@dataclass
class Sublayer:
    norm: str  # the norm whose output the readers take
    readers: list[str] = field(default_factory=list)  # modules with a weight [*, hidden] reading it


@dataclass
class Residual:
    """The modules a rotation of the residual stream touches, by full name."""

    embedding: str
    final_norm: str
    head: str
    sublayers: list[Sublayer]
    writers: list[str]  # Linears whose output is added to the residual stream


def model_problems(model: nn.Module, prefix: str, layers: nn.ModuleList) -> list[str]:
    """What keeps this model from an exact rotation, from its structure alone (works on a weightless model)."""
    model_type = getattr(model.config, "model_type", "?")
    if model_type in WHY_NOT:
        return [f"{model_type}: {WHY_NOT[model_type]}; supported: {', '.join(SUPPORTED)}"]
    if model_type not in SUPPORTED:
        return [f"{model_type}: its residual stream has not been verified for rotation here; supported: "
                f"{', '.join(SUPPORTED)}"]
    problems = []
    hidden = model.config.hidden_size
    for name, module in [(f"{prefix}.0.{n}", m) for n, m in layers[0].named_modules()] + _final_norm(model, prefix):
        if _is_hidden_norm(module, hidden) and getattr(module, "bias", None) is not None:
            problems.append(f"{name}: a norm with a bias cannot be folded into a rotation")
    if model.get_output_embeddings() is None:
        problems.append("the model has no output embedding (lm_head) to rotate")
    return problems


def _final_norm(model: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    parent = prefix.rpartition(".")[0]
    name = f"{parent}.norm" if parent else "norm"
    try:
        return [(name, model.get_submodule(name))]
    except AttributeError:
        return []


def _is_hidden_norm(module: nn.Module, hidden: int) -> bool:
    weight = getattr(module, "weight", None)
    return ("norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and weight.shape[0] == hidden)


def _reads_hidden(module: nn.Module, hidden: int) -> bool:
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == hidden
            and not isinstance(module, nn.Embedding) and next(module.children(), None) is None)


@torch.no_grad()
def find_residual(model: nn.Module, prefix: str, layers: nn.ModuleList, ids: torch.Tensor) -> Residual:
    """Run `model` on `ids` once, recording each decoder layer's call order, and name the residual's touch points."""
    hidden = model.config.hidden_size
    order: list[str] = []
    handles = []
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if name and (_is_hidden_norm(module, hidden) or _reads_hidden(module, hidden)
                         or name.rpartition(".")[2] in WRITERS):
                full = f"{prefix}.{i}.{name}"
                handles.append(module.register_forward_pre_hook(lambda m, a, full=full: order.append(full)))
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    sublayers, writers, seen = [], [], set()
    called = set(order)
    modules = dict(model.named_modules())
    for i, layer in enumerate(layers):  # modules no token reached (an unrouted expert) join their siblings' sublayer
        for name, _ in layer.named_modules():
            full = f"{prefix}.{i}.{name}"
            if name and full not in order and (_reads_hidden(modules[full], hidden)
                                               or name.rpartition(".")[2] in WRITERS):
                order.append(full)
    current: dict[str, Sublayer] = {}  # decoder layer -> the sublayer whose norm ran last
    for full in order:
        if full in seen:
            continue
        seen.add(full)
        module, leaf = modules[full], full.rpartition(".")[2]
        layer = full[len(prefix) + 1:].split(".")[0]
        if _is_hidden_norm(module, hidden):
            current[layer] = Sublayer(full)
            sublayers.append(current[layer])
        elif leaf in WRITERS:
            writers.append(full)
        elif _reads_hidden(module, hidden):
            owner = current.get(layer) if full in called else _sibling_sublayer(full, sublayers)
            if owner is None:
                raise ValueError(f"{full} reads the residual stream, but no norm of its decoder layer ran before it")
            owner.readers.append(full)
    names = {m: n for n, m in model.named_modules()}
    final = _final_norm(model, prefix)
    return Residual(names[model.get_input_embeddings()], final[0][0], names[model.get_output_embeddings()],
                    sublayers, writers)


def _sibling_sublayer(name: str, sublayers: list[Sublayer]) -> Sublayer | None:
    """For a module no token reached (an unrouted expert): the sublayer of the same Linear of another expert."""
    key = re.sub(r"experts\.\d+", "experts.*", name)
    for sub in sublayers:
        if any(re.sub(r"experts\.\d+", "experts.*", r) == key for r in sub.readers):
            return sub
    return None
