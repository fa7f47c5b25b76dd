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
    work device; ``samples``: this process's calibration token batches (``[1, seq]`` int64, on the CPU), None on the
    data-free path and in ``check_model``, for a transform that measures what it changes (it must not keep them);
    ``calibrated_weight_algorithms``: the weight algorithms of the plans that need calibration data (error feedback
    such as GPTQ), for a transform that measures its rewrite with a proxy of the quantizer that follows;
    ``notes``: what the transforms did, in their words, for the report (``note``)."""

    model: nn.Module
    prefix: str
    layers: nn.ModuleList
    plans: dict
    device: torch.device
    samples: list[torch.Tensor] | None = None
    calibrated_weight_algorithms: frozenset[str] = frozenset()
    notes: list[str] = field(default_factory=list)
    current: str = ""

    def set_input_transform(self, name: str, matrix: torch.Tensor) -> None:
        """From now on Linear `name`'s input is multiplied by `matrix` ([in, in]) before it reaches the weight, in the
        float model and, once quantized, in its FakeQuantLinear (observers and activation quantizers see the product).
        The transform must fold the inverse into the weight itself (for an orthogonal matrix M: W <- W M) so that the
        model's function is kept. Output formats that do not hold Feature.ONLINE_TRANSFORM refuse such a model."""
        linear = self.model.get_submodule(name)
        if not isinstance(linear, nn.Linear) or tuple(matrix.shape) != (linear.in_features, linear.in_features):
            raise PluginError(f"plugin {self.current!r}: set_input_transform({name!r}) needs an nn.Linear and a "
                              f"[{getattr(linear, 'in_features', '?')}, same] matrix, got {tuple(matrix.shape)}")
        if getattr(linear, "input_transform", None) is not None:
            linear.input_transform = linear.input_transform @ matrix.to(linear.input_transform)
            return
        linear.register_buffer("input_transform", matrix.to(linear.weight.dtype).to(linear.weight.device))
        linear.register_forward_pre_hook(_transform_input)

    def note(self, text: str) -> None:
        """Record one line about what the current transform did (e.g. "untied lm_head from the embeddings: +110 MB")."""
        self.notes.append(f"{self.current}: {text}")


def _transform_input(module: nn.Module, args: tuple):
    return (args[0] @ module.input_transform.to(args[0].dtype), *args[1:])


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
