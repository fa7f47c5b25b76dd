"""Weight grids: the values a weight's codes may stand for, and how each group's scale is chosen on them.

A weight algorithm chooses codes; the grid says what a code means. `WeightGrid` is the uniform integer grid every
algorithm uses by default ((code - zero) * scale, min-max scales). A plugin's `weight_grid` hook may hand the
runtime another one (`CodebookGrid`: NF4's 16 values, absmax scales), which the plan's weight algorithm then
rounds onto (`ctx.grid(name)`; see slimquant.hookspecs). A grid decides:

- `group_size`: the input channels per scale for a scheme's WeightArgs (the scheme's, unless the grid has a default
  block, e.g. NF4's 64 when the scheme names no group);
- `qparams`: the scale (and zero point) of each (row, group), from the weights of the group;
- `quantize_scales`: how the scales are stored, when not as float32 (e.g. double-quantized to 8 bits); it sees the
  whole [out, groups] tensor, since such a rounding may span groups;
- `quantize` / `dequantize`: codes of weights for given per-weight scales, and back.

`round_to_nearest` is what a data-free algorithm does with a grid; GPTQ uses the pieces column by column.
"""

from __future__ import annotations

import torch

from slimquant.quant.math import (
    EPS,
    contiguous_group_minmax,
    dequantize,
    group_minmax,
    per_group,
    quantize,
    weight_qparams,
)
from slimquant.quant.qweight import QuantizedScale, QuantizedWeight, num_groups, qrange


