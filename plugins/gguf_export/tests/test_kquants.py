"""K-quant grids (kquant) and their gguf blocks: Q4_K / Q6_K files dequantize (gguf.quants) to the fake-quantized
weights (Q6_K exactly, Q4_K to float32 rounding), transformers loads them to the same logits, the super-block
integers follow llama.cpp's rule, GPTQ runs on the grid, and what the grid cannot hold is refused."""

import gguf
import pytest
import torch
import transformers
from gguf.quants import dequantize

from slimquant import quantize
from slimquant.errors import OutputError, RecipeError
from slimquant.export import save_quantized
from slimquant.plugins import ALGORITHMS
from slimquant.quant.fake_linear import FakeQuantLinear
from slimquant.testing import check_declaration, token_samples
from slimquant_gguf import unpermute_rows
from slimquant_gguf.kblocks import TOLERANCE, k_problem, super_block_integers
from slimquant_gguf.kquant_plugin import KQuantPlugin
from slimquant_gguf.kquants import Q4KGrid, Q6KGrid
from slimquant_gguf.llama import gguf_name, rope_heads

IDS = token_samples(1, 16, seed=99)[0]
SAMPLES = token_samples(8, 64)


def wide_llama(hidden: int = 256, seed: int = 0):
    """A tiny Llama whose Linears have whole 256-column super-blocks (down_proj always; the rest when hidden is)."""
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def file_weights(path, model) -> dict[str, tuple[str, torch.Tensor]]:
    """Per quantized Linear: its gguf type and the weight gguf-py dequantizes from the file (q/k rows un-permuted)."""
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantLinear):
            t = tensors[gguf_name(f"{name}.weight", model.config)]
            values = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(module.weight.shape)
            heads = rope_heads(f"{name}.weight", model.config)
            out[name] = (t.tensor_type.name, values if heads is None else unpermute_rows(values, heads))
    return out


def test_contract():
    check_declaration(KQuantPlugin, ALGORITHMS)


@pytest.mark.parametrize(("bits", "kind"), [(4, "Q4_K"), (6, "Q6_K")])
def test_k_blocks_dequantize_to_the_fake_quantized_weights(tmp_path, bits, kind):
    model = wide_llama()
    quantize(model, {"weights": {"bits": bits}, "algorithms": ["kquant"], "runtime": {"progress": False}})
    expected = model(IDS).logits
    save_quantized(model, tmp_path / "out", save_type=["gguf"])
    weights = file_weights(tmp_path / "out" / "model.gguf", model)
    assert len(weights) == 14
    for name, (found, values) in weights.items():
        module = model.get_submodule(name)
        assert found == kind, name
        if bits == 6:
            assert torch.equal(values, module.weight), name
        else:  # d * sc * q - dmin * m against (code - zero) * scale: the same numbers, float32 rounding apart
            step = module.qweight.scale.repeat_interleave(32, dim=1).abs()
            assert bool(((values - module.weight).abs() <= TOLERANCE * step).all()), name
            assert float((values == module.weight).float().mean()) > 0.2, name
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), gguf_file="model.gguf").eval()
    assert torch.allclose(loaded(IDS).logits, expected, atol=1e-5, rtol=0)


def test_super_block_integers_follow_llama_cpps_rule():
    torch.manual_seed(0)
    w = torch.randn(6, 512) * torch.rand(6, 512)
    w[2, :256] = 0  # a super-block of zeros
    w[3, 256:] = w[3, 256:].abs()  # one of positive weights only: minimums 0
    for grid, bits in ((Q4KGrid(), 4), (Q6KGrid(), 6)):
        qw = grid.round_to_nearest(w, grid.group)
        ints = super_block_integers(qw)
        assert not isinstance(ints, str), ints
        assert torch.equal(ints["d"].half().float(), ints["d"]) and bool((ints["d"] != 0).all())
        if bits == 4:
            assert bool((ints["sc"].amax(-1) == 63).all())
            assert bool(((ints["m"] >= 0) & (ints["m"] <= 63)).all()) and bool((ints["m"][3, 1] == 0).all())
        else:
            assert bool((ints["sc"].amin(-1) == -128).all()) and bool((ints["sc"] <= 127).all())
        assert bool((qw.dequantize()[2, :256] == 0).all())
        assert k_problem(qw) is None
        assert float((qw.dequantize() - w).pow(2).mean()) < float(w.pow(2).mean()) * (0.01 if bits == 4 else 0.001)


