"""rotate: the rotated float model computes what the original did on every architecture it accepts; the others
are refused before any weight is read; it composes with every quantizer and format."""

import pytest
import torch

import slimquant
from slimquant.config.recipe import Recipe
from slimquant.errors import RecipeError
from slimquant.export import save_quantized
from slimquant.loader import load_quantized
from slimquant.model.structure import normalize_linears
from slimquant.plugins import PluginSet, plan_algorithms
from slimquant.runtime.model_context import ModelContext, run_transforms
from slimquant.runtime.preflight import check_before_loading
from slimquant.sdk import FakeQuantLinear, find_decoder_layers, tiny_model, token_samples
from slimquant_rotate import RotateConfig, RotatePlugin

ACCEPTED = ["llama", "qwen2", "qwen3", "mistral", "gemma", "mixtral", "qwen2_moe"]
REFUSED = {"opt": "LayerNorm with a bias", "gpt2": "absolute position embeddings", "phi": "in parallel"}
PROBE = token_samples(2, 24, seed=7)


def rotate(model, **config) -> list[str]:
    normalize_linears(model)  # as the runtime does before any transform: fused experts become Linears
    prefix, layers = find_decoder_layers(model)
    plugin = RotatePlugin(RotateConfig(**{"guard": False, **config}))
    ctx = ModelContext(model, prefix, layers, {}, torch.device("cpu"))
    with torch.no_grad():
        return run_transforms(ctx, PluginSet({"rotate": plugin}), ["rotate"])


