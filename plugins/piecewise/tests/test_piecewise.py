"""PaddleSlim's PieceWiseSearch: the float model is unchanged by the search alone on every architecture, the
searched scales never lose to no smoothing, and W8A8 static error drops on outlier channels."""

import pytest
import torch

from slimquant.testing.smoothing import EQUIVALENCE_ARCHS, check_smoothing_keeps_float_model, w8a8_static_error
from slimquant_piecewise import PieceWiseConfig, PieceWiseSearchPlugin, kmeans_1d

SEARCH = [{"name": "piecewise", "k_piece": 2, "search_piece": True, "smooth_all_linears": True,
           "search_alpha_step": 0.2, "search_scale_step": 2.0, "sample_tokens": 64}]


@pytest.mark.parametrize("arch", EQUIVALENCE_ARCHS)
def test_search_alone_keeps_the_float_model(arch):
    check_smoothing_keeps_float_model(SEARCH, arch)


def test_piecewise_search_never_loses_to_no_smoothing():
    labels = kmeans_1d(torch.tensor([0.1, 50.0, 0.2, 3.0, 2.9, 49.0]), 3)
    assert labels.tolist() == [0, 2, 0, 1, 1, 2]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g)
    x[:, [2, 9]] *= 80
    w = torch.randn(48, 32, generator=g)
    plugin = PieceWiseSearchPlugin(PieceWiseConfig(k_piece=3, search_piece=True))
    s = plugin.search("test", x, x.abs().amax(0), w.abs().amax(0), w, lambda t: t)
    ref = x @ w.T
    assert plugin.loss(x, w, ref, s) < 0.5 * plugin.loss(x, w, ref, torch.ones(32))


def test_search_lowers_w8a8_static_error_on_outlier_channels():
    plain = w8a8_static_error([])
    searched = w8a8_static_error([{"name": "piecewise", "k_piece": 2, "sample_tokens": 128}])
    assert searched < 0.7 * plain, (plain, searched)