def test_gptq_and_awq_on_the_k_grid_export_q4_k(tmp_path, monkeypatch):
    def error(algorithms):
        model = wide_llama().requires_grad_(False)
        reference = [model(s).logits for s in SAMPLES]
        quantize(model, {"weights": {"bits": 4}, "algorithms": algorithms, "runtime": {"progress": False}},
                 samples=SAMPLES)
        return model, sum(float((model(s).logits - r).pow(2).mean()) for s, r in zip(SAMPLES, reference, strict=True))

    awq_plugin = pytest.importorskip("slimquant_awq.plugin")
    grids = []
    original = awq_plugin.fake_quantize_weight
    monkeypatch.setattr(awq_plugin, "fake_quantize_weight",
                        lambda w, args, grid=None: grids.append(grid) or original(w, args, grid=grid))
    _, rounded = error(["kquant"])
    for algorithms in (["kquant", {"name": "gptq", "static_groups": True}], ["awq", "kquant"]):
        model, found = error(algorithms)
        if "awq" in algorithms:  # its candidates and clipping are judged on the grid the weights end on
            assert grids and all(isinstance(g, Q4KGrid) for g in grids)
        else:
            assert found < rounded
        assert all(k_problem(m.qweight) is None for m in model.modules() if isinstance(m, FakeQuantLinear))
        save_quantized(model, tmp_path / algorithms[0], save_type=["gguf"])
        kinds = {kind for kind, _ in file_weights(tmp_path / algorithms[0] / "model.gguf", model).values()}
        assert kinds == {"Q4_K"}, algorithms


def test_an_override_mixes_k_types_with_uniform_blocks(tmp_path):
    """llama.cpp's Q4_K_M on a model whose hidden size is not whole super-blocks: Q5_0 there, Q4_K / Q6_K on
    down_proj; GPTQ chooses every code."""
    model = wide_llama(hidden=288)
    recipe = {"weights": {"bits": 5, "symmetric": True, "group_size": 32, "scale_dtype": "float16"},
              "algorithms": [{"name": "gptq", "static_groups": True}],
              "overrides": [{"targets": ["*.0.mlp.down_proj"], "weights": {"bits": 4}, "grid": "kquant"},
                            {"targets": ["*.1.mlp.down_proj"], "weights": {"bits": 6}, "grid": "kquant"}],
              "runtime": {"progress": False}}
    quantize(model, recipe, samples=SAMPLES)
    save_quantized(model, tmp_path / "out", save_type=["gguf"])
    kinds = {name: kind for name, (kind, _) in file_weights(tmp_path / "out" / "model.gguf", model).items()}
    assert kinds.pop("model.layers.0.mlp.down_proj") == "Q4_K"
    assert kinds.pop("model.layers.1.mlp.down_proj") == "Q6_K"
    assert set(kinds.values()) == {"Q5_0"}


@pytest.mark.parametrize(("recipe", "message"), [
    ({"weights": {"bits": 5}}, "weights.bits: kquant has Q4_K (bits: 4) and Q6_K (bits: 6), not 5-bit"),
    ({"weights": {"bits": 4, "group_size": 64}}, "weights.group_size: q4_k has groups of 32"),
    ({"weights": {"bits": 6, "scale_dtype": "float16"}}, "weights.scale_dtype: q6_k's scales are float16 d"),
    ({"weights": {"bits": 4}, "algorithms": ["kquant", "gptq"]},
     "kquant: its grid cannot hold group scales chosen part way through a sweep, from each group's own columns "
     "(sweep_groups), which gptq produces (static_groups: false)"),
    ({"weights": {"bits": 4}, "overrides": [{"targets": ["*down_proj"], "grid": "gptq"}]},
     "overrides.grid: 'gptq' provides no weight grid"),
])
def test_plan_time_refusals_name_the_field(recipe, message):
    recipe = {"algorithms": ["kquant"], **recipe, "runtime": {"progress": False}}
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        quantize(wide_llama(), recipe, samples=SAMPLES)


def test_linears_without_whole_super_blocks_are_refused_before_quantizing():
    model = wide_llama(hidden=288)
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(RecipeError, match="q_proj has 288 input channels, not whole 256-column super-blocks"):
        quantize(model, {"weights": {"bits": 4}, "algorithms": ["kquant"], "runtime": {"progress": False}})
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)


def test_weights_off_the_k_grid_are_refused_at_export(tmp_path):
    model = wide_llama()
    quantize(model, {"weights": {"bits": 4, "symmetric": False, "group_size": 32}, "algorithms": ["hqq"],
                     "runtime": {"progress": False}})
    with pytest.raises(OutputError, match="not Q4_K's"):
        save_quantized(model, tmp_path / "out", save_type=["gguf"])
    assert not (tmp_path / "out" / "model.gguf").exists()


def test_export_command_writes_k_blocks_from_a_saved_output(tmp_path):
    """The saved output (msModelSlim layout) keeps the scales and fractional zero points exactly, so `slimquant
    export --to gguf` finds the same super-block integers."""
    from typer.testing import CliRunner

    from slimquant.cli import app

    model = wide_llama()
    quantize(model, {"weights": {"bits": 4}, "algorithms": ["kquant"], "runtime": {"progress": False}})
    wide_llama().save_pretrained(tmp_path / "float")
    save_quantized(model, tmp_path / "saved")
    save_quantized(model, tmp_path / "direct", save_type=["gguf"])
    result = CliRunner().invoke(app, ["export", str(tmp_path / "saved"), "--to", "gguf", "--output",
                                      str(tmp_path / "converted"), "--model", str(tmp_path / "float")])
    assert result.exit_code == 0, result.output
    direct = file_weights(tmp_path / "direct" / "model.gguf", model)
    converted = file_weights(tmp_path / "converted" / "model.gguf", model)
    assert all(converted[n][0] == "Q4_K" and torch.equal(converted[n][1], direct[n][1]) for n in direct)
