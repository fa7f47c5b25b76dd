"""One decoder layer, calibrated: observe -> smooth -> observe -> quantize weights -> quantize activations -> swap
in fake-quant Linears -> measure the errors against float -> the next layer's inputs."""

from __future__ import annotations

import time

import torch
from torch import nn

from slimquant.config.recipe import RuntimeSpec
from slimquant.errors import PluginError
from slimquant.model.checks import check_finite
from slimquant.model.structure import layer_linears, set_submodule
from slimquant.plugins import AlgorithmPlan
from slimquant.quant.actparams import ActQParams
from slimquant.quant.fake_linear import FakeQuantLinear, materialized_weights
from slimquant.quant.grid import WeightGrid
from slimquant.quant.qweight import QuantizedWeight
from slimquant.quant.scale_rounding import float16_scales
from slimquant.quant.two_level import two_level_grid
from slimquant.runtime import distributed
from slimquant.runtime.cache_pass import quantize_layer_cache
from slimquant.runtime.context import LayerContext, with_hidden
from slimquant.runtime.linear_error import measure_linear_errors
from slimquant.runtime.parallelism import Parallelism
from slimquant.runtime.plan import LinearPlan
from slimquant.runtime.precision import calibration_precision, full_precision
from slimquant.runtime.reports import LayerReport
from slimquant.runtime.sources import RuntimeSource


class _AllObserved(Exception):
    """Stops a layer's forward once every Linear of an observation pass has seen its input."""


def _checked_qweight(result, plugin: str, name: str, module: nn.Module) -> QuantizedWeight:
    if not isinstance(result, QuantizedWeight):
        raise PluginError(f"{name}: plugin {plugin!r} returned {type(result).__name__} from quantize_weight, "
                          "not a QuantizedWeight")
    try:  # again: its fields may have been changed since it was built
        result.validate()
    except (ValueError, TypeError, AttributeError) as exc:
        raise PluginError(f"{name}: plugin {plugin!r} returned an invalid QuantizedWeight: {exc}") from exc
    if tuple(result.shape) != tuple(module.weight.shape):
        raise PluginError(f"{name}: plugin {plugin!r} returned codes of shape {list(result.shape)} for a weight of "
                          f"shape {list(module.weight.shape)}")
    return result