class WeightGrid:
    """The uniform integer grid: b-bit codes, min-max scale and (asymmetric) integer zero point per group; the base
    class of every grid a plugin's ``weight_grid`` hook returns (subclass it and override what differs).

    Conventions, shared with ``QuantizedWeight``: codes are signed, in ``qrange(bits)`` = [-2^(bits-1),
    2^(bits-1) - 1], whether the grid is symmetric or not; a code stands for ``(code - zero) * scale`` (no zero when
    symmetric), or ``codebook[code + 2^(bits-1)] * scale`` when ``codebook`` is set. Scales and zeros are
    ``[rows, groups]`` (groups of ``effective_group_size(group_size, in_features)`` input channels, see
    ``num_groups``); the uniform grid's zero point is an integer-valued float inside the code range.

    Attributes: ``bits``, ``symmetric`` (no zero point), ``signed`` (symmetric scales keep the sign of the range's
    larger endpoint: ``weight_range_to_qparams``), ``codebook`` (None here; a float32 [2^bits] tensor on a codebook
    grid).

    What the weight algorithms call, and when (``round_to_nearest`` and ``search_clip_ratio`` of the math API,
    minmax, gptq, awq):

    - ``group_size(args)``: per Linear, the input channels per scale for its ``WeightArgs``; the algorithms
      use it instead of ``args.group_size``;
    - ``qparams(w, group_size, g_idx, clip_ratio)``: the scales (and zeros) of a 2-D float32 weight, per row and
      group; for the whole weight (round to nearest, once per candidate of a clip search) or, in GPTQ's sweep, once
      per group for that group's columns as the sweep has updated them (``group_size`` None: one scale per row);
    - ``quantize_scales(scale)``: once all of a weight's ``[rows, groups]`` scales are known, how they are stored
      (an object with ``dequantize()``, e.g. a ``QuantizedScale``), or None for float32. Round to nearest then
      rounds against what the stored scales dequantize to; GPTQ's sweep, which chooses scales group by group,
      stores them after the sweep and keeps its codes;
    - ``quantize(w, scale, zero)`` / ``dequantize(codes, scale, zero)``: codes (float, integer-valued) of weights
      for per-weight scales and zeros broadcast to them, and back; GPTQ calls both once per column;
    - ``quantized_weight(codes, scale, zero, group_size, g_idx, scale_quant)``: the ``QuantizedWeight`` of the
      result, carrying the grid's ``codebook`` (the runtime refuses a result whose codebook is not the grid's);
    - ``round_to_nearest(w, group_size, clip_ratio)``: all of the above for a data-free algorithm.
    """

    codebook: torch.Tensor | None = None

    def __init__(self, bits: int, symmetric: bool, signed: bool = True):
        self.bits = bits
        self.symmetric = symmetric
        self.signed = signed  # symmetric scales: see slimquant.quant.math.weight_range_to_qparams

    def group_size(self, args) -> int | None:
        """Input channels per scale for these WeightArgs (None: one scale per output channel)."""
        return args.group_size if args.strategy == "group" else None

    def qparams(self, w: torch.Tensor, group_size: int | None, g_idx: torch.Tensor | None = None,
                clip_ratio: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale and zero point [rows, groups] of the 2-D weight `w`, each group's range shrunk by `clip_ratio`."""
        return weight_qparams(w, self.bits, self.symmetric, group_size, g_idx, clip_ratio, self.signed)

    def quantize_scales(self, scale: torch.Tensor) -> QuantizedScale | None:
        """How the [rows, groups] scales are stored when not as float32; None: as they are."""
        return None

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """Codes (float, integer-valued, in the signed b-bit range) of `w` for per-weight `scale` and `zero`."""
        return quantize(w, scale, zero, self.bits)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """What codes stand for, for per-weight `scale` and `zero`: (codes - zero) * scale."""
        return dequantize(codes, scale, zero)

    def quantized_weight(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                         group_size: int | None, g_idx: torch.Tensor | None = None,
                         scale_quant: QuantizedScale | None = None) -> QuantizedWeight:
        """The QuantizedWeight of codes chosen on this grid, with its codebook (and name) when it has one."""
        return QuantizedWeight(codes=codes.to(torch.int8), scale=scale.float(),
                               zero=None if zero is None else zero.float(), bits=self.bits, group_size=group_size,
                               g_idx=g_idx, codebook=None if self.codebook is None else self.codebook.clone(),
                               scale_quant=scale_quant,
                               codebook_name=None if self.codebook is None else getattr(self, "name", None))

    def round_to_nearest(self, w: torch.Tensor, group_size: int | None,
                         clip_ratio: torch.Tensor | float = 1.0) -> QuantizedWeight:
        """Scales chosen by the grid (and stored as it says), then every weight rounded to its nearest grid value."""
        w = w.detach().float()
        scale, zero = self.qparams(w, group_size, clip_ratio=clip_ratio)
        stored = self.quantize_scales(scale)
        if stored is not None:
            scale = stored.dequantize()
        codes = per_group(self.quantize, w, scale, zero, group_size)
        return self.quantized_weight(codes, scale, zero, group_size, scale_quant=stored)


class CodebookGrid(WeightGrid):
    """A non-uniform grid of 2^bits values in [-1, 1] (sorted, max |value| 1): code c stands for
    values[c + 2^(bits-1)] * scale, the scale of a group is its absolute maximum, and a weight rounds to the nearest
    value (a weight exactly half-way between two rounds to the smaller one). `midpoints` and `cells` (the lookup
    table, when the midpoints allow one) are what a compiled kernel needs to give the same codes.

    ``CodebookGrid(values, name)``: ``codebook`` holds the values, ``name`` is written to the output's description
    as the codebook's name (``"nf4"``). It is symmetric (``qparams`` returns no zero point) and overrides
    ``qparams``, ``quantize`` and ``dequantize``; ``group_size`` and ``quantize_scales`` are WeightGrid's, for a
    subclass to override (NF4's default block of 64, its double-quantized scales)."""

    def __init__(self, values: torch.Tensor, name: str = "codebook"):
        values = torch.as_tensor(values, dtype=torch.float32)
        bits = len(values).bit_length() - 1
        if len(values) != 2 ** bits or bits < 1:
            raise ValueError(f"a codebook has 2^bits values, got {len(values)}")
        if not bool((values[1:] >= values[:-1]).all()) or float(values.abs().max()) != 1.0:
            raise ValueError("codebook values must be sorted and span at most [-1, 1] with max |value| 1")
        super().__init__(bits, symmetric=True)
        self.name = name
        self.codebook = values
        self.midpoints = (values[1:] + values[:-1]) / 2  # a weight rounds up past each
        self.cells = MidpointCells.build(self.midpoints)  # None: midpoints too close for a table

    def qparams(self, w, group_size, g_idx=None, clip_ratio=1.0):
        w = w.float()
        if g_idx is None:
            xmin, xmax = contiguous_group_minmax(w, group_size)
        else:
            xmin, xmax = group_minmax(w, g_idx, num_groups(w.shape[1], group_size))
        absmax = torch.maximum(xmin.abs(), xmax.abs()) * clip_ratio
        return absmax.clamp_min(EPS), None

    def quantize(self, w, scale, zero):
        low = qrange(self.bits)[0]
        if self.cells is None:
            x = torch.nan_to_num(w / scale, nan=0.0)
            return torch.bucketize(x.contiguous(), self.midpoints.to(w.device)).to(w.dtype).add_(low)
        shape = torch.broadcast_shapes(w.shape, scale.shape)
        w, scale = torch.broadcast_tensors(torch.atleast_1d(w), torch.atleast_1d(scale))
        codes = torch.empty(w.shape, dtype=torch.float32, device=w.device)
        if w.numel():
            step = max(1, _CHUNK // w[0].numel())
            x = torch.empty(min(step, w.shape[0]) * w[0].numel(), device=w.device)
            lookup = self.cells.lookup(x.numel(), w.device)
            for start in range(0, w.shape[0], step):
                part = slice(start, start + step)
                xs = x[:w[part].numel()]
                torch.div(w[part], scale[part], out=xs.view(w[part].shape)).nan_to_num_(nan=0.0)
                lookup(xs, codes[part].view(-1))
        return codes.add_(low).to(w.dtype).reshape(shape)

    def dequantize(self, codes, scale, zero):
        return self.codebook.to(codes.device)[codes.long() - qrange(self.bits)[0]] * scale


_CHUNK = 1 << 18  # elements per step of a codebook lookup: its temporaries stay in a core's L2 cache


class MidpointCells:
    """Nearest-value lookup for x in [-1, 1]: [-1, 1] cut into equal cells, each holding at most one of the sorted
    midpoints (with a margin, so a cell index a rounding off still holds the right one); the index of x is the number
    of midpoints below its cell plus x > the midpoint in it. Two table reads and one comparison per weight, the same
    result as counting every midpoint below x."""

    def __init__(self, cells: int, below: torch.Tensor, midpoint: torch.Tensor):
        self.cells = cells
        self.below = below  # float32 [cells]: the midpoints below each cell
        self.midpoint = midpoint  # float32 [cells]: the midpoint inside each cell, +inf where none
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def build(cls, midpoints: torch.Tensor, max_cells: int = 1 << 14) -> MidpointCells | None:
        m = midpoints.double()
        gap = float((m[1:] - m[:-1]).min()) if len(m) > 1 else 2.0
        cells = 16
        while 2 / cells + 4e-4 >= gap:  # room for the cell and both margins between two midpoints
            cells *= 2
            if cells > max_cells:
                return None
        margin = 1e-4
        edges = torch.arange(cells, dtype=torch.float64) * 2 / cells - 1
        below = (m < (edges - margin).unsqueeze(1)).sum(1)
        inside = (m >= (edges - margin).unsqueeze(1)) & (m < (edges + 2 / cells + margin).unsqueeze(1))
        midpoint = torch.full((cells,), float("inf"), dtype=torch.float32)
        for cell, k in inside.nonzero().tolist():
            midpoint[cell] = midpoints[k]
        return cls(cells, below.to(torch.float32), midpoint)

    def index(self, x: torch.Tensor) -> torch.Tensor:
        """Float indices (0 .. len(midpoints)) of the nearest values of finite x (any shape)."""
        flat = x.reshape(-1).float().contiguous()
        out = torch.empty_like(flat)
        self.lookup(flat.numel(), x.device)(flat, out)
        return out.view(x.shape)

    def lookup(self, size: int, device: torch.device):
        """A function writing the indices of flat float32 x (at most `size` elements) into `out`, through buffers
        made once: each step writes into memory it has used before (fresh temporaries per step cost more in page
        faults than the lookup itself)."""
        below, midpoint = self._tables(device)
        half, last = self.cells / 2, self.cells - 1
        cell = torch.empty(size, dtype=torch.int64, device=device)  # int32 indices read slower here
        mid = torch.empty(size, device=device)

        def run(x: torch.Tensor, out: torch.Tensor) -> None:
            n = x.numel()
            torch.mul(x, half, out=out).add_(half).clamp_(0, last)
            cell[:n].copy_(out)  # truncation: the cell below
            torch.index_select(below, 0, cell[:n], out=out)
            torch.index_select(midpoint, 0, cell[:n], out=mid[:n])
            out.add_(torch.lt(mid[:n], x, out=mid[:n]))  # 1.0 above the cell's midpoint
        return run

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on:
            self._on[device] = (self.below.to(device), self.midpoint.to(device))
        return self._on[device]
