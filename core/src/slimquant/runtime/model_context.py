"""What a model transform's ``transform_model(ctx)`` is given, and the runtime's step that calls the transforms."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slimquant.errors import PluginError


@dataclass
class ModelContext:
    """``model``: the whole float model, on the CPU or the work device; ``prefix`` / ``layers``: its decoder layers'
    path and ModuleList; ``plans``: each Linear's ``LinearPlan`` by full name (None: left in float); ``device``: the
    work device; ``notes``: what the transforms did, in their words, for the report (``note``)."""

    model: nn.Module
    prefix: str
    layers: nn.ModuleList
    plans: dict
    device: torch.device
    notes: list[str] = field(default_factory=list)
    current: str = ""

    def note(self, text: str) -> None:
        """Record one line about what the current transform did (e.g. "untied lm_head from the embeddings: +110 MB")."""
        self.notes.append(f"{self.current}: {text}")


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def run_transforms(ctx: ModelContext, plugins, transforms: list[str]) -> list[str]:
    """Call each transform in recipe order; refuse one that added, removed or renamed a Linear."""
    before = linear_names(ctx.model)
    for name in transforms:
        ctx.current = name
        plugins.call(name, "transform_model", ctx=ctx)
        after = linear_names(ctx.model)
        if after != before:
            changed = sorted(set(before) ^ set(after))[:3]
            raise PluginError(f"plugin {name!r} changed the model's Linears in transform_model ({', '.join(changed)}"
                              f"{', ...' if len(set(before) ^ set(after)) > 3 else ''}); a transform rewrites "
                              "weights, it does not add, remove or rename Linears")
    return ctx.notes