def _same_codebook(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(a.float().cpu(), b.float().cpu())


def output_error(quant_out: list[torch.Tensor], float_out: list[torch.Tensor], parallel: Parallelism,
                 device: torch.device) -> float:
    """||quantized - float||^2 / ||float||^2 of a layer's outputs, summed over the processes."""
    num = sum(float((q - f).float().pow(2).sum()) for q, f in zip(quant_out, float_out, strict=True))
    den = sum(float(f.float().pow(2).sum()) for f in float_out)
    if parallel.ranks.several:
        num, den = distributed.all_sum([num, den], device)
    return num / (den or 1.0)


class LayerEngine:
    """Quantizes decoder layers one at a time, reading each from `source`; `smooth_only` runs the smoothers and
    leaves every Linear in float."""

    def __init__(self, algorithms: AlgorithmPlan, plans: dict[str, LinearPlan | None], device: torch.device,
                 pass_dtype: torch.dtype | None, runtime: RuntimeSpec, parallel: Parallelism,
                 source: RuntimeSource, prefix: str, smooth_only: bool = False):
        self.algorithms = algorithms
        self.plugins = algorithms.plugins
        self.plans = plans
        self.device = device
        self.pass_dtype = pass_dtype
        self.check_finite = runtime.check_finite
        self.error_samples = runtime.error_samples
        self.parallel = parallel
        self.source = source
        self.prefix = prefix
        self.smooth_only = smooth_only
        self._grids: dict[tuple, WeightGrid | None] = {}

    def grid(self, plan: LinearPlan) -> WeightGrid | None:
        """The plan's weight grid from its provider's `weight_grid` hook, built once per (provider, WeightArgs)."""
        key = (plan.grid_algorithm, plan.scheme.weights)
        if key not in self._grids:
            grid = two_level_grid(plan.scheme.weights)
            if plan.grid_algorithm is not None:
                grid = self.plugins.call(plan.grid_algorithm, "weight_grid", args=plan.scheme.weights)
                if grid is not None and not isinstance(grid, WeightGrid):
                    raise PluginError(f"plugin {plan.grid_algorithm!r} returned {type(grid).__name__} from "
                                      "weight_grid, not a slimquant.quant.grid.WeightGrid")
            self._grids[key] = grid
        return self._grids[key]

    def precision(self):
        """The calibration passes' autocast (slimquant.runtime.precision); never around a plugin's own work."""
        return calibration_precision(self.pass_dtype, self.device)

    def layer_context(self, index: int, prefix: str, layer: nn.Module, linears: dict, inputs) -> LayerContext:
        return LayerContext(index, prefix, layer, self.device, linears, {n: self.plans.get(n) for n in linears},
                            inputs, grid_of=self.grid, precision=self.precision, row_blocks=self.parallel.row_blocks)

    # -- passes ------------------------------------------------------------------------------------------

    def observe_pass(self, ctx: LayerContext, targets: dict[str, list[str]], keep: int = 0) -> list[torch.Tensor]:
        """Run the calibration inputs through the layer, showing each target Linear's input to its observers
        (`targets`: Linear name -> plugin names); return the outputs of the first `keep` inputs. On the other inputs
        the layer stops as soon as every target has seen its input: observing q/k/v needs neither attention nor MLP."""
        pending: set[str] = set()
        converted: list = [None, None]  # the last input seen and its pass-dtype copy
        parallel = self.parallel

        def observe(name, observers, module, x, output):
            if self.check_finite:
                check_finite(x, f"input activation of {name}")
            if converted[0] is not x:  # q/k/v read one tensor: convert it once, so it stays one tensor
                # what the Linear multiplies under autocast (a norm's output is float32)
                converted[:] = [x, x if self.pass_dtype is None else x.to(self.pass_dtype)]
                parallel.inputs_seen += 1
            parallel.input_order.setdefault(name, parallel.inputs_seen)  # Linears reading one tensor share it
            x = converted[1]
            with full_precision(self.device):
                for plugin in observers:
                    self.plugins.call(plugin, "observe", ctx=ctx, name=name, module=module, inputs=x, output=output)
            if pending:
                pending.discard(name)
                if not pending:
                    raise _AllObserved

        def hook(name, observers):
            return lambda module, inputs, output: observe(name, observers, module, inputs[0], output)

        def pre_hook(name, observers):  # observers that do without the output: the Linear need not run
            return lambda module, args, kwargs: observe(name, observers, module,
                                                        args[0] if args else next(iter(kwargs.values())), None)

        handles = []
        for name, observers in targets.items():
            if not observers:
                continue
            module = ctx.module(name)
            if self.algorithms.observe_before_run(observers):
                handles.append(module.register_forward_pre_hook(pre_hook(name, observers), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(hook(name, observers)))
        outs = []
        try:
            with materialized_weights(ctx.layer), self.precision():
                for i, inp in enumerate(ctx.inputs):
                    finish = i < keep
                    pending.clear()
                    if not finish:
                        pending.update(n for n, o in targets.items() if o)
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

    def quantize_linear(self, ctx: LayerContext, name: str, plan: LinearPlan, module: nn.Module,
                        parent: nn.Module, prefix: str) -> None:
        self.install_linear(ctx, name, plan, module, parent, prefix, self.quantized_weight(ctx, name, plan, module))

    def quantized_weight(self, ctx: LayerContext, name: str, plan: LinearPlan, module: nn.Module) -> QuantizedWeight:
        algorithm = plan.weight_algorithm
        result = self.plugins.call(algorithm, "quantize_weight", ctx=ctx, name=name, module=module,
                                   args=plan.scheme.weights)  # an exception inside: a PluginError naming the Linear
        if result is None:
            raise PluginError(f"{name}: plugin {algorithm!r} has no quantize_weight hook")
        rows = module.out_features
        if isinstance(result, QuantizedWeight) and self.parallel.row_blocks(name, rows) != slice(0, rows):
            result = distributed.gather_rows(result, rows, self.parallel.ranks, algorithm, name)
        qweight = _checked_qweight(result, algorithm, name, module)
        grid = self.grid(plan) if plan.grid_algorithm else None
        if grid is not None and not _same_codebook(qweight.codebook, grid.codebook):
            raise PluginError(f"{name}: plugin {algorithm!r} returned weights off the grid of "
                              f"{plan.grid_algorithm!r} (another codebook); round onto ctx.grid(name)")
        if plan.scheme.weights.scale_dtype == "float16":
            qweight = float16_scales(qweight)
        if self.check_finite:
            check_finite(qweight.scale, f"{name} weight scale")
        return qweight

    def install_linear(self, ctx: LayerContext, name: str, plan: LinearPlan, module: nn.Module, parent: nn.Module,
                       prefix: str, qweight: QuantizedWeight) -> None:
        ctx.qweights[name] = qweight
        act = None
        if plan.scheme.activations is not None:
            act = self.plugins.call(plan.act_algorithm, "quantize_act", ctx=ctx, name=name, module=module,
                                    args=plan.scheme.activations)
            if not isinstance(act, ActQParams):
                raise PluginError(f"{name}: plugin {plan.act_algorithm!r} returned {type(act).__name__} from "
                                  "quantize_act, not ActQParams")
        fake = FakeQuantLinear(qweight, module.bias, act, compute_dtype=module.weight.dtype,
                               input_transform=getattr(module, "input_transform", None))
        set_submodule(parent, name[len(prefix) + 1:], fake.to(self.device))

    def quantize_group(self, ctx: LayerContext, group: list[str], layer: nn.Module, prefix: str) -> None:
        """Quantize the Linears of `group`: all of them here in one process; on several, either each its row block
        (gathered) or, with enough clusters of Linears per process, each cluster on one process and sent to the
        others (see `linear_cost` in slimquant.hookspecs)."""
        parallel = self.parallel
        parallel.owners = owners = parallel.cluster_owners(ctx, group)
        try:
            for name in group:
                if owners is None or owners[name] == parallel.ranks.rank:
                    self.quantize_linear(ctx, name, ctx.plans[name], ctx.module(name), layer, prefix)
            for name in group if owners is not None else []:
                mine = owners[name] == parallel.ranks.rank
                qweight = distributed.broadcast_qweight(ctx.qweights[name] if mine else None, owners[name],
                                                        parallel.ranks, self.device,
                                                        ctx.plans[name].weight_algorithm, name)
                if not mine:
                    self.install_linear(ctx, name, ctx.plans[name], ctx.module(name), layer, prefix, qweight)
        finally:
            parallel.owners = None

    def observers(self, plans: dict[str, LinearPlan | None], names: list[str]) -> dict[str, list[str]]:
        return {n: self.algorithms.observers(plans[n]) for n in names}

    def sequential_groups(self, ctx: LayerContext) -> list[list[str]]:
        names = ctx.quantized_names()
        if not self.algorithms.sequential([ctx.plans[n] for n in names]):
            return [names]
        groups = [[n for n in g if n in names] for g in ctx.trace.groups]
        return [g for g in groups if g]

    def smooth(self, ctx: LayerContext, quantized: list[str], keep: int) -> list[torch.Tensor]:
        """Run the smoothers; return the float layer's outputs on the first `keep` inputs, from before any rewrite
        (a smoother that also clips weights, as AWQ does, must not move the reference the errors are measured on)."""
        ctx.phase = "smooth"
        float_out = []
        for i, smoother in enumerate(self.algorithms.smoothers):  # each sees the layer as the previous one left it
            outs = self.observe_pass(ctx, {n: [smoother] for n in quantized}, keep=keep if i == 0 else 0)
            if i == 0:
                float_out = outs
            self.parallel.reduce_statistics(ctx)
            self.plugins.call(smoother, "smooth", ctx=ctx)
            ctx._trace = None  # the rewrite may have changed what the trace recorded (biases, scales)
        return float_out

    # -- the layer ---------------------------------------------------------------------------------------

    def run_layer(self, index: int, inputs, linear_errors: dict[str, float]):
        """Quantize decoder layer `index` on its calibration `inputs`; return the next layer's inputs (`inputs`,
        filled in place) and the layer's report. Linear errors go into `linear_errors`."""
        started = time.perf_counter()
        layer = self.source.load_layer(index, self.device)
        prefix = f"{self.prefix}.{index}"
        linears = layer_linears(layer, prefix)
        ctx = self.layer_context(index, prefix, layer, linears, inputs)
        self.parallel.start_layer()
        plans = ctx.plans
        quantized = ctx.quantized_names()

        # errors against float are measured on error_samples samples, shared among the processes
        error_samples = -(-self.error_samples // self.parallel.ranks.size)
        k = ctx.batches_covering(error_samples)
        float_out = None
        if self.algorithms.smoothers and quantized:
            float_out = self.smooth(ctx, quantized, keep=0 if self.smooth_only else k)
        if self.smooth_only:
            with self.precision():
                outs = ctx.run_layer()
            ctx.clear_state()
            return ([with_hidden(inp, out) for inp, out in zip(inputs, outs, strict=True)],
                    LayerReport(index, time.perf_counter() - started, 0.0, 0, len(linears)))

        ctx.phase = "quantize"
        for group in self.sequential_groups(ctx) if quantized else []:
            observers = self.observers(plans, group)
            if any(observers.values()):
                outs = self.observe_pass(ctx, observers, keep=k if float_out is None else 0)
                float_out = float_out if float_out is not None else outs
                self.parallel.reduce_statistics(ctx)
            elif float_out is None:
                with self.precision():
                    float_out = ctx.run_layer(inputs[:k])
            self.quantize_group(ctx, group, layer, prefix)
        if float_out is None:
            with self.precision():
                float_out = ctx.run_layer(inputs[:k])
        if self.algorithms.cache is not None:
            quantize_layer_cache(ctx, self.algorithms)

        with materialized_weights(layer), self.precision():
            quant_out, rel_error = self.measure_errors(ctx, quantized, inputs[:k], float_out, linear_errors,
                                                       error_samples)
            del float_out
            next_inputs = self.next_inputs(ctx, inputs, quant_out, k, prefix)
            del quant_out
        ctx.clear_state()
        return next_inputs, LayerReport(index, time.perf_counter() - started, rel_error, len(quantized),
                                        len(linears) - len(quantized))

    def measure_errors(self, ctx: LayerContext, quantized: list[str], inputs, float_out: list[torch.Tensor],
                       linear_errors: dict[str, float], rows: int) -> tuple[list[torch.Tensor], float]:
        """The quantized layer's outputs on `inputs` and their relative error against `float_out`; each quantized
        Linear's relative output error (on `rows` samples) goes into `linear_errors`."""
        fakes = {name: ctx.module(name) for name in quantized}
        with measure_linear_errors(fakes, ctx.linears, into=linear_errors, rows=rows):
            quant_out = ctx.run_layer(inputs)
        return quant_out, output_error(quant_out, float_out, self.parallel, self.device)

    def next_inputs(self, ctx: LayerContext, inputs, quant_out: list[torch.Tensor], k: int, prefix: str):
        """The quantized layer's outputs as the next layer's inputs: `quant_out` for the first `k`, the rest run
        now. Filled in place, so only one set of hidden states is alive at a time."""
        for i, inp in enumerate(inputs):
            out = quant_out[i] if i < k else ctx.run_layer([inp])[0]
            if self.check_finite:
                check_finite(out, f"output of decoder layer {prefix} after quantization")
            inputs[i] = with_hidden(inp, out)
        return inputs
