"""The compiled nearest-code kernel gives the core's torch path's codes and scales exactly, wherever it applies."""

import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

import slimquant_nf4.nearest as nearest
from slimquant.quant.grid import CodebookGrid
from slimquant_nf4 import NF4Grid

CODEBOOKS = ["nf4", "fp4"]  # fp4 has two zeros: a midpoint at exactly 0
# nf4 through its cell table (on an AVX-512 CPU) and by counting midpoints; fp4 has too many cells for a table
LOOKUPS = [("nf4", True), ("nf4", False), ("fp4", True)]


def core_round(grid, w, group_size, clip_ratio=1.0):
    return CodebookGrid.round_to_nearest(grid, w, group_size, clip_ratio)


def hard_values(grid):
    """Each midpoint, one ulp either side, the codebook's values, 0 and -0, NaN, infinities, beyond the ends."""
    m = grid.midpoints
    return torch.cat([m, torch.nextafter(m, torch.tensor(2.0)), torch.nextafter(m, torch.tensor(-2.0)),
                      grid.codebook, torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 3.0, -3.0])])


def can_build_extensions() -> bool:
    """A C compiler (the one Python was built with names) and the Python headers: what the install needs to build
    the kernel, which is optional without them."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(compiler) is not None and (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file()


needs_kernel = pytest.mark.skipif(not nearest.kernel_available(), reason="slimquant_nf4._nearest is not built")


def test_the_kernel_is_built_by_the_install():
    if not can_build_extensions():
        pytest.skip("no C compiler or Python headers: the kernel is optional and the core's path rounds instead")
    assert nearest.kernel_available(), "slimquant_nf4._nearest did not build, although a C compiler and the Python " \
                                       "headers are there: see the install's output"


def test_only_a_32_cell_table_is_read_in_registers():
    assert not NF4Grid("fp4").lookup.uses_table()  # 1024 cells
    assert not nearest.Lookup.of(NF4Grid("nf4"), table=False).uses_table()
    assert NF4Grid("nf4").lookup.below.numel() == 32


@needs_kernel
@pytest.mark.parametrize(("codebook", "table"), LOOKUPS)
@pytest.mark.parametrize("per_weight", [False, True])
def test_codes_equal_the_core_path_at_midpoints_ulps_and_non_finite_values(codebook, table, per_weight):
    grid = NF4Grid(codebook)
    torch.manual_seed(0)
    w = torch.randn(40, 3, 64)
    hard = hard_values(grid)
    w[0].view(-1)[:hard.numel()] = hard
    scale = w.nan_to_num(0, 0, 0).abs().amax(-1, keepdim=True) * 0.9  # some weights beyond the ends
    scale[0] = 1.0
    if per_weight:
        scale = scale.expand_as(w).contiguous()
    codes = nearest.nearest_codes(w, scale, nearest.Lookup.of(grid, table))
    assert codes is not None
    assert torch.equal(codes, CodebookGrid.quantize(grid, w, scale, None))
    assert torch.equal(grid.quantize(w, scale, None), codes)


@pytest.mark.parametrize(("codebook", "table"), LOOKUPS)
@pytest.mark.parametrize(("shape", "group_size"), [
    ((96, 256), 64), ((33, 100), 64), ((7, 45), None), ((5, 128), 128), ((3, 10), 16),  # ragged and short groups
])
def test_absmax_scales_and_codes_equal_the_core_round_to_nearest(codebook, table, shape, group_size):
    grid = NF4Grid(codebook)
    grid.lookup = nearest.Lookup.of(grid, table)
    torch.manual_seed(1)
    w = torch.randn(shape) * 0.02
    w[1] = 0.0  # all-zero groups: the EPS scale
    w[2, :5] = torch.tensor([1e-30, -1e-30, 0.0, -0.0, 1e-45])  # tiny values, a denormal
    w[0, : min(shape[1], 30)] = hard_values(grid)[: min(shape[1], 30)].nan_to_num(0.5, 2.0, -2.0)
    ours, core = grid.round_to_nearest(w, group_size), core_round(grid, w, group_size)
    assert ours.codes.dtype == core.codes.dtype == torch.int8
    assert torch.equal(ours.codes, core.codes)
    assert torch.equal(ours.scale, core.scale)
    assert torch.equal(ours.dequantize(), core.dequantize())


def test_a_nan_weight_gives_the_core_path_s_nan_scale_and_codes():
    grid = NF4Grid("nf4")
    w = torch.randn(4, 64)
    w[2, 17] = float("nan")
    ours, core = grid.round_to_nearest(w, 16), core_round(grid, w, 16)
    assert torch.equal(ours.codes, core.codes)
    assert torch.equal(ours.scale.isnan(), core.scale.isnan()) and bool(ours.scale[2, 1].isnan())
    assert torch.equal(ours.scale.nan_to_num(), core.scale.nan_to_num())


def test_non_contiguous_weights_and_several_threads_give_the_same_result(monkeypatch):
    grid = NF4Grid("nf4")
    torch.manual_seed(2)
    w = torch.randn(200, 96).t()  # a transposed view
    expected = core_round(grid, w, 32)
    monkeypatch.setattr(nearest, "WEIGHTS_PER_THREAD", 1000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert nearest._threads(w.numel()) == 4
    ours = grid.round_to_nearest(w, 32)
    assert torch.equal(ours.codes, expected.codes) and torch.equal(ours.scale, expected.scale)


def test_where_the_kernel_does_not_apply_the_core_path_runs():
    grid = NF4Grid("nf4")
    w = torch.randn(8, 64, dtype=torch.float64)
    assert nearest.absmax_codes(w, 16, grid.lookup) is None
    assert nearest.nearest_codes(w, w.abs(), grid.lookup) is None
    w32 = w.float()
    assert nearest.nearest_codes(w32, torch.ones(1, 64), grid.lookup) is None  # a scale per column
    wide = nearest.Lookup(torch.linspace(-1, 1, 17), None, None, -8)  # 17 midpoints: a 5-bit codebook
    assert nearest.nearest_codes(w32, torch.ones(8, 1), wide) is None
    clip = torch.full((8, 4), 0.9)
    assert torch.equal(grid.round_to_nearest(w32, 16, clip).codes, core_round(grid, w32, 16, clip).codes)
    doubled = NF4Grid("nf4", double_quant=True)
    assert torch.equal(doubled.round_to_nearest(w32, 16).codes, core_round(doubled, w32, 16).codes)


def test_without_the_kernel_the_plugin_rounds_through_the_core(monkeypatch):
    grid = NF4Grid("fp4")
    w = torch.randn(12, 80)
    with_kernel = grid.round_to_nearest(w, 32)
    monkeypatch.setattr(nearest, "_nearest", None)
    assert not nearest.kernel_available()
    assert nearest.absmax_codes(w, 32, grid.lookup) is None
    without = grid.round_to_nearest(w, 32)
    assert torch.equal(without.codes, with_kernel.codes) and torch.equal(without.scale, with_kernel.scale)
