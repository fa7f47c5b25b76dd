"""The sweep itself: exact sparsity of the codes, pruned weights at exactly 0, outliers exact and capped, and
SparseGPT's output error below magnitude pruning's."""

import pytest
import torch
from sparse_helpers import correlated_inputs, hessian_of, output_error, random_weight

from slimquant.quant.fake_linear import FakeQuantLinear
from slimquant.quant.qweight import check_sparsity
from slimquant_sparse import SparseSettings, magnitude_prune_quantize, sparsegpt_quantize

X = correlated_inputs(512, 256)
H = hessian_of(X)


def both(w, s):
    return {"sparsegpt": sparsegpt_quantize(w, H, s), "magnitude": magnitude_prune_quantize(w, s)}


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_unstructured_codes_hold_the_target_sparsity(sparsity):
    w = random_weight(64, 256)
    pruned = {"sparsegpt": 4 * int(64 * 64 * sparsity), "magnitude": int(w.numel() * sparsity)}  # per block / all
    for method, qw in both(w, SparseSettings(bits=8, sparsity=sparsity, blocksize=64)).items():
        zeros = int((qw.dequantize_codes() == 0).sum())
        assert pruned[method] <= zeros <= pruned[method] + 0.01 * w.numel(), (method, zeros)
        assert qw.sparsity == "unstructured"


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("fraction", [0.0, 0.05])
def test_n_m_keeps_at_most_n_nonzeros_in_every_m(pattern, fraction):
    w = random_weight(64, 256)
    w[3, 10] = 2.0  # an outlier
    n, m = map(int, pattern.split(":"))
    s = SparseSettings(bits=4, symmetric=False, group_size=64, pattern=pattern, fraction=fraction)
    for method, qw in both(w, s).items():
        check_sparsity(qw.dequantize(), pattern)  # outliers included: they fill kept slots
        nonzero = (qw.dequantize() != 0).view(64, -1, m).sum(-1)
        assert int(nonzero.max()) <= n and float(nonzero.float().mean()) > n - 0.1, method


def test_pruned_weights_dequantize_to_exactly_zero_with_asymmetric_groups():
    w = random_weight(32, 256) + 0.03  # every group off-centre: zero points far from 0
    s = SparseSettings(bits=4, symmetric=False, group_size=32, sparsity=0.5)
    for method, qw in both(w, s).items():
        idx = qw.group_index()
        at_zero_point = qw.codes.float() == qw.zero[:, idx]
        assert float(at_zero_point.float().mean()) >= 0.5, method
        assert torch.equal(qw.dequantize()[at_zero_point], torch.zeros(int(at_zero_point.sum()))), method
        lo, hi = -8, 7
        assert bool(((qw.zero >= lo) & (qw.zero <= hi) & (qw.zero == qw.zero.round())).all())


def test_outliers_are_exact_in_the_fake_quant_weight_and_within_the_fraction():
    w = random_weight(64, 256)
    g = torch.Generator().manual_seed(1)
    planted = torch.randperm(w.numel(), generator=g)[:400]
    w.view(-1)[planted] = torch.randn(400, generator=g).sign() * (0.5 + torch.rand(400, generator=g))
    s = SparseSettings(bits=4, symmetric=True, group_size=64, sparsity=0.5, fraction=0.01, sigma_factor=3.0)
    for method, qw in both(w, s).items():
        out = qw.outliers
        assert out is not None and 0 < out.index.numel() <= int(0.01 * w.numel()), method
        assert set(out.index.tolist()) <= set(planted.tolist())  # the largest deviations first
        expected = w.view(-1)[out.index].half().float()
        fake = FakeQuantLinear(qw, None, None)
        assert torch.equal(fake.weight.reshape(-1)[out.index], expected), method
        assert torch.equal(qw.dequantize_codes().reshape(-1)[out.index], torch.zeros(out.index.numel()))


def test_outliers_lower_the_error_of_a_weight_with_outliers():
    w = random_weight(64, 256)
    w[torch.arange(0, 64, 2), torch.arange(32) * 7] = 1.5  # one in every other row
    s = SparseSettings(bits=4, symmetric=True, group_size=64, sparsity=0.5)
    plain = sparsegpt_quantize(w, H, s)
    kept = sparsegpt_quantize(w, H, SparseSettings(**{**s.__dict__, "fraction": 0.01}))
    assert output_error(X, w, kept) < 0.5 * output_error(X, w, plain)


@pytest.mark.parametrize("pattern,bits,group", [("unstructured", 8, None), ("2:4", 8, None),
                                                ("unstructured", 4, 64)])
def test_sparsegpt_beats_magnitude_on_a_calibrated_layer(pattern, bits, group):
    w = random_weight(96, 256, seed=3)
    s = SparseSettings(bits=bits, symmetric=group is None, group_size=group, pattern=pattern, sparsity=0.5)
    errors = {method: output_error(X, w, qw) for method, qw in both(w, s).items()}
    assert errors["sparsegpt"] < 0.7 * errors["magnitude"], errors


def test_no_sparsity_is_plain_quantization():
    qw = sparsegpt_quantize(random_weight(16, 256), H, SparseSettings(bits=8, sparsity=0.0))
    assert qw.sparsity is None and qw.outliers is None


def test_sparsegpt_beats_magnitude_on_the_linears_of_a_tiny_calibrated_model():
    from slimquant.testing import tiny_model, token_samples

    model = tiny_model("llama")
    linears = {n: m for n, m in model.model.layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    inputs = {n: [] for n in linears}
    def keep(name):
        return lambda module, args, output: inputs[name].append(args[0].reshape(-1, args[0].shape[-1]))

    handles = [m.register_forward_hook(keep(n)) for n, m in linears.items()]
    with torch.no_grad():
        for ids in token_samples(8, 32):
            model(ids)
    for handle in handles:
        handle.remove()
    s = SparseSettings(bits=8, sparsity=0.5)
    errors = {}
    for name, linear in linears.items():
        x, w = torch.cat(inputs[name]), linear.weight.detach()
        errors[name] = (output_error(x, w, sparsegpt_quantize(w, hessian_of(x), s)),
                        output_error(x, w, magnitude_prune_quantize(w, s)))
    print({name: round(ours / baseline, 3) for name, (ours, baseline) in errors.items()})
    assert all(ours < baseline for ours, baseline in errors.values()), errors
    assert sum(e[0] for e in errors.values()) < 0.9 * sum(e[1] for e in errors.values()), errors
