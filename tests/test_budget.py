"""Budget mode: recipe validation, the knapsack against brute force, bits used within the budget end to end, and
the chosen widths really in the quantized model."""

from __future__ import annotations

import itertools
import random

import pytest
from tiny_models import tiny_model, token_samples

import slimquant
from slimquant.budget.cost import storage_bits
from slimquant.budget.knapsack import choose_options
from slimquant.config.recipe import Recipe
from slimquant.config.scheme import WeightArgs
from slimquant.errors import RecipeError
from slimquant.quant.fake_linear import FakeQuantLinear

CANDIDATES = [{"bits": 2, "group_size": 32, "symmetric": False}, {"bits": 4, "group_size": 32, "symmetric": False},
              {"bits": 8}]


def budget_recipe(**budget) -> dict:
    return {"scheme": "W4A16", "budget": {"candidates": CANDIDATES, **budget}}


@pytest.mark.parametrize("budget, field, message", [
    ({"avg_bits": 4}, "budget.candidates", "at least one candidate"),
    ({"avg_bits": 1.5, "candidates": [{"bits": 2}, {"bits": 4}]}, "budget", "below the narrowest candidate (2 bits)"),
    ({"candidates": [{"bits": 4}]}, "budget", "exactly one of `avg_bits` or `bytes`"),
    ({"avg_bits": 4, "bytes": 100, "candidates": [{"bits": 4}]}, "budget", "exactly one of"),
    ({"avg_bits": 4, "candidates": [{"bits": 4}], "method": "hessian"}, "budget.method", "'proxy' or 'kl'"),
    ({"avg_bits": 4, "candidates": [{"bits": 4}, {"bits": 4}]}, "budget.candidates", "listed twice"),
    ({"avg_bits": -1, "candidates": [{"bits": 4}]}, "budget.avg_bits", "greater than 0"),
    ({"avg_bits": 4, "candidates": [{"bits": 9}]}, "budget.candidates.0.bits", "less than or equal to 8"),
    ({"avg_bits": 4, "candidates": [{"bits": 4}], "sample": 3}, "budget.sample", "unknown key"),
])
def test_budget_validation_names_the_field(budget, field, message):
    with pytest.raises(RecipeError) as info:
        Recipe.parse({"budget": budget})
    assert f"): {field}: " in str(info.value) and message in str(info.value)


def test_budget_refuses_overrides_that_set_weights():
    with pytest.raises(RecipeError, match=r"overrides\[0\] sets weights"):
        Recipe.parse({**budget_recipe(avg_bits=4), "overrides": [{"targets": ["x"], "weights": {"bits": 8}}]})
    Recipe.parse({**budget_recipe(avg_bits=4), "overrides": [{"targets": ["x"], "algorithm": "minmax"}]})


def brute_force(costs, losses, budget):
    best = None
    for pick in itertools.product(*(range(len(c)) for c in costs)):
        if sum(c[j] for c, j in zip(costs, pick, strict=True)) <= budget:
            loss = sum(v[j] for v, j in zip(losses, pick, strict=True))
            best = loss if best is None else min(best, loss)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_knapsack_finds_the_optimum_of_small_instances(seed):
    rng = random.Random(seed)
    costs = [[rng.randint(1, 30) for _ in range(3)] for _ in range(6)]
    losses = [[rng.random() for _ in range(3)] for _ in range(6)]
    budget = rng.randint(sum(min(c) for c in costs), sum(max(c) for c in costs))
    chosen = choose_options(costs, losses, budget)
    assert sum(c[j] for c, j in zip(costs, chosen, strict=True)) <= budget
    loss = sum(v[j] for v, j in zip(losses, chosen, strict=True))
    assert loss == pytest.approx(brute_force(costs, losses, budget))


def test_knapsack_on_a_coarse_grid_stays_within_budget():
    rng = random.Random(0)
    costs = [[rng.randint(1000, 9000) for _ in range(4)] for _ in range(40)]
    losses = [[rng.random() for _ in range(4)] for _ in range(40)]
    budget = sum(min(c) for c in costs) + 50_000
    chosen = choose_options(costs, losses, budget, max_units=100)  # 500-bit units: rounded, then topped up
    assert sum(c[j] for c, j in zip(costs, chosen, strict=True)) <= budget


def test_knapsack_refuses_a_budget_below_the_cheapest_choice():
    with pytest.raises(RecipeError, match="below the smallest possible size"):
        choose_options([[10, 20], [10, 20]], [[1, 0], [1, 0]], 19)


def test_storage_bits_count_codes_and_scales():
    assert storage_bits(WeightArgs(bits=4, group_size=32, symmetric=False), 8, 64) == 8 * 64 * 4 + 8 * 2 * 64
    assert storage_bits(WeightArgs(bits=8), 8, 64) == 8 * 64 * 8 + 8 * 32


def _quantized_bits(model) -> dict[str, int]:
    return {n: m.bits for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


@pytest.mark.parametrize("algorithm", ["minmax", "gptq"])
@pytest.mark.parametrize("avg_bits", [5.0, 7.0])  # candidates: 4, 6, 8.5 bits with scales
def test_budget_end_to_end_fits_and_the_model_has_the_chosen_widths(algorithm, avg_bits):
    if algorithm == "gptq":
        pytest.importorskip("slimquant_gptq")
    model = tiny_model("llama")
    recipe = {**budget_recipe(avg_bits=avg_bits), "algorithms": [algorithm]}
    report = slimquant.quantize(model, recipe, samples=token_samples(4, 32))
    budget = report.budget
    assert budget.used_bits <= budget.budget_bits
    assert budget.avg_bits <= avg_bits
    assert len(budget.linears) == 14
    bits = _quantized_bits(model)
    for choice in budget.linears:
        assert bits[choice.name] == CANDIDATES[choice.chosen]["bits"]
        assert report.plans[choice.name].weight_algorithm == algorithm
    assert len({c.chosen for c in budget.linears}) > 1  # the budget sits between candidates: a real mix


def test_budget_in_bytes_and_ignore():
    model = tiny_model("llama")
    recipe = {**budget_recipe(bytes=36_000), "ignore": ["re:.*mlp.down_proj"]}
    report = slimquant.quantize(model, recipe, samples=token_samples(4, 32))
    assert report.budget.used_bits <= 36_000 * 8
    assert not any("down_proj" in c.name for c in report.budget.linears)
    assert report.plans["model.layers.0.mlp.down_proj"] is None


def test_budget_without_enough_room_is_refused():
    model = tiny_model("llama")
    with pytest.raises(RecipeError, match=r"budget.avg_bits=3.0 is below the smallest possible size.*4.000 bits"):
        slimquant.quantize(model, budget_recipe(avg_bits=3), samples=token_samples(2, 16))


def test_budget_by_kl_measurement():
    model = tiny_model("llama")
    report = slimquant.quantize(model, budget_recipe(avg_bits=6, method="kl", samples=2), samples=token_samples(4, 16))
    assert report.budget.method == "kl" and report.budget.used_bits <= report.budget.budget_bits
    assert all(c.sensitivity[0] > c.sensitivity[2] for c in report.budget.linears)  # 2 bits hurt more than 8
