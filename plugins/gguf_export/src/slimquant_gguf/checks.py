"""What a GGUF file of Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q4_K / Q6_K / IQ4_NL blocks cannot hold, from a plan (before
quantizing) or from the quantized model (at export, also for `slimquant export` of an earlier output).

Codebooks: the format declares it holds them (Feature.CODEBOOK) because IQ4_NL's blocks are codebook values; every
other codebook (NF4, FP4, ...) is refused here, by plan (the grid providing it is not iq4nl) and by module (its
values are not IQ4_NL's exactly)."""

from __future__ import annotations

import torch

from slimquant.sdk import FakeQuantLinear, Feature
from slimquant_gguf.blocks import BLOCK, block_params, quant_type, written_as_iq4nl
from slimquant_gguf.iq4nl import IQ4NLPlugin
from slimquant_gguf.kblocks import k_problem, written_as_k
from slimquant_gguf.kquant_plugin import KQuantPlugin

K_GRID = KQuantPlugin.name  # the plugin whose grid gives Q4_K / Q6_K weights
IQ4NL_GRID = IQ4NLPlugin.name  # the plugin whose grid gives IQ4_NL weights
CODEBOOK = (f"this format cannot hold {Feature.CODEBOOK.meaning} ({Feature.CODEBOOK.value})")
ACTIVATIONS = ("activations: gguf stores weights only (llama.cpp quantizes activations itself); use a weight-only "
               "scheme")


def weight_problems(bits: int, symmetric: bool, group_size: int | None, has_act: bool, name: str | None,
                    shape: tuple[int, int] | None) -> list[str]:
    problems = []
    if quant_type(bits, symmetric) is None:
        problems.append(f"weights.bits: gguf holds 4- and 5-bit (Q4_0 / Q5_0 symmetric, Q4_1 / Q5_1 asymmetric) and "
                        f"symmetric 8-bit (Q8_0) weights, not {'symmetric' if symmetric else 'asymmetric'} {bits}-bit "
                        f"(Q4_K and Q6_K come from the {K_GRID} grid: algorithms: [{K_GRID}, ...])")
    if group_size is not None and (group_size < BLOCK or group_size % BLOCK):
        problems.append(f"weights.group_size: gguf blocks hold {BLOCK} weights with one scale; group_size "
                        f"{group_size} is not a multiple of {BLOCK}")
    if shape is not None and shape[1] % BLOCK:
        problems.append(f"weights: {name} has {shape[1]} input channels, not a multiple of the {BLOCK}-weight "
                        "gguf block")
    if has_act:
        problems.append(ACTIVATIONS)
    return problems


def codebook_problems(plan) -> list[str]:
    """A codebook not IQ4_NL's: named from the setting its producer declares ("codebook: nf4")."""
    if not plan.has(Feature.CODEBOOK):
        return []
    producer, setting = plan.feature_map()[Feature.CODEBOOK]
    if producer == IQ4NL_GRID and plan.grid_algorithm == IQ4NL_GRID:
        return []
    codebook = setting.removeprefix("codebook:").strip() if setting.startswith("codebook:") else producer
    return [f"{CODEBOOK}, which {producer} produces" + (f" ({setting})" if setting else "")
            + f": {codebook} has no gguf block type; IQ4_NL's does (algorithms: [{IQ4NL_GRID}, ...])"]


def plan_problems(plan, name: str | None, shape: tuple[int, int] | None) -> list[str]:
    codebook = codebook_problems(plan)
    if plan.grid_algorithm in (K_GRID, IQ4NL_GRID) or codebook:  # the grid's own check covers its blocks
        return codebook + ([ACTIVATIONS] if plan.scheme.activations is not None else [])
    w = plan.scheme.weights
    group = w.group_size if w.strategy == "group" else None
    problems = weight_problems(w.bits, w.symmetric, group, plan.scheme.activations is not None, name, shape)
    if plan.has(Feature.FRACTIONAL_ZEROS):
        producer, setting = plan.feature_map()[Feature.FRACTIONAL_ZEROS]
        problems.append(f"{producer}: makes fractional zero points ({setting}), which Q4_1 / Q5_1 blocks cannot hold "
                        f"(only the {K_GRID} grid's K types can)")
    if w.scale_dtype != "float16":
        problems.append("weights.scale_dtype: gguf stores float16 scales; set scale_dtype: float16 so that the "
                        "quantized model uses exactly the scales the file holds")
    return problems


def _exact_half(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.half().float(), t)) and bool(torch.isfinite(t.half()).all())


def iq4nl_problems(name: str, module: FakeQuantLinear) -> list[str]:
    """What IQ4_NL blocks cannot hold of a weight on IQ4_NL's codebook."""
    qw, problems = module.qweight, []
    if module.act is not None:
        problems.append(ACTIVATIONS)
    if qw.group_size != BLOCK or qw.g_idx is not None or qw.shape[1] % BLOCK:
        problems.append(f"{name}: IQ4_NL blocks hold {BLOCK} consecutive weights with one scale; the weight has "
                        f"groups of {qw.group_size or 'a whole row'}{' (permuted)' if qw.g_idx is not None else ''} "
                        f"over {qw.shape[1]} input channels")
    elif not _exact_half(block_params(qw)[0]):
        problems.append(f"{name}: IQ4_NL scales are not exactly float16 (gguf's d)")
    if qw.scale_quant is not None:
        problems.append(f"{name}: IQ4_NL stores float16 scales, not quantized ones")
    if qw.sparsity is not None:
        problems.append(f"{name}: pruned weights: IQ4_NL's codebook has no 0")
    return problems


def module_problems(name: str, module: FakeQuantLinear) -> list[str]:
    qw = module.qweight
    if qw.codebook is not None:
        if written_as_iq4nl(qw):
            return iq4nl_problems(name, module)
        what = f"{qw.codebook_name} " if qw.codebook_name else ""
        return [f"{CODEBOOK}: {name} (its {what}codebook is not IQ4_NL's, the one codebook gguf has a block type for)"]
    if written_as_k(qw):
        why = k_problem(qw)
        return ([ACTIVATIONS] if module.act is not None else []) + ([f"{name}: {why}"] if why else [])
    problems = weight_problems(qw.bits, qw.symmetric, qw.group_size, module.act is not None, name, tuple(qw.shape))
    if problems:
        return problems
    if qw.zero is not None and not torch.equal(qw.zero, torch.round(qw.zero)):
        return [f"{name}: fractional zero points cannot be stored in Q4_1 / Q5_1 blocks exactly"]
    d, m = block_params(qw)
    if not _exact_half(d):
        problems.append(f"{name}: weight scales are not exactly float16 (gguf's d); quantize with weights."
                        "scale_dtype: float16")
    if m is not None and not _exact_half(m):
        problems.append(f"{name}: -scale * (zero + 2^(bits-1)) is not exactly float16 (Q4_1 / Q5_1's m); quantize "
                        "with weights.scale_dtype: float16")
    return problems
