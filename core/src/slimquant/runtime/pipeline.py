"""The layer-by-layer runtime: catch layer-0 inputs, then per decoder layer observe -> smooth -> observe ->
quantize weights -> quantize activations -> swap in fake-quant Linears -> feed the next layer.

When no plugin of the run needs calibration data (round-to-nearest, HQQ, NF4), the data-free path quantizes every
Linear straight from its weight: no sample is read or run.

`LayerwiseQuantizer` composes the parts: where layers come from (`sources`), the per-layer engine (`engine`), the
work of several processes (`parallelism`), resume checkpoints (`resume`) and what is reported (`reports`).
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from slimquant.config.recipe import Recipe
from slimquant.errors import CalibrationError
from slimquant.model.checks import check_finite, check_samples
from slimquant.model.structure import layer_linears
from slimquant.plugins import AlgorithmPlan, plan_algorithms
from slimquant.runtime import distributed, kv_attention
from slimquant.runtime.cache_pass import quantize_layer_cache
from slimquant.runtime.catcher import catch_layer_inputs
from slimquant.runtime.context import hidden_of_input, with_hidden
from slimquant.runtime.engine import LayerEngine
from slimquant.runtime.fingerprint import job_parts, model_parts, samples_parts
from slimquant.runtime.model_context import ModelContext, run_transforms
from slimquant.runtime.parallelism import Parallelism, check_distributed, check_reducible_state, statistics_checked
from slimquant.runtime.precision import resolve_calibration_dtype
from slimquant.runtime.preflight import plan_model
from slimquant.runtime.reports import LayerReport, QuantizationReport
from slimquant.runtime.resume import open_checkpoint, resume, save_layer
from slimquant.runtime.sources import LayerSource, layer_source

__all__ = ["LayerReport", "LayerSource", "LayerwiseQuantizer", "QuantizationReport", "check_reducible_state",
           "statistics_checked"]

log = logging.getLogger(__name__)


def _float_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


class LayerwiseQuantizer:
    def __init__(self, model: nn.Module, recipe: Recipe, device: torch.device,
                 algorithms: AlgorithmPlan | None = None, smooth_only: bool = False,
                 source: LayerSource | None = None):
        self.model = model
        self.smooth_only = smooth_only  # run the smoothers, leave every Linear in float
        self.recipe = recipe
        self.device = device
        self.algorithms = algorithms or plan_algorithms(recipe)
        self.plugins = self.algorithms.plugins
        self.ranks = distributed.current()
        if self.ranks.several:  # refused alike on every process, then compared before any work
            check_distributed(self.ranks, recipe, self.algorithms, lazy=source is not None)
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
        self.source = layer_source(model, self.layers, self.prefix, device, recipe.runtime.offload_layers,
                                   self.check_finite, source)
        self.parallel = Parallelism(self.ranks, self.plugins, self.plans, device)
        self.engine = LayerEngine(self.algorithms, self.plans, device, self.pass_dtype, recipe.runtime, self.parallel,
                                  self.source, self.prefix, smooth_only)
        if self.check_finite:  # every tensor that will be saved, not only those calibration reaches
            for name, tensor in model.state_dict().items():
                if tensor.is_floating_point() and not tensor.is_meta:  # a source's layers are checked when read
                    check_finite(tensor, name)

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
        report = QuantizationReport(plans=dict(self.plans), transforms=self._transform(samples))
        if self.pass_dtype is not None:
            report.calibration_dtype = str(self.pass_dtype).removeprefix("torch.")
        start = time.perf_counter()
        checkpoint = self._open_checkpoint(samples, report)
        inputs = self._catch(samples)
        if checkpoint is not None and checkpoint.finished:
            inputs = [with_hidden(inp, h.to(hidden_of_input(inp).device))
                      for inp, h in zip(inputs, resume(checkpoint, self.source, report, len(self.layers)),
                                        strict=True)]
        progress = self.recipe.runtime.progress
        for index in tqdm(range(len(report.layers), len(self.layers)), desc="layers", disable=not progress,
                          leave=False):
            inputs, layer_report = self.engine.run_layer(index, inputs, report.linear_errors)
            report.layers.append(layer_report)
            if checkpoint is not None:
                save_layer(checkpoint, index, self.layers[index], self.prefix, [hidden_of_input(i) for i in inputs],
                           report)
            self.source.finish_layer(index, self.layers[index])
            log.info("layer %d/%d: %.2fs, output error %.3e, %d quantized, %d float", index + 1,
                     len(self.layers), layer_report.seconds, layer_report.output_rel_error,
                     layer_report.quantized, layer_report.kept_float)
        report.seconds = time.perf_counter() - start
        return report

    def _run_data_free(self) -> QuantizationReport:
        """Every Linear quantized from its weight alone, layer by layer on the work device; nothing is run."""
        report = QuantizationReport(plans=dict(self.plans), data_free=True, transforms=self._transform(None))
        start = time.perf_counter()
        checkpoint = self._open_checkpoint(None, report)
        if checkpoint is not None and checkpoint.finished:
            resume(checkpoint, self.source, report, len(self.layers))
        engine = self.engine
        for index in tqdm(range(len(report.layers), len(self.layers)), desc="layers",
                          disable=not self.recipe.runtime.progress, leave=False):
            started = time.perf_counter()
            layer = self.source.load_layer(index, self.device)
            prefix = f"{self.prefix}.{index}"
            linears = layer_linears(layer, prefix)
            quantized = [n for n in linears if self.plans.get(n) is not None]
            ctx = engine.layer_context(index, prefix, layer, linears, [])
            ctx.phase = "quantize"
            for name in quantized:
                engine.quantize_linear(ctx, name, self.plans[name], linears[name], layer, prefix)
            if self.algorithms.cache is not None:  # dynamic only: a static cache needs data
                quantize_layer_cache(ctx, self.algorithms)
            report.layers.append(LayerReport(index, time.perf_counter() - started, 0.0, len(quantized),
                                             len(linears) - len(quantized)))
            if checkpoint is not None:
                save_layer(checkpoint, index, self.layers[index], self.prefix, None, report)
            self.source.finish_layer(index, self.layers[index])
        report.seconds = time.perf_counter() - start
        return report

    def _transform(self, samples) -> list[str]:
        """Run the recipe's model transforms on the whole model, before any layer is touched; what they did."""
        if not self.algorithms.transforms:
            return []
        calibrated = frozenset(p.weight_algorithm for p in self.plans.values() if p is not None
                               and self.plugins.get(p.weight_algorithm).requires_calibration_data)
        ctx = ModelContext(self.model, self.prefix, self.layers, dict(self.plans), self.device, samples, calibrated)
        notes = run_transforms(ctx, self.plugins, self.algorithms.transforms)
        for note in notes:
            log.info("transform %s", note)
        return notes

    def _open_checkpoint(self, samples, report: QuantizationReport):
        return open_checkpoint(self.model, self.recipe, self.algorithms, samples, self.pass_dtype, self.source,
                               len(self.layers), report)

    def _catch(self, samples):
        """The first decoder layer's inputs per calibration batch, with what runs before it on the work device."""
        self.source.load_outer(self.device)
        try:
            return catch_layer_inputs(self.model, self.layers, samples, self.device, self.recipe.runtime.progress,
                                      self.recipe.runtime.batch_tokens)
        finally:
            self.source.release_outer()
