"""`iq4nl`: llama.cpp's IQ4_NL as a slimquant weight grid: 16 non-uniform values, one float16 scale per block of
32 weights, written to gguf as IQ4_NL blocks (slimquant_gguf.blocks.encode_iq4nl_blocks).

- `algorithms: [iq4nl]`: every weight rounded to the nearest grid value of its block's scale; no calibration data.
- `algorithms: [iq4nl, {name: gptq, static_groups: true}]` (or `act_order: false`): GPTQ chooses the codes on the
  grid. GPTQ's default (act_order with groups chosen during the sweep) permutes the groups (g_idx), which gguf
  cannot hold: the plan is refused by the gguf format before any model is loaded.

The grid: code c (in [-8, 7]) stands for KVALUES[c + 8] * d, nibble c + 8, with ggml's int8 table KVALUES
(-127 ... 113) and d the block's float16 scale. Unlike NF4's grid, the codebook holds the integers themselves
(not normalised to [-1, 1]) and the scale is the file's d: the products KVALUES * d are exact in float32 (7 by
11 significant bits), so the fake-quantized weight is exactly what gguf-py / llama.cpp dequantize; a codebook
divided by 127 and a scale of 127 * d would differ from them in the last bit for about one weight in ten.

Scale choice (`qparams`), after llama.cpp's quantize_row_iq4_nl without an importance matrix (a simpler search
than its own): with `max` the block's weight of largest magnitude (sign kept, so d may be negative), the
candidates are d = max / (KVALUES[0] + 0.1 * i) for i in -7..7 (i = 0: the largest weight lands on -127 exactly),
each rounded to float16, and for each the least-squares scale of the codes it rounds to (sum w * v / sum v * v,
as llama.cpp refits), rounded to float16 too. Each candidate is judged by the squared error of those codes at it;
the least wins, and the block is then rounded to nearest on the winner (which can only lower its error). The
scales are float16 values already, so `quantize_scales` stores them as they are and `weights.scale_dtype` float16
does not move them. On a Gaussian 64 x 512 weight the mean squared error is 0.80 of Q4_0's (tests/test_iq4nl.py).

Scheme: `weights.bits` must be 4; `weights.symmetric` is ignored (the grid has no zero point); the block is 32
input channels: `group_size`, when given, must be 32 (strategy group), and each Linear's input channels a multiple
of 32. No activations, not per tensor.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from slimquant.sdk import CodebookGrid, Feature, Grid, WeightQuantizer, hookimpl, qrange, round_to_nearest

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml's kvalues_iq4nl
CODEBOOK = torch.tensor(KVALUES, dtype=torch.float32)
BLOCK = 32
TRIES = 7  # divisors KVALUES[0] + 0.1 * i for i in -TRIES..TRIES
STEP = 0.1
HALF_TINY = 2.0 ** -24  # the smallest float16 (subnormal): a block of zeros gets this d
HALF_MAX = 65504.0


def is_iq4nl_codebook(codebook: torch.Tensor | None) -> bool:
    """Whether a QuantizedWeight's codebook is IQ4_NL's exactly (the values the gguf block type stands for)."""
    return (codebook is not None and codebook.numel() == len(KVALUES)
            and bool(torch.equal(codebook.detach().cpu().float(), CODEBOOK)))


class IQ4NLGrid(CodebookGrid):
    """IQ4_NL's 16 values (ggml's integers; code c stands for KVALUES[c + 8] * scale) with float16 block scales
    chosen by the search of the module docstring; groups of 32."""

    def __init__(self):
        super().__init__(CODEBOOK / -CODEBOOK[0], name="iq4_nl")  # the base class checks the normalised values
        self.codebook = CODEBOOK.clone()  # ... but the grid's values are the file's integers, so scale = d
        self.midpoints = (self.codebook[1:] + self.codebook[:-1]) / 2
        self.cells = None  # the base class's lookup table spans [-1, 1]; quantize bucketizes on the midpoints

    def group_size(self, args) -> int:
        return BLOCK

    def qparams(self, w, group_size, g_idx=None, clip_ratio=1.0):
        w = w.float()
        rows, cols = w.shape
        if g_idx is not None:  # groups over permuted columns: gather each group's columns together
            order = torch.argsort(g_idx.long(), stable=True)
            counts = torch.bincount(g_idx.long())
            size = int(counts[0]) if len(counts) else cols
            if not bool((counts == size).all()):
                raise ValueError("iq4_nl: groups of unequal size")
            w = w[:, order]
        else:
            size = cols if group_size is None else min(group_size, cols)
        if cols % size:
            raise ValueError(f"iq4_nl: {cols} input channels are not whole groups of {size}")
        blocks = w.reshape(rows, cols // size, size)
        return best_scales(blocks, self.codebook.to(w.device), self.midpoints.to(w.device), clip_ratio), None

    def quantize_scales(self, scale):
        return None  # qparams chose float16 values: stored as they are

    def quantize(self, w, scale, zero):
        x = torch.nan_to_num(w / scale, nan=0.0)
        return torch.bucketize(x.contiguous(), self.midpoints.to(w.device)).to(w.dtype).add_(qrange(self.bits)[0])


def _half(d: torch.Tensor) -> torch.Tensor:
    """d rounded to float16, kept away from 0 (at least the smallest subnormal) and inf, sign kept."""
    d = d.clamp(-HALF_MAX, HALF_MAX).half().float()
    tiny = d.abs() < HALF_TINY
    return torch.where(tiny, torch.where(d < 0, -HALF_TINY, HALF_TINY), d)


def best_scales(blocks: torch.Tensor, values: torch.Tensor, midpoints: torch.Tensor,
                clip_ratio: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Float16-valued d [rows, groups] of blocks [rows, groups, size]: of the candidates of the module docstring,
    the one of least squared error. One rounding per divisor: the codes v it gives are judged at that d and at
    their least-squares d (error sum (w - d * v)^2 = sum w^2 - 2 d sum w v + d^2 sum v^2, in float64); the codes
    finally chosen are rounded to nearest on the winning d, which can only lower its error further."""
    blocks = torch.nan_to_num(blocks.float(), nan=0.0).contiguous()
    index = blocks.abs().argmax(-1, keepdim=True)
    peak = blocks.gather(-1, index).squeeze(-1) * clip_ratio  # the weight of largest magnitude, signed
    ww = blocks.double().pow(2).sum(-1)
    x = torch.empty_like(blocks)
    best_d = best_err = None
    for i in range(-TRIES, TRIES + 1):
        d = _half(peak / (float(values[0]) + STEP * i))
        torch.div(blocks, d.unsqueeze(-1), out=x)
        v = values.take(torch.bucketize(x, midpoints))
        vw, vv = (v * blocks).sum(-1).double(), v.pow(2).sum(-1).double()
        for candidate in (d, _half((vw / vv).float())):
            c = candidate.double()
            err = ww - 2 * c * vw + c * c * vv
            if best_d is None:
                best_d, best_err = candidate, err
            else:
                better = err < best_err
                best_d, best_err = torch.where(better, candidate, best_d), torch.where(better, err, best_err)
    return best_d


