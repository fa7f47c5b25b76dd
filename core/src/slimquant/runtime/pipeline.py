"""The layer-by-layer runtime: catch layer-0 inputs, then per decoder layer observe -> smooth -> observe ->
quantize weights -> quantize activations -> swap in fake-quant Linears -> feed the next layer.

When no plugin of the run needs calibration data (round-to-nearest, HQQ, NF4), the data-free path quantizes every
Linear straight from its weight: no sample is read or run.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from slimquant.config.recipe import Recipe
from slimquant.config.scheme import Strategy
from slimquant.errors import CalibrationError, CheckpointError, PluginError, RecipeError
from slimquant.model.checks import check_finite, check_samples
from slimquant.model.structure import layer_linears, set_submodule
from slimquant.plugins import AlgorithmPlan, PluginSet, linear_cost, plan_algorithms, row_parallel, runs_distributed
from slimquant.quant.actparams import ActQParams
from slimquant.quant.fake_linear import FakeQuantLinear, materialized_weights
from slimquant.quant.grid import WeightGrid
from slimquant.quant.qweight import QuantizedWeight
from slimquant.quant.scale_rounding import float16_scales
from slimquant.quant.two_level import two_level_grid
from slimquant.runtime import distributed, kv_attention
from slimquant.runtime.cache_pass import quantize_layer_cache
from slimquant.runtime.catcher import catch_layer_inputs
from slimquant.runtime.checkpoint import Checkpoint
from slimquant.runtime.context import LayerContext, hidden_of_input, with_hidden
from slimquant.runtime.fingerprint import job_parts, model_parts, run_fingerprint, samples_parts
from slimquant.runtime.linear_error import measure_linear_errors
from slimquant.runtime.plan import LinearPlan
from slimquant.runtime.precision import calibration_precision, full_precision, resolve_calibration_dtype
from slimquant.runtime.preflight import plan_model
from slimquant.stats import Statistic

if TYPE_CHECKING:
    from slimquant.budget import BudgetReport

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    index: int
    seconds: float
    output_rel_error: float  # ||quantized - float||^2 / ||float||^2 of the layer output (0 when data-free)
    quantized: int
    kept_float: int


@dataclass
class QuantizationReport:
    layers: list[LayerReport] = field(default_factory=list)
    plans: dict[str, LinearPlan | None] = field(default_factory=dict)
    linear_errors: dict[str, float] = field(default_factory=dict)  # relative output error per Linear
    seconds: float = 0.0
    data_free: bool = False
    budget: BudgetReport | None = None  # what budget mode measured and chose, when the recipe had a budget
    checkpoint: Path | None = None  # the resume checkpoint to delete once the output is saved (remove_checkpoint)
    resumed_layers: int = 0  # decoder layers restored from a checkpoint instead of quantized by this run
    calibration_dtype: str = "model dtype"  # what the calibration passes computed in (runtime.calibration_dtype)

    def linear_types(self) -> dict[str, str]:
        return {n: ("FLOAT" if p is None else p.scheme.type_name) for n, p in self.plans.items()}


class LayerSource(Protocol):
    """Where decoder layers come from and go to when the model is never whole in memory (`slimquant.lazy`):
    the runtime's model then holds meta-device skeletons, and each part is read when its turn comes."""

    def load_outer(self, device: torch.device) -> None:
        """Read what runs before the first decoder layer (embeddings), for catching its inputs."""

    def release_outer(self) -> None: ...

    def load_layer(self, index: int, device: torch.device) -> nn.Module:
        """Read decoder layer `index` onto `device`, in place of its skeleton in the model's layer list."""

    def finish_layer(self, index: int, layer: nn.Module) -> None:
        """The layer is quantized and has fed the next one: save it, and put its skeleton back."""

    def empty_layer(self, index: int) -> nn.Module:
        """A meta-device copy of layer `index`'s skeleton in its place, for a resume checkpoint to fill."""

    def model_digest(self) -> str:
        """A sha256 of the model this source reads (the resume fingerprint's model part)."""


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


