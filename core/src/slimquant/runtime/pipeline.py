"""The layer-by-layer runtime: catch layer-0 inputs, then per decoder layer observe -> smooth -> observe ->
quantize weights -> quantize activations -> swap in fake-quant Linears -> feed the next layer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from slimquant.config.recipe import Recipe
from slimquant.errors import NonFiniteError, PluginError
from slimquant.model.checks import check_samples
from slimquant.model.structure import (
    find_decoder_layers,
    float_module_names,
    layer_linears,
    normalize_linears,
    set_submodule,
)
from slimquant.plugins import AlgorithmPlan, hooks_of, plan_algorithms
from slimquant.quant.fake_linear import FakeQuantLinear, materialized_weights
from slimquant.runtime.catcher import catch_layer_inputs
from slimquant.runtime.context import LayerContext, with_hidden
from slimquant.runtime.linear_error import measure_linear_errors
from slimquant.runtime.plan import LinearPlan, check_group_sizes, plan_linears

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    index: int
    seconds: float
    output_rel_error: float  # ||quantized - float||^2 / ||float||^2 of the layer output
    quantized: int
    kept_float: int


@dataclass
class QuantizationReport:
    layers: list[LayerReport] = field(default_factory=list)
    plans: dict[str, LinearPlan | None] = field(default_factory=dict)
    linear_errors: dict[str, float] = field(default_factory=dict)  # relative output error per Linear
    seconds: float = 0.0

    def linear_types(self) -> dict[str, str]:
        return {n: ("FLOAT" if p is None else p.scheme.type_name) for n, p in self.plans.items()}


class _AllObserved(Exception):
    """Stops a layer's forward once every Linear of an observation pass has seen its input."""


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if torch.isfinite(torch.sum(tensor, dtype=torch.float32)):  # one NaN/Inf anywhere makes the sum non-finite
        return
    bad = (~torch.isfinite(tensor)).sum().item()  # or the sum overflowed: count for certain
    if bad:
        raise NonFiniteError(f"{what} holds {bad} NaN/Inf value(s)")


