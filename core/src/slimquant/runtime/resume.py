"""Resume checkpoints in a run (slimquant.runtime.checkpoint): open one, put back the layers an earlier run
finished, record each layer this run finishes."""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch
from torch import nn

from slimquant.config.recipe import Recipe
from slimquant.errors import CheckpointError
from slimquant.plugins import AlgorithmPlan
from slimquant.runtime.checkpoint import Checkpoint
from slimquant.runtime.fingerprint import run_fingerprint
from slimquant.runtime.reports import LayerReport, QuantizationReport
from slimquant.runtime.sources import RuntimeSource

log = logging.getLogger(__name__)


def open_checkpoint(model: nn.Module, recipe: Recipe, algorithms: AlgorithmPlan, samples,
                    pass_dtype: torch.dtype | None, source: RuntimeSource, num_layers: int,
                    report: QuantizationReport) -> Checkpoint | None:
    """The run's checkpoint (None without `runtime.checkpoint_dir`), fresh or holding what an earlier run of the
    same model, recipe and samples finished."""
    runtime = recipe.runtime
    if runtime.checkpoint_dir is None:
        return None
    if algorithms.cache is not None:
        raise CheckpointError("resume checkpoints do not hold a quantized attention cache yet: leave out "
                              "kv_cache or runtime.checkpoint_dir")
    fingerprint = run_fingerprint(model, recipe, samples, algorithms, pass_dtype, source.model_digest())
    checkpoint = Checkpoint.start(runtime.checkpoint_dir, fingerprint, num_layers, runtime.resume)
    if not runtime.keep_checkpoint:
        report.checkpoint = checkpoint.directory
    return checkpoint


def resume(checkpoint: Checkpoint, source: RuntimeSource, report: QuantizationReport,
           num_layers: int) -> list[torch.Tensor] | None:
    """Put back the layers an earlier run finished; return the hidden states that feed the next one."""
    for index, entry in enumerate(checkpoint.finished):
        source.restore_layer(index, checkpoint)
        report.layers.append(LayerReport(**entry["report"]))
        report.linear_errors.update(entry["linear_errors"])
    report.resumed_layers = len(checkpoint.finished)
    log.info("resumed from %s: %d of %d decoder layers were finished", checkpoint.directory,
             report.resumed_layers, num_layers)
    return checkpoint.hidden()


def save_layer(checkpoint: Checkpoint, index: int, layer: nn.Module, prefix: str, hidden,
               report: QuantizationReport) -> None:
    """Record decoder layer `index` (named `prefix`.`index`) as finished, with its report and Linear errors."""
    layer_prefix = f"{prefix}.{index}."
    errors = {n: e for n, e in report.linear_errors.items() if n.startswith(layer_prefix)}
    checkpoint.save_layer(index, layer, hidden, asdict(report.layers[-1]), errors)
