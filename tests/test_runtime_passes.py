"""How many times the runtime runs each decoder layer over the calibration data: round-to-nearest weight-only
quantization needs no observation pass; calibrated activations and GPTQ do."""

import pytest
from tiny_models import tiny_model, token_samples

import slimquant

SAMPLES = 6
ERROR_SAMPLES = 2


def layer_calls(recipe: dict, module: str = "", batch_tokens: int = 8, samples: bool = True) -> int:
    """Calls of layer 1 (or one of its modules); by default one 8-token sample per calibration batch."""
    model = tiny_model("llama")
    layer = model.model.layers[1].get_submodule(module)  # layer 0 also sees the catcher's call
    calls = []
    layer.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0] if args else 1))
    runtime = {"progress": False, "error_samples": ERROR_SAMPLES, "batch_tokens": batch_tokens}
    full = {**recipe, "model": {"device": "cpu"}, "runtime": runtime}
    slimquant.quantize(model, full, samples=token_samples(SAMPLES, 8) if samples else None)
    return len(calls)


def test_data_free_weight_only_runs_nothing():
    assert layer_calls({"scheme": "W8A16"}, samples=False) == 0
    assert layer_calls({"scheme": "W4A16", "algorithms": ["minmax"]}, samples=False) == 0


def test_samples_of_one_length_are_batched():
    # 6 samples of 8 tokens in batches of 24 tokens: 2 batches; the first covers the 2 error samples
    assert layer_calls({"scheme": "W8A8"}, batch_tokens=24) == 2 + 2


def test_round_to_nearest_weight_only_skips_the_observation_pass():
    # float output on the error samples, then the quantized layer on every sample
    assert layer_calls({"scheme": "W8A16"}) == ERROR_SAMPLES + SAMPLES


def test_static_activations_are_observed_first():
    assert layer_calls({"scheme": "W8A8"}) == SAMPLES + SAMPLES


def test_gptq_observes_each_sequential_group():
    pytest.importorskip("slimquant_gptq")
    # one traced call finds the groups (qkv, o, gate/up, down); each is re-observed; then the quantized pass
    recipe = {"scheme": "W4A16", "algorithms": [{"name": "gptq", "true_sequential": True}]}
    assert layer_calls(recipe) == 1 + 4 * SAMPLES + SAMPLES


def test_gptq_by_default_observes_once():
    pytest.importorskip("slimquant_gptq")
    assert layer_calls({"scheme": "W4A16", "algorithms": ["gptq"]}) == SAMPLES + SAMPLES


def test_observation_stops_once_the_group_has_seen_its_inputs():
    pytest.importorskip("slimquant_gptq")
    # the MLP runs for: the trace, the error samples of the first (q/k/v) pass, the gate/up pass (which stops
    # before down_proj), the down pass and the quantized pass; the q/k/v and o passes stop before it
    recipe = {"scheme": "W4A16", "algorithms": [{"name": "gptq", "true_sequential": True}]}
    assert layer_calls(recipe, "mlp") == 1 + ERROR_SAMPLES + 3 * SAMPLES


def down_proj_runs(recipe: dict) -> int:
    """How many calibration samples layer 1's float down_proj computes an output for."""
    model = tiny_model("llama")
    runs = []
    model.model.layers[1].mlp.down_proj.register_forward_hook(lambda module, args, out: runs.append(out.shape[0]))
    runtime = {"progress": False, "error_samples": ERROR_SAMPLES, "batch_tokens": 8}  # one sample per batch
    slimquant.quantize(model, {**recipe, "model": {"device": "cpu"}, "runtime": runtime},
                       samples=token_samples(SAMPLES, 8))
    return sum(runs)


def test_an_observer_without_need_of_the_output_spares_the_last_linear(monkeypatch):
    gptq = pytest.importorskip("slimquant_gptq.plugin")
    recipe = {"scheme": "W4A16", "algorithms": ["gptq"]}
    # gptq declares observes_output = False: in the observation pass down_proj runs only where the layer's float
    # output is kept (the error samples); the per-Linear error measurement runs it once more on those
    assert down_proj_runs(recipe) == ERROR_SAMPLES + ERROR_SAMPLES
    monkeypatch.setattr(gptq.GPTQPlugin, "observes_output", True)
    assert down_proj_runs(recipe) == SAMPLES + ERROR_SAMPLES
