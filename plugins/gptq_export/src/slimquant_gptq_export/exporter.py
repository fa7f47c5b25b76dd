"""`gptq` and `gptq-v2`: a Hugging Face model folder in the GPTQ checkpoint layout (qweight / qzeros / scales / g_idx)
that transformers (with optimum and GPTQModel), vLLM and GPTQModel load. The two differ only in qzeros: `gptq`
(checkpoint_format gptq, AutoGPTQ's v1) stores zero - 1, `gptq-v2` stores the zero point itself."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from slimquant.sdk import (
    SLIMQUANT_VERSION,
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
from slimquant_gptq_export.checks import module_problems, plan_problems, structure_problems
from slimquant_gptq_export.packing import qweight, qzeros, unsigned_zero


def linear_tensors(name: str, module: FakeQuantLinear, v2: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    qw = module.qweight
    zero = unsigned_zero(None if qw.zero is None else qw.zero.detach().cpu(), qw.bits, tuple(qw.scale.shape))
    out = {
        "qweight": qweight(qw.codes.detach().cpu(), qw.bits),
        "qzeros": qzeros(zero, qw.bits, v2),
        "scales": qw.scale.detach().cpu().t().to(torch.float16),
        "g_idx": qw.group_index().detach().cpu().to(torch.int32),
    }
    if module.bias is not None:
        out["bias"] = module.bias.detach().cpu().to(dtype)
    return {f"{name}.{key}": t.contiguous() for key, t in out.items()}


def quantization_config(fakes: dict[str, FakeQuantLinear], checkpoint_format: str) -> dict:
    qw = next(iter(fakes.values())).qweight
    return {
        "quant_method": "gptq",
        "checkpoint_format": checkpoint_format,
        "bits": qw.bits,
        "group_size": qw.group_size or -1,
        "desc_act": any(m.qweight.permuted_groups for m in fakes.values()),
        "sym": qw.symmetric,
        "lm_head": False,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"slimquant:{SLIMQUANT_VERSION}"]},
    }


class GPTQExporter(Exporter):
    name = "gptq"
    scale_dtype = "float16"
    holds = frozenset({Feature.PERMUTED_GROUPS, Feature.QUANTIZED_SCALES, Feature.SPARSITY})  # desc_act's g_idx
    checkpoint_format = "gptq"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Literal["gptq"] = "gptq"

    def __init__(self, config: BaseModel | None = None):
        self.config = config

    @property
    def v2(self) -> bool:
        return self.checkpoint_format == "gptq_v2"

    @hookimpl
    def check(self, plan, name, shape):
        return plan_problems(plan, name, shape)

    @hookimpl
    def export(self, model, output_dir, options):
        fakes = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
        if not fakes:
            raise OutputError(f"the model holds no quantized Linear; a {self.name} checkpoint needs them")
        reference = reference_model(model)
        problems = structure_problems(reference, fakes) + check_structure(model, reference, fakes, self.name)
        if kv_attention.quantizers(model):
            problems.append("the model's KV cache is quantized (kv_cache); a GPTQ checkpoint has no place for its "
                            "scales")
        for n, m in fakes.items():
            problems += module_problems(n, m, self.v2)
        if problems:
            raise OutputError(f"{self.name} cannot hold this model exactly: " + summarize(problems, fakes))
        dtype = model_dtype(model)
        tensors = float_tensors(model, reference, fakes, dtype, self.name)
        for n, m in fakes.items():
            tensors.update(linear_tensors(n, m, self.v2, dtype))
        return write_folder(model, tensors, quantization_config(fakes, self.checkpoint_format), dtype, output_dir,
                            options, self.name)


class GPTQv2Exporter(GPTQExporter):
    name = "gptq-v2"
    checkpoint_format = "gptq_v2"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Literal["gptq-v2"] = "gptq-v2"
