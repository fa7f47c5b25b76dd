"""Quantize a safetensors checkpoint that need not fit in memory: read a decoder layer, quantize it, write it.

    report = quantize_checkpoint({"model": {"path": "llama-70b", "lazy": True}, "scheme": "W4A16",
                                  "algorithms": ["gptq"]}, "out/llama-70b-w4", samples=samples)

Peak memory is the libraries, about one decoder layer (float and quantized), the calibration hidden states, and
the embeddings while the first layer's inputs are caught. The output (format `safe_tensor`, one file or shards of
`part_file_size` GiB) is byte for byte what quantizing the whole model in memory and saving it writes.
What needs the whole model is refused up front: calibration text the model writes itself (`generate`), a bit
`budget` (it measures every Linear at once), a quantized attention cache. With `runtime.checkpoint_dir` a killed
run resumes: the finished layers are written again from the checkpoint, and the output is the same bytes.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from slimquant.config.recipe import Recipe
from slimquant.errors import RecipeError
from slimquant.export import OutputReservation, atomic_output_dir, check_save_args
from slimquant.export.streaming import StreamingSave
from slimquant.model.checks import check_finite
from slimquant.model.lazy import LazyCheckpoint
from slimquant.model.loading import load_config, resolve_device
from slimquant.plugins import AlgorithmPlan, plan_algorithms
from slimquant.runtime.checkpoint import remove_checkpoint
from slimquant.runtime.memory import return_free_memory
from slimquant.runtime.pipeline import LayerwiseQuantizer, QuantizationReport

log = logging.getLogger(__name__)

LAZY_FORMATS = ("safe_tensor",)


def check_lazy_recipe(recipe: Recipe, algorithms: AlgorithmPlan, save_type=("safe_tensor",)) -> None:
    """Everything lazy loading cannot do, refused before any work, with what to change."""
    problems = []
    if recipe.model.path is None or recipe.model.gguf_file:
        problems.append("model.path must be a folder holding a safetensors checkpoint (the embedded model and GGUF "
                        "files are read whole)")
    if recipe.calibration.source == "generate" and "calibration" in recipe.model_fields_set:
        problems.append("calibration.source 'generate' needs the whole model to write text: give text_file, jsonl, "
                        "texts or dataset")
    if recipe.budget is not None:
        problems.append("a bit budget measures every Linear of the whole model: leave out `budget`")
    if algorithms.cache is not None:
        problems.append("a quantized attention cache (kv_cache) is not written by the lazy path yet")
    for name in algorithms.transforms:
        if not algorithms.plugins.get(name).lazy:
            problems.append(f"algorithms: {name!r} is a model transform that needs the whole model in memory; lazy "
                            "loading reads one decoder layer at a time")
    formats = [save_type] if isinstance(save_type, str) else list(save_type)
    other = [f for f in formats if f not in LAZY_FORMATS]
    if other:
        problems.append(f"lazy loading writes {', '.join(LAZY_FORMATS)} only, not {', '.join(other)}: convert the "
                        "output afterwards with `slimquant export`")
    if problems:
        raise RecipeError("model.lazy cannot do what this run asks: " + "; ".join(problems))


class _LayerStream:
    """The runtime's LayerSource: layers from the checkpoint, quantized layers into the output."""

    def __init__(self, lazy: LazyCheckpoint, out: StreamingSave, check_finite: bool):
        self.lazy = lazy
        self.out = out
        self.check_finite = check_finite

    def load_outer(self, device: torch.device) -> None:
        self.lazy.load_outer(device)

    def release_outer(self) -> None:
        self.lazy.release_outer()
        return_free_memory()

    def load_layer(self, index: int, device: torch.device) -> nn.Module:
        return self.lazy.load_layer(index, device)

    def empty_layer(self, index: int) -> nn.Module:
        return self.lazy.empty_layer(index)

    def model_digest(self) -> str:
        return self.lazy.digest()

    def finish_layer(self, index: int, layer: nn.Module) -> None:
        self.out.add_module(layer, f"{self.lazy.prefix}.{index}")
        self.lazy.release_layer(index)
        return_free_memory()  # else the next layer's buffers may land beside this one's freed, unreturned heap

    def write_outer(self, before_layers: bool) -> None:
        """The float tensors outside the decoder layers that come before (or after) them in the state_dict, read
        one at a time from the checkpoint."""
        prefix = self.lazy.prefix + "."
        keys = list(self.lazy.model.state_dict(keep_vars=True))
        first = next((i for i, k in enumerate(keys) if k.startswith(prefix)), len(keys))
        part = keys[:first] if before_layers else [k for k in keys[first:] if not k.startswith(prefix)]
        stored = self.lazy.outer_state()
        tied = self.lazy.tied()
        for key in part:
            if key in tied:
                self.out.add_tied(key, tied[key])
                continue
            tensor = self.lazy.read({key: stored[key]})[key]
            if self.check_finite and tensor.is_floating_point():
                check_finite(tensor, key)
            self.out.add_tensor(key, tensor)


def quantize_checkpoint(recipe: Recipe | dict, output: str | os.PathLike, *, samples: list[torch.Tensor] | None = None,
                        part_file_size: float = 0, overwrite: bool = False, tokenizer=None,
                        config=None, reservation: OutputReservation | None = None) -> QuantizationReport:
    """Quantize the safetensors checkpoint at `recipe.model.path` layer by layer into `output` (format
    `safe_tensor`); `samples` are calibration token tensors (None: data-free, when no plugin needs data).
    `reservation`: the output's place taken up front (`OutputReservation`), else it is taken here."""
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.parse(recipe)
    algorithms = plan_algorithms(recipe)
    check_lazy_recipe(recipe, algorithms)
    check_save_args(output, LAZY_FORMATS, part_file_size, overwrite, [recipe.model.path])
    reservation = reservation or OutputReservation(output, overwrite, [recipe.model.path]).open()
    try:
        lazy = LazyCheckpoint.open(recipe.model, config if config is not None else load_config(recipe.model))
        device = resolve_device(recipe.model.device)
    except BaseException:
        reservation.abort()
        raise
    config = lazy.model.config
    with atomic_output_dir(output, overwrite, reservation) as tmp:
        out = StreamingSave(tmp, part_file_size, model_type=getattr(config, "model_type", None),
                            architectures=list(getattr(config, "architectures", None) or []) or None)
        stream = _LayerStream(lazy, out, recipe.runtime.check_finite)
        try:
            quantizer = LayerwiseQuantizer(lazy.model, recipe, device, algorithms, source=stream)
            if samples is None and quantizer.needs_data:
                raise RecipeError("this recipe needs calibration data (its plugins observe activations or smooth): "
                                  "give samples")
            stream.write_outer(before_layers=True)
            report = quantizer.run(samples)
            stream.write_outer(before_layers=False)
            out.finish()
        except BaseException:
            out.abort()
            raise
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    if report.checkpoint is not None:  # the output is saved: the resume checkpoint has done its job
        remove_checkpoint(report.checkpoint)
        report.checkpoint = None
    return report