def uneven_norms(model) -> None:
    """Norm weights away from one (a fresh model's are all ones, which a norm folded into the wrong Linears would
    not show), the same for a model and its reference."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for module in model.modules():
            if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(ids).logits for ids in PROBE])


@pytest.mark.parametrize("arch", ACCEPTED)
@pytest.mark.parametrize("config", [{}, {"heads": False}, {"residual": False}, {"seed": 3}, {"online": True},
                                    {"residual": False, "heads": False, "online": True}])
def test_the_rotated_float_model_gives_the_original_logits(arch, config):
    model = tiny_model(arch)
    normalize_linears(model)
    uneven_norms(model)
    reference = logits(model)
    rotate(model, **config)
    scale = float(reference.abs().max())
    assert float((logits(model) - reference).abs().max()) <= 1e-4 * scale


@pytest.mark.parametrize("arch", ACCEPTED)
def test_the_rotation_changes_the_weights_the_quantizer_sees(arch):
    model = tiny_model(arch)
    q_proj = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    v_proj = model.model.layers[0].self_attn.v_proj.weight.detach().clone()
    rotate(model)
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, q_proj, atol=1e-3)
    assert not torch.allclose(model.model.layers[0].self_attn.v_proj.weight, v_proj, atol=1e-3)


@pytest.mark.parametrize("arch, why", REFUSED.items())
def test_architectures_it_cannot_rotate_exactly_are_refused_before_loading(arch, why):
    recipe = Recipe.parse({"scheme": "W4A16", "algorithms": ["rotate", "minmax"]})
    with pytest.raises(RecipeError, match=f"the model transforms cannot rewrite this model: rotate: {arch}: .*{why}"):
        check_before_loading(recipe, plan_algorithms(recipe), tiny_model(arch).config)


def test_tied_embeddings_are_untied_and_said_so():
    config = tiny_model("llama").config
    config.tie_word_embeddings = True
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    uneven_norms(model)
    reference = logits(model)
    notes = rotate(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    assert any("untied the output embedding" in n for n in notes)
    assert float((logits(model) - reference).abs().max()) <= 1e-4 * float(reference.abs().max())


def test_seeds_randomize_the_rotation_deterministically():
    weights = []
    for seed in (None, 1, 1, 2):
        model = tiny_model("llama")
        rotate(model, seed=seed)
        weights.append(model.model.layers[0].self_attn.q_proj.weight.detach().clone())
    assert torch.equal(weights[1], weights[2])
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[3])


@pytest.mark.parametrize("algorithms, scheme", [
    (["rotate", "minmax"], {"weights": {"bits": 4, "symmetric": False, "group_size": 16}}),
    (["rotate", "gptq"], {"weights": {"bits": 4, "symmetric": False, "group_size": 16}}),
    (["rotate", "hqq"], {"weights": {"bits": 4, "symmetric": False, "group_size": 16}}),
    (["rotate", "nf4"], {"weights": {"bits": 4, "group_size": 16}}),
    (["rotate", "awq", "gptq"], {"weights": {"bits": 4, "symmetric": False, "group_size": 16}}),
    (["rotate", "smoothquant", "gptq"], {"scheme": "W8A8"}),
])
def test_it_composes_with_every_quantizer_and_the_output_reloads(tmp_path, algorithms, scheme):
    for name in algorithms[1:]:
        if name != "minmax":
            pytest.importorskip(f"slimquant_{name}")
    model = tiny_model("llama")
    report = slimquant.quantize(model, {**scheme, "algorithms": algorithms, "runtime": {"progress": False}},
                                samples=token_samples(4, 16))
    assert any(n.startswith("rotate: guard: R1 ") for n in report.transforms), report.transforms
    assert all(isinstance(m, FakeQuantLinear) for n, m in model.named_modules() if n.endswith("proj"))
    after = logits(model)
    assert torch.isfinite(after).all()
    save_quantized(model, tmp_path / "out", linear_types=report.linear_types())
    rotated_float = tiny_model("llama")
    rotate(rotated_float)
    reloaded = load_quantized(rotated_float, tmp_path / "out")
    assert torch.equal(logits(reloaded), after)


def test_the_guard_error_equals_rounding_the_turned_weight_on_turned_inputs():
    from slimquant.sdk import WeightArgs, fake_quantize_weight
    from slimquant_rotate import guard
    from slimquant_rotate.hadamard import orthogonal_hadamard

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False).double()
    x = torch.randn(40, 64, dtype=torch.float64)
    args = WeightArgs(bits=4, symmetric=False, group_size=16)
    right, left = orthogonal_hadamard(64), orthogonal_hadamard(32, seed=5)
    turned = left @ linear.weight.detach() @ right
    y = x @ right
    direct = (y @ turned.T - y @ fake_quantize_weight(turned.float(), args).double().T).pow(2).sum()
    expected = float(direct / (x @ linear.weight.detach().T).pow(2).sum())
    assert guard.error(linear, x, args, guard.Turn(left=left, right=right)) == pytest.approx(expected, rel=1e-9)
    gain = torch.rand(64, dtype=torch.float64) + 0.5
    unit_inputs = guard.error(linear, torch.eye(64, dtype=torch.float64), args, guard.Turn(right=right, gain=gain))
    assert guard.error(linear, None, args, guard.Turn(right=right, gain=gain)) == pytest.approx(unit_inputs, rel=1e-9)


def weights_on_grid(args: dict):
    """A tiny Llama whose projections already lie on the grid `args` rounds to: rounding them loses nothing."""
    from slimquant.sdk import WeightArgs, fake_quantize_weight

    model = tiny_model("llama")
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("proj"):
                module.weight.copy_(fake_quantize_weight(module.weight, WeightArgs(**args)))
    return model


def test_the_guard_drops_rotations_that_make_rounding_worse():
    """Weights already on the grid round with no error: every rotation would add some, so the guard drops them all;
    on the same model with random weights it keeps R1."""
    args = {"bits": 4, "symmetric": False, "group_size": 16}
    on_grid = weights_on_grid(args)
    recipe = {"weights": args, "algorithms": ["rotate", "minmax"], "runtime": {"progress": False}}
    report = slimquant.quantize(on_grid, recipe, samples=token_samples(4, 16))
    assert any("guard: R1 dropped" in n for n in report.transforms), report.transforms
    assert any("guard: R2 kept in 0 of 2 attention layers" in n for n in report.transforms), report.transforms
    report = slimquant.quantize(tiny_model("llama"), recipe, samples=token_samples(4, 16))
    assert any("guard: R1 kept" in n for n in report.transforms), report.transforms


def test_without_calibration_data_the_guard_compares_the_weights_alone():
    """Data-free, on weights already on the grid, the guard still drops every rotation (it measures the weights'
    own rounding error); with the guard off, every rotation is kept."""
    args = {"bits": 4, "symmetric": False, "group_size": 16}
    on_grid = weights_on_grid(args)
    report = slimquant.quantize(on_grid, {"weights": args, "algorithms": ["rotate"], "runtime": {"progress": False}})
    assert report.data_free
    assert "rotate: guard: no calibration data, so it compares the rounding error of the weights alone" in \
        report.transforms
    assert any("guard: R1 dropped" in n for n in report.transforms), report.transforms
    report = slimquant.quantize(tiny_model("llama"), {"weights": args, "runtime": {"progress": False},
                                                      "algorithms": [{"name": "rotate", "guard": False}]})
    assert any(n.startswith("rotate: R1: 64-wide residual rotation") for n in report.transforms)
    assert not any("guard" in n for n in report.transforms)


def test_the_contract_check_passes_on_every_accepted_architecture():
    from slimquant.sdk import check_plugin

    changes = check_plugin(RotatePlugin, scheme="W8A16", archs=ACCEPTED)
    assert set(changes) == set(ACCEPTED)


def test_the_online_rotation_lives_in_the_quantized_model_and_formats_that_cannot_hold_it_refuse_it(tmp_path):
    recipe = {"scheme": "W8A8_DYNAMIC", "algorithms": [{"name": "rotate", "online": True}, "minmax"],
              "runtime": {"progress": False}}
    with pytest.raises(RecipeError, match=r"save_type safe_tensor: this format cannot hold a transform applied to "
                                          r"activations at inference \(an online rotation\) \(online_transform\), "
                                          r"which rotate produces \(online: true"):
        plan_algorithms(Recipe.parse(recipe), formats=["safe_tensor"])
    model, reference = tiny_model("llama"), tiny_model("llama")
    report = slimquant.quantize(model, recipe, samples=token_samples(4, 16))
    down = model.model.layers[0].mlp.down_proj
    kept = [n for n in report.transforms if "guard: R4 kept on" in n]
    assert kept, report.transforms
    if down.input_transform is not None:
        assert down.input_transform.shape == (128, 128)
    reference_logits, quantized = logits(reference), logits(model)
    assert float((quantized - reference_logits).abs().max()) < 0.5 * float(reference_logits.abs().max())
    with pytest.raises(slimquant.SlimquantError if hasattr(slimquant, "SlimquantError") else Exception,
                       match="online_transform"):
        save_quantized(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_guard_proxy_for_calibrated_quantizers_feeds_errors_back():
    """With inputs whose channels are uncorrelated, feedback rounding is rounding to nearest; with correlated ones it
    lowers the output error, as GPTQ does."""
    from slimquant.sdk import WeightArgs, fake_quantize_weight
    from slimquant_rotate import guard

    torch.manual_seed(0)
    args = WeightArgs(bits=4, symmetric=False, group_size=16)
    linear = torch.nn.Linear(64, 32, bias=False).double()
    w = linear.weight.detach()
    scaled_unit = torch.diag(torch.rand(64, dtype=torch.float64) + 0.5)
    assert torch.allclose(guard._feedback_rounding(w, scaled_unit, args),
                          fake_quantize_weight(w.float(), args).double(), atol=1e-6)
    x = torch.randn(256, 8, dtype=torch.float64) @ torch.randn(8, 64, dtype=torch.float64)
    x += 0.1 * torch.randn(256, 64, dtype=torch.float64)
    rtn = guard.error(linear, x, args, guard.Turn())
    feedback = guard.error(linear, x, args, guard.Turn(), feedback=True)
    assert feedback < 0.7 * rtn
