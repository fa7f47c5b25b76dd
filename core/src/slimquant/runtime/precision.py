"""The precision the calibration passes compute in (`runtime.calibration_dtype`).

The runtime's own passes over a decoder layer (observation, smoothing observation, the quantized pass that feeds
the next layer) may run under autocast in bfloat16 or float16 while the weights, the hidden states between layers
and every statistic stay in the model's dtype: matmuls and attention take the half-precision inputs, observers see
half-precision Linear inputs and accumulate them in float32 (a Hessian is exact for the rounded inputs). The
quantized weights are computed from the float weights, and the fake-quantized model runs in its own dtype
afterwards; only what calibration measures goes through the rounding.

`auto` picks bfloat16 where that is both fast and safe: a float32 model, a device with native bfloat16 matmuls
(CUDA with bf16, an NPU, a CPU with AVX512-BF16 or AMX), and a weight-only recipe (activation ranges and attention
cache scales are observed in the model's dtype, since a rounded range moves every code of a tensor). Elsewhere
`auto` is the model's dtype, which is also what `model` always means.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def native_bfloat16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "npu":
        return True
    if device.type == "cpu":
        return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return False


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:  # torch has no public query for these; Linux lists them in /proc/cpuinfo (elsewhere: model dtype)
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def resolve_calibration_dtype(setting: str, model_dtype: torch.dtype, device: torch.device,
                              weight_only: bool) -> torch.dtype | None:
    """The autocast dtype of the calibration passes, None for the model's own dtype."""
    if setting in HALF_DTYPES:
        dtype = HALF_DTYPES[setting]
        return None if dtype == model_dtype else dtype
    if setting == "auto" and model_dtype == torch.float32 and weight_only and native_bfloat16(device):
        return torch.bfloat16
    return None


def calibration_precision(dtype: torch.dtype | None, device: torch.device):
    """A context in which the layer runs in `dtype` (autocast); a no-op for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def full_precision(device: torch.device):
    """Autocast off for the block: what plugin hooks run in."""
    return torch.autocast(device.type, enabled=False)
