"""What a GGUF file of Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q4_K / Q6_K blocks cannot hold, from a plan (before
quantizing) or from the quantized model (at export, also for `slimquant export` of an earlier output)."""

from __future__ import annotations

import torch

from slimquant.sdk import FakeQuantLinear, Feature
from slimquant_gguf.blocks import BLOCK, block_params, quant_type
from slimquant_gguf.kblocks import k_problem, written_as_k
from slimquant_gguf.kquant_plugin import KQuantPlugin

K_GRID = KQuantPlugin.name  # the plugin whose grid gives Q4_K / Q6_K weights
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


def plan_problems(plan, name: str | None, shape: tuple[int, int] | None) -> list[str]:
    if plan.grid_algorithm == K_GRID:  # the grid's own check covers its blocks
        return [ACTIVATIONS] if plan.scheme.activations is not None else []
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


def module_problems(name: str, module: FakeQuantLinear) -> list[str]:
    qw = module.qweight
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
