"""What a GPTQ checkpoint cannot hold, from a plan (before quantizing) or from the quantized model (at export, also
for `slimquant export` of an earlier output)."""

from __future__ import annotations

import torch
from torch import nn

from slimquant.sdk import FakeQuantLinear, find_decoder_layers
from slimquant_gptq_export.packing import unsigned_zero

BITS = (2, 4, 8)  # 32 // bits codes to a word; 3-bit's word-straddling packing is not written


def weight_problems(bits: int, has_act: bool, name: str | None, shape: tuple[int, int] | None) -> list[str]:
    problems = []
    if bits not in BITS:
        problems.append(f"weights.bits: GPTQ checkpoints are written here for {', '.join(map(str, BITS))}-bit "
                        f"weights, not {bits}-bit")
    elif shape is not None:
        per_word = 32 // bits
        for side, size in (("output", shape[0]), ("input", shape[1])):
            if size % per_word:
                problems.append(f"weights: {name} has {size} {side} channels, not a multiple of the {per_word} "
                                f"{bits}-bit codes an int32 word of qweight / qzeros holds")
    if has_act:
        problems.append("activations: GPTQ checkpoints are weight-only (W4A16, W8A16); use compressed-tensors for "
                        "quantized activations")
    return problems


def plan_problems(plan, name: str | None, shape: tuple[int, int] | None) -> list[str]:
    w = plan.scheme.weights
    problems = weight_problems(w.bits, plan.scheme.activations is not None, name, shape)
    if w.scale_dtype != "float16":
        problems.append("weights.scale_dtype: GPTQ checkpoints store float16 scales; set scale_dtype: float16 so "
                        "that the quantized model uses exactly the scales the file holds")
    return problems


def _exact_half(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.half().float(), t.float())) and bool(torch.isfinite(t.half()).all())


def module_problems(name: str, module: FakeQuantLinear, v2: bool) -> list[str]:
    qw = module.qweight
    problems = weight_problems(qw.bits, module.act is not None, name, tuple(qw.shape))
    if problems:
        return problems
    if not _exact_half(qw.scale):
        problems.append(f"{name}: weight scales are not exactly float16 (GPTQ's scales); quantize with weights."
                        "scale_dtype: float16")
    if not v2:
        zero = unsigned_zero(qw.zero, qw.bits, tuple(qw.scale.shape))
        if bool((zero == 0).any()):
            problems.append(f"{name}: a zero point of 0 cannot be stored in checkpoint format gptq (v1 stores "
                            "zero - 1); save as gptq-v2, or quantize symmetrically")
    return problems


def structure_problems(reference: nn.Module, fakes: dict[str, FakeQuantLinear]) -> list[str]:
    """transformers (optimum / GPTQModel) replaces every nn.Linear of the decoder layers with one config: each
    must be quantized, and all alike."""
    prefix, _ = find_decoder_layers(reference)
    problems = [f"{n}: left in float, but a GPTQ checkpoint quantizes every Linear of the decoder layers"
                for n, m in reference.named_modules()
                if isinstance(m, nn.Linear) and n.startswith(prefix + ".") and n not in fakes]
    problems += [f"{n}: quantized outside the decoder layers ({prefix}); a GPTQ checkpoint cannot hold it"
                 for n in fakes if not n.startswith(prefix + ".")]
    kinds = {(m.qweight.bits, m.qweight.group_size, m.qweight.symmetric) for m in fakes.values()}
    if len(kinds) > 1:
        problems.append("the Linears use different schemes (bits, group_size, symmetric: "
                        f"{sorted(kinds, key=str)}); a GPTQ checkpoint has one; use compressed-tensors for mixed "
                        "precision")
    return problems