class LayerwiseQuantizer:
    def __init__(self, model: nn.Module, recipe: Recipe, device: torch.device,
                 algorithms: AlgorithmPlan | None = None, smooth_only: bool = False):
        self.model = model
        self.smooth_only = smooth_only  # run the smoothers, leave every Linear in float
        self.recipe = recipe
        self.device = device
        self.algorithms = algorithms or plan_algorithms(recipe)
        self.hook = self.algorithms.plugins.hook
        normalize_linears(model)
        self.prefix, self.layers = find_decoder_layers(model)
        linears = {}
        for i, layer in enumerate(self.layers):
            linears.update(layer_linears(layer, f"{self.prefix}.{i}"))
        self.plans = plan_linears(recipe, self.algorithms, list(linears), float_module_names(model))
        check_group_sizes(recipe, self.plans, linears)
        self.check_finite = recipe.runtime.check_finite
        if self.check_finite:  # every tensor that will be saved, not only those calibration reaches
            for name, tensor in model.state_dict().items():
                if tensor.is_floating_point():
                    _check_finite(tensor, name)

    # -- passes ------------------------------------------------------------------------------------------

    def _observe_pass(self, ctx: LayerContext, targets: list[str], keep: int | None = None) -> list[torch.Tensor]:
        """Run the calibration inputs through the layer with `observe` on each target Linear; return the outputs of
        the first `keep` inputs (all when None). On the other inputs the layer stops as soon as every target has
        seen its input: observing q/k/v needs neither attention nor the MLP."""
        pending: set[str] = set()

        def make_hook(name):
            def hook(module, inputs, output):
                x = inputs[0]
                if self.check_finite:
                    _check_finite(x, f"input activation of {name}")
                self.hook.observe(ctx=ctx, name=name, module=module, inputs=x, output=output)
                if pending:
                    pending.discard(name)
                    if not pending:
                        raise _AllObserved
            return hook

        handles = [ctx.module(name).register_forward_hook(make_hook(name)) for name in targets]
        outs = []
        try:
            with materialized_weights(ctx.layer):
                for i, inp in enumerate(ctx.inputs):
                    finish = keep is None or i < keep
                    pending.clear()
                    if not finish:
                        pending.update(targets)
                    try:
                        out = ctx.run_layer([inp])[0]
                    except _AllObserved:
                        continue
                    if finish:
                        outs.append(out)
            return outs
        finally:
            for h in handles:
                h.remove()

    def _quantize_linear(self, ctx: LayerContext, name: str, plan: LinearPlan) -> None:
        module = ctx.module(name)
        qweight = self.hook.quantize_weight(ctx=ctx, name=name, module=module, args=plan.scheme.weights,
                                            algorithm=plan.weight_algorithm)
        if qweight is None:
            raise PluginError(f"{name}: no plugin quantized it with algorithm {plan.weight_algorithm!r}")
        if self.check_finite:
            _check_finite(qweight.scale, f"{name} weight scale")
        ctx.qweights[name] = qweight
        act = None
        if plan.scheme.activations is not None:
            act = self.hook.quantize_act(ctx=ctx, name=name, module=module, args=plan.scheme.activations,
                                         algorithm=plan.act_algorithm)
            if act is None:
                raise PluginError(f"{name}: no plugin quantized its input with {plan.act_algorithm!r}")
        fake = FakeQuantLinear(qweight, module.bias, act, compute_dtype=module.weight.dtype)
        set_submodule(ctx.layer, name[len(ctx.prefix) + 1:], fake.to(self.device))

    def _needs_observation(self, plans: list[LinearPlan]) -> bool:
        for plugin in self.algorithms.plugins.plugins.values():
            if "observe" in hooks_of(type(plugin)):
                observes = getattr(plugin, "observes", None)
                if observes is None or any(observes(plan) for plan in plans):
                    return True
        return False

    def _sequential_groups(self, ctx: LayerContext) -> list[list[str]]:
        names = ctx.quantized_names()
        wants = any(getattr(p, "true_sequential", False) for p in self.algorithms.plugins.plugins.values())
        if not wants:
            return [names]
        groups = [[n for n in g if n in names] for g in ctx.trace.groups]
        return [g for g in groups if g]

    # -- the run ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, samples: list[torch.Tensor]) -> QuantizationReport:
        check_samples(samples, self.model)
        report = QuantizationReport(plans=dict(self.plans))
        start = time.perf_counter()
        inputs = self._catch(samples)
        progress = self.recipe.runtime.progress
        for index in tqdm(range(len(self.layers)), desc="layers", disable=not progress, leave=False):
            inputs, layer_report = self._run_layer(index, inputs, report.linear_errors)
            report.layers.append(layer_report)
            log.info("layer %d/%d: %.2fs, output error %.3e, %d quantized, %d float", index + 1,
                     len(self.layers), layer_report.seconds, layer_report.output_rel_error,
                     layer_report.quantized, layer_report.kept_float)
        report.seconds = time.perf_counter() - start
        return report

    def _catch(self, samples):
        if self.device.type != "cpu":  # everything but the decoder layers goes to the work device
            for module in self.model.children():
                module.to(self.device)
            self.layers.to("cpu")
        try:
            self.layers[0].to(self.device)
            return catch_layer_inputs(self.model, self.layers, samples, self.device, self.recipe.runtime.progress)
        finally:
            if self.device.type != "cpu":
                self.model.to("cpu")

    def _run_layer(self, index: int, inputs, linear_errors: dict[str, float]):
        started = time.perf_counter()
        layer = self.layers[index].to(self.device)
        prefix = f"{self.prefix}.{index}"
        linears = layer_linears(layer, prefix)
        plans = {n: self.plans.get(n) for n in linears}
        ctx = LayerContext(index, prefix, layer, self.device, linears, plans, inputs)
        quantized = ctx.quantized_names()

        if self.algorithms.smoothers and quantized:
            ctx.phase = "smooth"
            for smoother in self.algorithms.smoothers:  # each sees the layer as the previous one left it
                self._observe_pass(ctx, quantized, keep=0)
                self.hook.smooth(ctx=ctx, algorithm=smoother)
                ctx.clear_state()
                ctx._trace = None
        if self.smooth_only:
            outs = ctx.run_layer()
            if self.recipe.runtime.offload_layers and self.device.type != "cpu":
                self.layers[index].to("cpu")
            return ([with_hidden(inp, out) for inp, out in zip(inputs, outs, strict=True)],
                    LayerReport(index, time.perf_counter() - started, 0.0, 0, len(linears)))

        ctx.phase = "quantize"
        k = self.recipe.runtime.error_samples  # samples on which errors against float are measured
        float_out = None
        for i, group in enumerate(self._sequential_groups(ctx) if quantized else []):
            if i > 0:
                ctx.clear_state()
            if self._needs_observation([plans[n] for n in group]):
                outs = self._observe_pass(ctx, group, keep=k if float_out is None else 0)
                float_out = float_out if float_out is not None else outs
            elif float_out is None:
                float_out = ctx.run_layer(inputs[:k])
            for name in group:
                self._quantize_linear(ctx, name, plans[name])
        if float_out is None:
            float_out = ctx.run_layer(inputs[:k])

        fakes = {name: ctx.module(name) for name in quantized}
        with materialized_weights(layer):
            with measure_linear_errors(fakes, ctx.linears, into=linear_errors):
                quant_out = ctx.run_layer(inputs[:k])
            num = sum(float((q - f).float().pow(2).sum()) for q, f in zip(quant_out, float_out, strict=True))
            den = sum(float(f.float().pow(2).sum()) for f in float_out) or 1.0
            del float_out
            next_inputs = inputs  # filled in place, so only one set of hidden states is alive at a time
            for i, inp in enumerate(inputs):
                out = quant_out[i] if i < k else ctx.run_layer([inp])[0]
                if self.check_finite:
                    _check_finite(out, f"output of decoder layer {prefix} after quantization")
                next_inputs[i] = with_hidden(inp, out)
            del quant_out
        ctx.clear_state()
        if self.recipe.runtime.offload_layers and self.device.type != "cpu":
            self.layers[index].to("cpu")
        return next_inputs, LayerReport(index, time.perf_counter() - started, num / den, len(quantized),
                                        len(linears) - len(quantized))