class IQ4NLConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["iq4nl"] = "iq4nl"


class IQ4NLPlugin(Grid, WeightQuantizer):
    name = "iq4nl"
    Config = IQ4NLConfig
    requires_calibration_data = False

    def __init__(self, config: IQ4NLConfig | None = None):
        self.config = config or IQ4NLConfig()

    def output_features(self, plan) -> dict:
        return {Feature.CODEBOOK: "codebook: iq4_nl"}

    @hookimpl
    def check(self, plan, name, shape):
        if plan.grid_algorithm != self.name:
            return None
        weights, problems = plan.scheme.weights, []
        if weights.bits != 4:
            problems.append(f"weights.bits: IQ4_NL is a 4-bit codebook; set bits: 4 (got {weights.bits})")
        if weights.strategy == "tensor":
            problems.append("weights.strategy: iq4nl scales per block of 32, not per tensor")
        elif "strategy" in weights.model_fields_set or weights.group_size is not None:
            if weights.strategy != "group" or weights.group_size != BLOCK:
                got = f"group_size {weights.group_size}" if weights.strategy == "group" else \
                    f"strategy {weights.strategy}"
                problems.append(f"weights.group_size: IQ4_NL has blocks of {BLOCK}; set group_size: {BLOCK} or leave "
                                f"it out (got {got})")
        if plan.scheme.activations is not None:
            problems.append("activations: iq4nl quantizes weights only; use a weight-only scheme")
        if shape is not None and shape[1] % BLOCK:
            problems.append(f"weights: {name} has {shape[1]} input channels, not whole {BLOCK}-weight IQ4_NL blocks")
        return problems

    @hookimpl
    def weight_grid(self, args):
        return IQ4NLGrid()

    @hookimpl
    def quantize_weight(self, ctx, name, module, args):
        return round_to_nearest(module.weight, args, grid=ctx.grid(name) or self.weight_grid(args))
