import pytest
import torch

from slimquant.quant.grid import CodebookGrid
from slimquant.quant.math import (
    dynamic_token_fake_quant,
    fake_quantize,
    quantize_weight_with,
    range_to_qparams,
    search_clip_ratio,
    weight_qparams,
)
from slimquant.quant.observers import Histogram, MinMax
from slimquant.quant.qweight import QuantizedWeight, num_groups, qrange


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_error_is_at_most_half_a_step(bits, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(16, 96)
    scale, zero = weight_qparams(w, bits, symmetric, group_size=None, signed=False)
    q = quantize_weight_with(w, scale, zero, bits, None)
    err = (q.dequantize() - w).abs()
    assert (err <= scale / 2 + 1e-6).all()
    lo, hi = qrange(bits)
    assert int(q.codes.min()) >= lo and int(q.codes.max()) <= hi


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_signed_symmetric_scales_put_the_extreme_on_the_lowest_code(bits):
    """Signed scales: the weight of largest magnitude is code -2^(bits-1) exactly; the step is 1/2^(bits-1) of it
    (absmax's is 1/(2^(bits-1) - 1)); only weights past the top code on the other side round by more than half a
    step, and never by more than a step."""
    torch.manual_seed(bits)
    w = torch.randn(16, 96)
    w[1] = w[1].abs()  # a row whose extreme is positive: a negative scale
    scale, zero = weight_qparams(w, bits, True, group_size=None)
    absmax_scale, _ = weight_qparams(w, bits, True, group_size=None, signed=False)
    lo, hi = qrange(bits)
    assert zero is None and bool((scale[1] < 0).all())
    assert torch.allclose(scale.abs() * -lo, w.abs().amax(1, keepdim=True))
    assert bool((scale.abs() < absmax_scale).all())
    q = quantize_weight_with(w, scale, zero, bits, None)
    extreme = w.abs().argmax(1)
    assert bool((q.codes.gather(1, extreme[:, None]) == lo).all())
    err = (q.dequantize() - w).abs()
    inside = (w / scale) <= hi + 0.5
    assert bool((err[inside] <= scale.abs().expand_as(w)[inside] / 2 + 1e-6).all())
    assert bool((err <= scale.abs() + 1e-6).all())
    assert int(q.codes.min()) >= lo and int(q.codes.max()) <= hi


def test_asymmetric_beats_symmetric_on_shifted_weights():
    w = torch.rand(8, 64) + 1.0  # all positive: symmetric wastes half the codes
    errs = {}
    for sym in (True, False):
        scale, zero = weight_qparams(w, 4, sym, None)
        errs[sym] = (quantize_weight_with(w, scale, zero, 4, None).dequantize() - w).pow(2).mean()
    assert errs[False] < errs[True] / 2


@pytest.mark.parametrize("in_features,group", [(576, 128), (100, 32), (64, 64), (10, 128)])
def test_ragged_last_group(in_features, group):
    torch.manual_seed(0)
    w = torch.randn(4, in_features)
    w[:, -1] = 50.0  # an outlier in the last (short) group must not affect the other groups' scales
    scale, zero = weight_qparams(w, 4, False, group)
    assert scale.shape == (4, num_groups(in_features, group))
    q = quantize_weight_with(w, scale, zero, 4, group)
    err = (q.dequantize() - w).abs()
    last_start = (in_features - 1) // group * group
    if last_start > 0:
        assert err[:, :last_start].max() < 0.5  # untouched by the outlier
    assert (err[:, -1] <= scale[:, -1] / 2 + 1e-5).all()


def test_group_quantization_lowers_error_versus_per_channel():
    torch.manual_seed(1)
    w = torch.randn(32, 256) * torch.linspace(0.1, 3, 256)
    errs = []
    for g in (None, 64, 16):
        s, z = weight_qparams(w, 4, False, g)
        errs.append((quantize_weight_with(w, s, z, 4, g).dequantize() - w).pow(2).mean().item())
    assert errs[0] > errs[1] > errs[2]


def test_quantized_weight_rejects_codes_out_of_range_and_bad_shapes():
    with pytest.raises(ValueError, match="range"):
        QuantizedWeight(torch.full((2, 4), 9, dtype=torch.int8), torch.ones(2, 1), None, 4, None)
    with pytest.raises(ValueError, match="scale shape"):
        QuantizedWeight(torch.zeros(2, 4, dtype=torch.int8), torch.ones(2, 3), None, 4, 2)


def test_clip_search_never_increases_error():
    torch.manual_seed(2)
    w = torch.randn(16, 128)
    w[0, 0] = 12.0
    plain_s, plain_z = weight_qparams(w, 4, True, 32)
    ratio = search_clip_ratio(w, 4, True, 32)
    s, z = weight_qparams(w, 4, True, 32, clip_ratio=ratio)
    plain = (quantize_weight_with(w, plain_s, plain_z, 4, 32).dequantize() - w).abs().pow(2.4).sum()
    searched = (quantize_weight_with(w, s, z, 4, 32).dequantize() - w).abs().pow(2.4).sum()
    assert searched <= plain + 1e-5
    assert (ratio <= 1).all() and (ratio < 1).any()


def test_dynamic_per_token_quantization_scales_each_token():
    x = torch.tensor([[0.01, -0.02, 0.03], [100.0, -50.0, 25.0]])
    y = dynamic_token_fake_quant(x, 8, symmetric=True)
    rel = ((y - x).abs() / x.abs().amax(-1, keepdim=True)).max()
    assert rel < 1 / 254 + 1e-6


def test_zero_range_gives_finite_scale():
    scale, zero = range_to_qparams(torch.tensor(0.0), torch.tensor(0.0), 8, False)
    assert torch.isfinite(scale) and scale > 0
    assert torch.isfinite(fake_quantize(torch.zeros(3), scale, zero, 8)).all()


def test_histogram_search_finds_the_mse_clip_of_a_heavy_tail():
    torch.manual_seed(3)
    x = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    hist, mm = Histogram(2048), MinMax()
    for chunk in x.split(50_000):  # a range that widens between batches
        hist.update(chunk)
        mm.update(chunk[None])
    lo, hi = hist.search_range(4, symmetric=True)
    # the MSE-optimal 4-bit clip of a unit Laplace is about 5 (Banner et al., ACIQ); its max is about 12
    assert 3.5 < hi < 7 and lo == -hi
    assert hist.counts.sum().item() == pytest.approx(x.numel())
    assert float(mm.max) == float(x.max())
    lo8, hi8 = hist.search_range(8, symmetric=True)
    assert hi < hi8 <= float(x.abs().max()) + 1e-6  # more bits, less clipping


@pytest.mark.parametrize("in_features,group_size,permuted,symmetric",
                         [(256, 64, False, False), (576, 128, False, False), (576, 128, True, False),
                          (96, None, False, True), (100, 32, True, True)])
def test_dequantize_matches_the_per_column_definition(in_features, group_size, permuted, symmetric):
    torch.manual_seed(0)
    out = 8
    groups = num_groups(in_features, group_size)
    g_idx = (torch.arange(in_features) // (group_size or in_features)).to(torch.int32)
    if permuted:
        g_idx = g_idx[torch.randperm(in_features)]
    codes = torch.randint(-8, 8, (out, in_features), dtype=torch.int8)
    scale = torch.rand(out, groups) + 0.1
    zero = None if symmetric else torch.randint(-3, 3, (out, groups)).float()
    q = QuantizedWeight(codes, scale, zero, 4, group_size, g_idx if permuted else None)
    expected = torch.stack([(codes[:, c].float() - (0 if zero is None else zero[:, g_idx[c]])) * scale[:, g_idx[c]]
                            for c in range(in_features)], 1)
    assert torch.equal(q.dequantize(), expected)


def test_materialized_weights_compute_the_same_and_are_dropped_after():
    from slimquant.quant.fake_linear import FakeQuantLinear, materialized_weights

    torch.manual_seed(0)
    codes = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
    fake = FakeQuantLinear(QuantizedWeight(codes, torch.rand(16, 2) + 0.1, None, 4, 32), None, None)
    layer = torch.nn.Sequential(fake)
    x = torch.randn(3, 64)
    plain = layer(x)
    with materialized_weights(layer):
        assert fake.materialized is not None
        assert torch.equal(layer(x), plain)
    assert fake.materialized is None
    assert "materialized" not in dict(fake.named_buffers())
    assert torch.equal(layer(x), plain)


def test_token_sample_keeps_a_bounded_uniform_sample_of_the_stream():
    from slimquant.quant.observers import TokenSample

    sample = TokenSample(capacity=1000, seed=0)
    for batch in range(40):  # 40 x 500 rows; each row's single feature is the index of its batch
        sample.update(torch.full((1, 500, 1), float(batch)))
    rows = sample.rows
    assert rows.shape == (1000, 1) and sample.seen == 20000
    early = float((rows < 20).float().mean())  # the first half of the stream should fill about half the sample
    assert 0.42 < early < 0.58
    small = TokenSample(capacity=1000)
    small.update(torch.arange(30.0).reshape(10, 3))
    assert torch.equal(small.rows, torch.arange(30.0).reshape(10, 3))


def test_a_range_that_excludes_zero_is_widened_and_the_zero_point_is_a_code():
    """min 1, max 2 at 8 bits used to give zero point -383, which no int8 offset can hold."""
    scale, zero = range_to_qparams(torch.tensor(1.0), torch.tensor(2.0), 8, False)
    assert -128 <= float(zero) <= 127
    assert float(zero) == -128  # the range became [0, 2]
    assert torch.allclose(scale, torch.tensor(2.0 / 255))
    x = torch.tensor([0.0, 1.0, 1.5, 2.0])
    assert (fake_quantize(x, scale, zero, 8) - x).abs().max() <= scale / 2 + 1e-7
    scale, zero = range_to_qparams(torch.tensor(-3.0), torch.tensor(-1.0), 4, False)
    assert -8 <= float(zero) <= 7 and torch.allclose(scale, torch.tensor(3.0 / 15))
    sym, none = range_to_qparams(torch.tensor(1.0), torch.tensor(2.0), 8, True)
    assert none is None and torch.allclose(sym, torch.tensor(2.0 / 127))


def _count_midpoints_below(grid, w, scale):
    x = torch.nan_to_num(w / scale, nan=0.0)
    return sum((x > m).float() for m in grid.midpoints.tolist()) - 2 ** (grid.bits - 1)


@pytest.mark.parametrize(("values", "table"), [
    ([-1.0, -0.7, -0.52, -0.39, -0.28, -0.18, -0.09, 0.0, 0.08, 0.16, 0.25, 0.34, 0.44, 0.56, 0.72, 1.0], True),
    ([-1.0, -0.5, -0.25, -1e-3, 0.0, 1e-3, 0.25, 1.0], True),  # a tiny gap: many cells
    ([-1.0, -0.5, 0.0, 1e-5, 2e-5, 0.5, 0.75, 1.0], False),  # midpoints too close for a table: binary search
])
def test_codebook_lookup_equals_counting_the_midpoints_below(values, table):
    values = torch.tensor(values)
    grid = CodebookGrid(values)
    assert (grid.cells is not None) == table
    torch.manual_seed(0)
    w = torch.randn(300, 128)
    w[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    scale = w.nan_to_num(0, 0, 0).abs().amax(1, keepdim=True) * 0.9  # some weights beyond the codebook's ends
    assert torch.equal(grid.quantize(w, scale, None), _count_midpoints_below(grid, w, scale))
    m = grid.midpoints
    near = torch.cat([m, torch.nextafter(m, torch.tensor(2.0)), torch.nextafter(m, torch.tensor(-2.0)), values])
    one = torch.ones(())
    assert torch.equal(grid.quantize(near, one, None), _count_midpoints_below(grid, near, one))
    assert grid.quantize(m[:1], one, None).item() == -(2 ** (grid.bits - 1))  # half-way rounds to the smaller


@pytest.mark.parametrize("args", [
    {"bits": 4, "symmetric": False, "strategy": "group", "group_size": 64},
    {"bits": 4, "symmetric": True, "strategy": "group", "group_size": 48},  # a ragged last group
    {"bits": 3, "symmetric": False, "strategy": "channel"},
    {"bits": 8, "symmetric": True, "strategy": "tensor"},
])
def test_fake_quantize_weight_is_the_dequantized_round_to_nearest(args):
    from slimquant.config.scheme import WeightArgs
    from slimquant.quant.math import fake_quantize_weight, round_to_nearest

    torch.manual_seed(0)
    w = torch.randn(40, 200, dtype=torch.bfloat16)
    args = WeightArgs(**args)
    ratio = torch.rand(40, 1) * 0.3 + 0.7 if args.strategy == "channel" else 0.9
    fake = fake_quantize_weight(w, args, clip_ratio=ratio)
    assert fake.dtype == w.dtype
    assert torch.equal(fake, round_to_nearest(w, args, clip_ratio=ratio).dequantize(w.dtype))
