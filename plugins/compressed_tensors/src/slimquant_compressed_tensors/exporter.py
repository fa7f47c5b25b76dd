"""`compressed-tensors`: a Hugging Face model folder that transformers (`AutoModelForCausalLM.from_pretrained`)
and vLLM load: pack-quantized weight-only Linears (W4A16, W8A16, ...), int-quantized W8A8 (static or dynamic)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict
from torch import nn

from slimquant.sdk import (
    Exporter,
    FakeQuantLinear,
    Feature,
    OutputError,
    check_structure,
    float_tensors,
    hookimpl,
    kv_attention,
    model_dtype,
    reference_model,
    summarize,
    write_folder,
)
from slimquant_compressed_tensors.quant_config import quantization_config
from slimquant_compressed_tensors.schemes import spec_from_module, spec_from_plan, spec_problems, weight_problems
from slimquant_compressed_tensors.tensors import linear_tensors


class CompressedTensorsExporter(Exporter):
    name = "compressed-tensors"
    holds = frozenset({Feature.PERMUTED_GROUPS, Feature.QUANTIZED_SCALES, Feature.TWO_LEVEL_SCALES, Feature.SPARSITY})

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Literal["compressed-tensors"] = "compressed-tensors"

    def __init__(self, config: BaseModel | None = None):
        self.config = config

    @hookimpl
    def check(self, plan, name, shape):
        return spec_problems(spec_from_plan(plan), name, shape)

    @hookimpl
    def export(self, model, output_dir, options):
        fakes = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
        if not fakes:
            raise OutputError("the model holds no quantized Linear; a compressed-tensors checkpoint needs one")
        dtype = model_dtype(model)
        specs = {n: spec_from_module(m) for n, m in fakes.items()}
        reference = reference_model(model)
        problems = check_structure(model, reference, fakes, self.name)
        if kv_attention.quantizers(model):
            problems.append("the model's KV cache is quantized (kv_cache); this exporter does not write "
                            "compressed-tensors' kv_cache_scheme")
        for n, m in fakes.items():
            problems += spec_problems(specs[n], n, tuple(m.qweight.shape)) + weight_problems(n, m, dtype)
        if problems:
            raise OutputError("compressed-tensors cannot hold this model exactly: " + summarize(problems, fakes))
        tensors = float_tensors(model, reference, fakes, dtype, self.name)
        for n, m in fakes.items():
            tensors.update(linear_tensors(n, m, specs[n], dtype))
        float_linears = [n for n, m in reference.named_modules() if isinstance(m, nn.Linear) and n not in fakes]
        return write_folder(model, tensors, quantization_config(specs, float_linears), dtype, output_dir, options,
                            self.name)
