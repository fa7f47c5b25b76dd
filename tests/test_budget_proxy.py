"""The cheap sensitivity proxy (K-FAC Fisher) ranks Linears as the definition does: KL of the model output with only
that Linear quantized. Measured on tiny random models (8 x 32 tokens), Spearman per candidate: llama 0.96-0.97,
qwen2 0.94-0.98, opt 0.92-0.99 (seeds 0 and 1); the input-Hessian error alone, without the output gradients,
scores -0.35 to 0.03."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, token_samples

from slimquant.budget.resolve import budgeted_linears
from slimquant.budget.sensitivity import kl_sensitivity, proxy_sensitivity
from slimquant.config.recipe import Recipe
from slimquant.config.scheme import WeightArgs
from slimquant.plugins import plan_algorithms

THRESHOLD = 0.85
CANDIDATES = [WeightArgs(bits=2, group_size=32, symmetric=False), WeightArgs(bits=4, group_size=32, symmetric=False)]


def spearman(a: list[float], b: list[float]) -> float:
    ranks_a = torch.tensor(a).argsort().argsort().float()
    ranks_b = torch.tensor(b).argsort().argsort().float()
    ranks_a, ranks_b = ranks_a - ranks_a.mean(), ranks_b - ranks_b.mean()
    return float((ranks_a * ranks_b).sum() / (ranks_a.norm() * ranks_b.norm()))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_proxy_ranks_linears_like_kl(arch):
    model = tiny_model(arch)
    recipe = Recipe.parse({"scheme": "W4A16"})
    linears = {n: m for n, (_, _, m) in budgeted_linears(model, recipe, plan_algorithms(recipe)).items()}
    samples = token_samples(8, 32)
    kl = kl_sensitivity(model, linears, CANDIDATES, samples)
    proxy = proxy_sensitivity(model, linears, CANDIDATES, samples)
    for j in range(len(CANDIDATES)):
        names = list(linears)
        rho = spearman([kl[n][j] for n in names], [proxy[n][j] for n in names])
        assert rho > THRESHOLD, f"candidate {j}: Spearman {rho:.3f}"
    total_kl = sum(v[0] for v in kl.values())
    total_proxy = sum(v[0] for v in proxy.values())
    assert 0.5 < total_proxy / total_kl < 2  # the proxy estimates KL per token, not only its ranking


def test_sensitivity_leaves_the_model_unchanged():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    recipe = Recipe.parse({"scheme": "W4A16"})
    linears = {n: m for n, (_, _, m) in budgeted_linears(model, recipe, plan_algorithms(recipe)).items()}
    kl_sensitivity(model, linears, CANDIDATES, token_samples(2, 16))
    proxy_sensitivity(model, linears, CANDIDATES, token_samples(2, 16))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