def _float_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _same_codebook(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(a.float().cpu(), b.float().cpu())


_CHECK_STATISTICS = contextvars.ContextVar("slimquant_check_statistics", default=False)


@contextlib.contextmanager
def statistics_checked() -> Iterator[None]:
    """Within the block a run in one process refuses what a run on several would leave uncombined
    (`check_reducible_state`); slimquant.testing.check_plugin runs under it."""
    token = _CHECK_STATISTICS.set(True)
    try:
        yield
    finally:
        _CHECK_STATISTICS.reset(token)


def _uncombined(value, path: str):
    """(path, what) for each tensor in a plugin's layer state outside a Statistic: in a dict, list or tuple, or in
    the attributes of an object that is not a Statistic. A QuantizedWeight (a result, kept for a sibling) is not a
    statistic."""
    if isinstance(value, Statistic | QuantizedWeight):
        return
    if torch.is_tensor(value):
        yield path, "a tensor"
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _uncombined(item, f"{path}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _uncombined(item, f"{path}[{i}]")
    elif any(torch.is_tensor(v) for v in getattr(value, "__dict__", {}).values()):
        yield path, f"a {type(value).__name__} (not a Statistic)"


def _state_owner(key: str, plugins: PluginSet) -> str | None:
    """The plugin a ctx.state key belongs to: its name, or its name and a suffix (``"piecewise.sample"``)."""
    return next((n for n in plugins.plugins if key == n or key.startswith(f"{n}.")), None)


def check_reducible_state(states: dict[str, dict], plugins: PluginSet) -> None:
    """Refuse a tensor that a plugin declaring `distributed` keeps in its layer state outside a Statistic: a run on
    several processes combines only Statistics, and would leave it as each process saw its share of the data."""
    for key, state in states.items():
        owner = _state_owner(key, plugins)
        if owner is None or not runs_distributed(plugins.get(owner)):
            continue
        for path, what in _uncombined(state, ""):
            raise PluginError(f"plugin {owner!r} declares distributed = True but keeps {what} at "
                              f"ctx.state({key!r}){path}: only slimquant.stats.Statistic objects are combined across "
                              "processes; keep it in a Statistic subclass that declares its reductions")


def _statistics(value):
    """The Statistic objects in a plugin's layer state (nested in dicts, lists and tuples)."""
    if isinstance(value, Statistic):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _statistics(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _statistics(item)


class LayerwiseQuantizer:
    def __init__(self, model: nn.Module, recipe: Recipe, device: torch.device,
                 algorithms: AlgorithmPlan | None = None, smooth_only: bool = False,
                 source: LayerSource | None = None):
        self.model = model
        self.source = source
        self.smooth_only = smooth_only  # run the smoothers, leave every Linear in float
        self.recipe = recipe
        self.device = device
        self.algorithms = algorithms or plan_algorithms(recipe)
        self.plugins = self.algorithms.plugins
        self.ranks = distributed.current()
        if self.ranks.several:  # refused alike on every process, then compared before any work
            self._check_distributed()
            distributed.agree({**job_parts(recipe, self.algorithms), **model_parts(model)}, "the model and recipe",
                              device)
        planned = plan_model(model, recipe, self.algorithms)
        self.prefix, self.layers, self.plans = planned.prefix, planned.layers, planned.plans
        if self.algorithms.cache is not None:
            kv_attention.enable(model)
        self.needs_data = smooth_only or self.algorithms.requires_calibration_data(self.plans.values())
        self.check_finite = recipe.runtime.check_finite
        weight_only = self.algorithms.cache is None and all(
            p is None or p.scheme.activations is None for p in self.plans.values())
        self.pass_dtype = resolve_calibration_dtype(recipe.runtime.calibration_dtype, _float_dtype(self.layers[0]),
                                                    device, weight_only)
        self._grids: dict[tuple, WeightGrid | None] = {}
        self._reduced: list[Statistic] = []  # this layer's statistics already combined across processes
        self._input_order: dict[str, int] = {}  # Linear -> ordinal of the input tensor it read (this layer)
        self._inputs_seen = 0
        self._owners: dict[str, int] | None = None  # Linear -> the process quantizing it (_quantize_group)
        if self.check_finite:  # every tensor that will be saved, not only those calibration reaches
            for name, tensor in model.state_dict().items():
                if tensor.is_floating_point() and not tensor.is_meta:  # a source's layers are checked when read
                    check_finite(tensor, name)

    def _check_distributed(self) -> None:
        problems = [f"plugin {name!r} does not declare that it runs on several processes (its statistics or "
                    "searches are per process)" for name, plugin in self.plugins.plugins.items()
                    if not runs_distributed(plugin)]
        if self.source is not None:
            problems.append("lazy loading runs in one process")
        if self.recipe.runtime.checkpoint_dir is not None:
            problems.append("resume checkpoints are written by one process: leave out runtime.checkpoint_dir")
        if self.algorithms.cache is not None:
            problems.append("a quantized attention cache is calibrated in one process")
        if problems:
            raise RecipeError(f"this run has {self.ranks.size} processes (torch.distributed), but:\n  "
                              + "\n  ".join(problems) + "\nrun a single process")

    def _row_blocks(self, name: str, rows: int) -> slice:
        plan = self.plans[name]
        if (self.ranks.several and self._owners is None and row_parallel(self.plugins.get(plan.weight_algorithm))
                and plan.scheme.weights.strategy != Strategy.TENSOR):  # a tensor-wide scale ties every row
            return self.ranks.row_block(rows)
        return slice(0, rows)

    def _reduce_statistics(self, ctx: LayerContext) -> None:
        """Every process's statistics of this layer combined, as each Statistic class declares (once each)."""
        if self.ranks.several or _CHECK_STATISTICS.get():
            check_reducible_state(ctx._state, self.plugins)
        if not self.ranks.several:
            return
        for plugin, state in ctx._state.items():
            for stat in _statistics(state):
                if not any(stat is done for done in self._reduced):
                    distributed.reduce_statistic(stat, self.device, plugin)
                    self._reduced.append(stat)

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

    def _precision(self):
        """The calibration passes' autocast (slimquant.runtime.precision); never around a plugin's own work."""
        return calibration_precision(self.pass_dtype, self.device)

    def _layer_context(self, index: int, prefix: str, layer: nn.Module, linears: dict, inputs) -> LayerContext:
        return LayerContext(index, prefix, layer, self.device, linears, {n: self.plans.get(n) for n in linears},
                            inputs, grid_of=self.grid, precision=self._precision, row_blocks=self._row_blocks)

    # -- passes ------------------------------------------------------------------------------------------

    def _observe_pass(self, ctx: LayerContext, targets: dict[str, list[str]], keep: int = 0) -> list[torch.Tensor]:
        """Run the calibration inputs through the layer, showing each target Linear's input to its observers
        (`targets`: Linear name -> plugin names); return the outputs of the first `keep` inputs. On the other inputs
        the layer stops as soon as every target has seen its input: observing q/k/v needs neither attention nor MLP."""
        pending: set[str] = set()
        converted: list = [None, None]  # the last input seen and its pass-dtype copy

        def observe(name, observers, module, x, output):
            if self.check_finite:
                check_finite(x, f"input activation of {name}")
            if converted[0] is not x:  # q/k/v read one tensor: convert it once, so it stays one tensor
                # what the Linear multiplies under autocast (a norm's output is float32)
                converted[:] = [x, x if self.pass_dtype is None else x.to(self.pass_dtype)]
                self._inputs_seen += 1
            self._input_order.setdefault(name, self._inputs_seen)  # Linears reading one tensor share its ordinal
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
            with materialized_weights(ctx.layer), self._precision():
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

    def _quantize_linear(self, ctx: LayerContext, name: str, plan: LinearPlan, module: nn.Module,
                         parent: nn.Module, prefix: str) -> None:
        self._install_linear(ctx, name, plan, module, parent, prefix, self._quantized_weight(ctx, name, plan, module))

    def _quantized_weight(self, ctx: LayerContext, name: str, plan: LinearPlan, module: nn.Module) -> QuantizedWeight:
        algorithm = plan.weight_algorithm
        result = self.plugins.call(algorithm, "quantize_weight", ctx=ctx, name=name, module=module,
                                   args=plan.scheme.weights)  # an exception inside: a PluginError naming the Linear
        if result is None:
            raise PluginError(f"{name}: plugin {algorithm!r} has no quantize_weight hook")
        rows = module.out_features
        if isinstance(result, QuantizedWeight) and self._row_blocks(name, rows) != slice(0, rows):
            result = distributed.gather_rows(result, rows, self.ranks, algorithm, name)
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

    def _install_linear(self, ctx: LayerContext, name: str, plan: LinearPlan, module: nn.Module, parent: nn.Module,
                        prefix: str, qweight: QuantizedWeight) -> None:
        ctx.qweights[name] = qweight
        act = None
        if plan.scheme.activations is not None:
            act = self.plugins.call(plan.act_algorithm, "quantize_act", ctx=ctx, name=name, module=module,
                                    args=plan.scheme.activations)
            if not isinstance(act, ActQParams):
                raise PluginError(f"{name}: plugin {plan.act_algorithm!r} returned {type(act).__name__} from "
                                  "quantize_act, not ActQParams")
        fake = FakeQuantLinear(qweight, module.bias, act, compute_dtype=module.weight.dtype)
        set_submodule(parent, name[len(prefix) + 1:], fake.to(self.device))

    def _quantize_group(self, ctx: LayerContext, group: list[str], layer: nn.Module, prefix: str) -> None:
        """Quantize the Linears of `group`: all of them here in one process; on several, either each its row block
        (gathered) or, with enough clusters of Linears per process, each cluster on one process and sent to the
        others (see `linear_cost` in slimquant.hookspecs)."""
        self._owners = owners = self._cluster_owners(ctx, group)
        try:
            for name in group:
                if owners is None or owners[name] == self.ranks.rank:
                    self._quantize_linear(ctx, name, ctx.plans[name], ctx.module(name), layer, prefix)
            for name in group if owners is not None else []:
                mine = owners[name] == self.ranks.rank
                qweight = distributed.broadcast_qweight(ctx.qweights[name] if mine else None, owners[name],
                                                        self.ranks, self.device, ctx.plans[name].weight_algorithm,
                                                        name)
                if not mine:
                    self._install_linear(ctx, name, ctx.plans[name], ctx.module(name), layer, prefix, qweight)
        finally:
            self._owners = None

    def _cluster_owners(self, ctx: LayerContext, group: list[str]) -> dict[str, int] | None:
        if not self.ranks.several or any(ctx.grid(n) is not None for n in group):
            return None
        clusters: dict[object, list[str]] = {}
        for name in group:  # a Linear no observation reached is a cluster of its own
            clusters.setdefault(self._input_order.get(name, name), []).append(name)
        if len(clusters) < 2 * self.ranks.size:
            return None
        costs = [linear_cost(self.plugins.get(ctx.plans[names[0]].weight_algorithm),
                             sum(ctx.module(n).out_features for n in names), ctx.module(names[0]).in_features)
                 for names in clusters.values()]
        return distributed.assign_owners(list(clusters.values()), costs, self.ranks)

    def _observers(self, plans: dict[str, LinearPlan | None], names: list[str]) -> dict[str, list[str]]:
        return {n: self.algorithms.observers(plans[n]) for n in names}

    def _sequential_groups(self, ctx: LayerContext) -> list[list[str]]:
        names = ctx.quantized_names()
        if not self.algorithms.sequential([ctx.plans[n] for n in names]):
            return [names]
        groups = [[n for n in g if n in names] for g in ctx.trace.groups]
        return [g for g in groups if g]

    # -- the run ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, samples: list[torch.Tensor] | None = None) -> QuantizationReport:
        """Quantize the model in place. `samples` None takes the data-free path (when no plugin needs data);
        with samples, each layer's and Linear's error against float is measured on them as well."""
        if self.ranks.several:
            distributed.agree(samples_parts(samples, self.pass_dtype), "the calibration samples", self.device)
        if samples is None:
            if self.needs_data:
                raise CalibrationError("this recipe needs calibration data (its plugins observe activations or "
                                       "smooth): give samples")
            return self._run_data_free()
        check_samples(samples, self.model)
        if self.ranks.several:  # each process calibrates on its share
            if len(samples) < self.ranks.size:
                raise CalibrationError(f"{len(samples)} calibration samples for {self.ranks.size} processes: give "
                                       "at least one per process")
            samples = samples[self.ranks.rank::self.ranks.size]
        report = QuantizationReport(plans=dict(self.plans))
        if self.pass_dtype is not None:
            report.calibration_dtype = str(self.pass_dtype).removeprefix("torch.")
        start = time.perf_counter()
        checkpoint = self._open_checkpoint(samples, report)
        inputs = self._catch(samples)
        if checkpoint is not None and checkpoint.finished:
            inputs = [with_hidden(inp, h.to(hidden_of_input(inp).device))
                      for inp, h in zip(inputs, self._resume(checkpoint, report), strict=True)]
        progress = self.recipe.runtime.progress
        for index in tqdm(range(len(report.layers), len(self.layers)), desc="layers", disable=not progress,
                          leave=False):
            inputs, layer_report = self._run_layer(index, inputs, report.linear_errors)
            report.layers.append(layer_report)
            if checkpoint is not None:
                self._save_checkpoint(checkpoint, index, [hidden_of_input(i) for i in inputs], report)
            self._finish_layer(index)
            log.info("layer %d/%d: %.2fs, output error %.3e, %d quantized, %d float", index + 1,
                     len(self.layers), layer_report.seconds, layer_report.output_rel_error,
                     layer_report.quantized, layer_report.kept_float)
        report.seconds = time.perf_counter() - start
        return report

    def _run_data_free(self) -> QuantizationReport:
        """Every Linear quantized from its weight alone, layer by layer on the work device; nothing is run."""
        report = QuantizationReport(plans=dict(self.plans), data_free=True)
        start = time.perf_counter()
        checkpoint = self._open_checkpoint(None, report)
        if checkpoint is not None and checkpoint.finished:
            self._resume(checkpoint, report)
        for index in tqdm(range(len(report.layers), len(self.layers)), desc="layers",
                          disable=not self.recipe.runtime.progress, leave=False):
            started = time.perf_counter()
            layer = self._load_layer(index)
            prefix = f"{self.prefix}.{index}"
            linears = layer_linears(layer, prefix)
            quantized = [n for n in linears if self.plans.get(n) is not None]
            ctx = self._layer_context(index, prefix, layer, linears, [])
            ctx.phase = "quantize"
            for name in quantized:
                self._quantize_linear(ctx, name, self.plans[name], linears[name], layer, prefix)
            if self.algorithms.cache is not None:  # dynamic only: a static cache needs data
                quantize_layer_cache(ctx, self.algorithms)
            report.layers.append(LayerReport(index, time.perf_counter() - started, 0.0, len(quantized),
                                             len(linears) - len(quantized)))
            if checkpoint is not None:
                self._save_checkpoint(checkpoint, index, None, report)
            self._finish_layer(index)
        report.seconds = time.perf_counter() - start
        return report

    # -- resume checkpoints (slimquant.runtime.checkpoint) ---------------------------------------------------

    def _open_checkpoint(self, samples, report: QuantizationReport) -> Checkpoint | None:
        runtime = self.recipe.runtime
        if runtime.checkpoint_dir is None:
            return None
        if self.algorithms.cache is not None:
            raise CheckpointError("resume checkpoints do not hold a quantized attention cache yet: leave out "
                                  "kv_cache or runtime.checkpoint_dir")
        digest = self.source.model_digest() if self.source is not None else None
        fingerprint = run_fingerprint(self.model, self.recipe, samples, self.algorithms, self.pass_dtype, digest)
        checkpoint = Checkpoint.start(runtime.checkpoint_dir, fingerprint, len(self.layers), runtime.resume)
        if not runtime.keep_checkpoint:
            report.checkpoint = checkpoint.directory
        return checkpoint

    def _resume(self, checkpoint: Checkpoint, report: QuantizationReport) -> list[torch.Tensor] | None:
        """Put back the layers an earlier run finished; return the hidden states that feed the next one."""
        for index, entry in enumerate(checkpoint.finished):
            if self.source is not None:  # written to the output again, as if just quantized
                layer = self.source.empty_layer(index)
                checkpoint.restore_layer(index, layer, assign=True)
                self.source.finish_layer(index, layer)
            else:
                checkpoint.restore_layer(index, self.layers[index])
                if not self.recipe.runtime.offload_layers:
                    self.layers[index].to(self.device)
            report.layers.append(LayerReport(**entry["report"]))
            report.linear_errors.update(entry["linear_errors"])
        report.resumed_layers = len(checkpoint.finished)
        log.info("resumed from %s: %d of %d decoder layers were finished", checkpoint.directory,
                 report.resumed_layers, len(self.layers))
        return checkpoint.hidden()

    def _save_checkpoint(self, checkpoint: Checkpoint, index: int, hidden, report: QuantizationReport) -> None:
        prefix = f"{self.prefix}.{index}."
        errors = {n: e for n, e in report.linear_errors.items() if n.startswith(prefix)}
        checkpoint.save_layer(index, self.layers[index], hidden, asdict(report.layers[-1]), errors)

    def _catch(self, samples):
        if self.source is not None:
            self.source.load_outer(self.device)
            try:
                return catch_layer_inputs(self.model, self.layers, samples, self.device,
                                          self.recipe.runtime.progress, self.recipe.runtime.batch_tokens)
            finally:
                self.source.release_outer()
        if self.device.type != "cpu":  # everything but the decoder layers goes to the work device
            for module in self.model.children():
                module.to(self.device)
            self.layers.to("cpu")
        try:
            self.layers[0].to(self.device)
            return catch_layer_inputs(self.model, self.layers, samples, self.device, self.recipe.runtime.progress,
                                      self.recipe.runtime.batch_tokens)
        finally:
            if self.device.type != "cpu":
                self.model.to("cpu")

    def _smooth(self, ctx: LayerContext, quantized: list[str], keep: int) -> list[torch.Tensor]:
        """Run the smoothers; return the float layer's outputs on the first `keep` inputs, from before any rewrite
        (a smoother that also clips weights, as AWQ does, must not move the reference the errors are measured on)."""
        ctx.phase = "smooth"
        float_out = []
        for i, smoother in enumerate(self.algorithms.smoothers):  # each sees the layer as the previous one left it
            outs = self._observe_pass(ctx, {n: [smoother] for n in quantized}, keep=keep if i == 0 else 0)
            if i == 0:
                float_out = outs
            self._reduce_statistics(ctx)
            self.plugins.call(smoother, "smooth", ctx=ctx)
            ctx._trace = None  # the rewrite may have changed what the trace recorded (biases, scales)
        return float_out

    def _load_layer(self, index: int) -> nn.Module:
        if self.source is None:
            return self.layers[index].to(self.device)
        layer = self.source.load_layer(index, self.device)
        if self.check_finite:
            for name, tensor in layer.state_dict(prefix=f"{self.prefix}.{index}.").items():
                if tensor.is_floating_point():
                    check_finite(tensor, name)
        return layer

    def _finish_layer(self, index: int) -> None:
        if self.source is not None:
            self.source.finish_layer(index, self.layers[index])
        elif self.recipe.runtime.offload_layers and self.device.type != "cpu":
            self.layers[index].to("cpu")

    def _run_layer(self, index: int, inputs, linear_errors: dict[str, float]):
        started = time.perf_counter()
        layer = self._load_layer(index)
        prefix = f"{self.prefix}.{index}"
        linears = layer_linears(layer, prefix)
        ctx = self._layer_context(index, prefix, layer, linears, inputs)
        self._reduced = []
        self._input_order, self._inputs_seen = {}, 0
        plans = ctx.plans
        quantized = ctx.quantized_names()

        # errors against float are measured on error_samples samples, shared among the processes
        error_samples = -(-self.recipe.runtime.error_samples // self.ranks.size)
        k = ctx.batches_covering(error_samples)
        float_out = None
        if self.algorithms.smoothers and quantized:
            float_out = self._smooth(ctx, quantized, keep=0 if self.smooth_only else k)
        if self.smooth_only:
            with self._precision():
                outs = ctx.run_layer()
            ctx.clear_state()
            return ([with_hidden(inp, out) for inp, out in zip(inputs, outs, strict=True)],
                    LayerReport(index, time.perf_counter() - started, 0.0, 0, len(linears)))

        ctx.phase = "quantize"
        for group in self._sequential_groups(ctx) if quantized else []:
            observers = self._observers(plans, group)
            if any(observers.values()):
                outs = self._observe_pass(ctx, observers, keep=k if float_out is None else 0)
                float_out = float_out if float_out is not None else outs
                self._reduce_statistics(ctx)
            elif float_out is None:
                with self._precision():
                    float_out = ctx.run_layer(inputs[:k])
            self._quantize_group(ctx, group, layer, prefix)
        if float_out is None:
            with self._precision():
                float_out = ctx.run_layer(inputs[:k])
        if self.algorithms.cache is not None:
            quantize_layer_cache(ctx, self.algorithms)

        fakes = {name: ctx.module(name) for name in quantized}
        with materialized_weights(layer), self._precision():
            with measure_linear_errors(fakes, ctx.linears, into=linear_errors, rows=error_samples):
                quant_out = ctx.run_layer(inputs[:k])
            num = sum(float((q - f).float().pow(2).sum()) for q, f in zip(quant_out, float_out, strict=True))
            den = sum(float(f.float().pow(2).sum()) for f in float_out)
            if self.ranks.several:
                num, den = distributed.all_sum([num, den], self.device)
            den = den or 1.0
            del float_out
            next_inputs = inputs  # filled in place, so only one set of hidden states is alive at a time
            for i, inp in enumerate(inputs):
                out = quant_out[i] if i < k else ctx.run_layer([inp])[0]
                if self.check_finite:
                    check_finite(out, f"output of decoder layer {prefix} after quantization")
                next_inputs[i] = with_hidden(inp, out)
            del quant_out
        ctx.clear_state()
        return next_inputs, LayerReport(index, time.perf_counter() - started, num / den, len(quantized),
                                        len(linears) - len(quantized))
