import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimquant.compat.msmodelslim import Calibrator, QuantConfig
from slimquant.errors import CalibrationError, RecipeError
from slimquant.quant.fake_linear import FakeQuantLinear


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def calib():
    ids = [torch.randint(0, 128, (1, 16)) for _ in range(3)]
    return [[i, torch.ones_like(i)] for i in ids]  # msModelSlim's [input_ids, attention_mask] pairs


def test_w8a8_static_config_maps_onto_the_recipe():
    r = QuantConfig(w_bit=8, a_bit=8, act_method=3, mm_tensor=False, dev_type="cpu").to_recipe()
    s = r.base_scheme()
    assert s.type_name == "W8A8" and not s.activations.dynamic and s.weights.strategy.value == "channel"
    assert r.algorithms == [{"name": "minmax", "act_method": 3}]


def test_w4a16_per_group_and_per_token_dynamic():
    s = QuantConfig(w_bit=4, a_bit=16, w_sym=False, mm_tensor=False, group_size=64).to_recipe().base_scheme()
    assert (s.type_name, s.weights.group_size, s.weights.symmetric) == ("W4A16", 64, False)
    d = QuantConfig(w_bit=8, a_bit=8, is_dynamic=True, mm_tensor=False).to_recipe().base_scheme()
    assert d.type_name == "W8A8_DYNAMIC"


@pytest.mark.parametrize("kwargs,message", [
    ({"do_smooth": True}, "do_smooth"),
    ({"pr": 0.5}, "pr"),
    ({"w_bit": 9}, "bits"),
    ({"a_bit": 4}, "a_bit"),
    ({"w_method": "magic"}, "w_method"),
    ({"typo_arg": 1}, "typo_arg"),
    ({"disable_last_linear": False}, "lm_head"),
])
def test_unsupported_or_wrong_options_fail_clearly(kwargs, message):
    with pytest.raises(RecipeError, match=message):
        QuantConfig(**kwargs).to_recipe()


def test_calibrator_run_turns_the_model_into_the_fake_quantized_model():
    model = tiny_llama()
    cfg = QuantConfig(w_bit=8, a_bit=8, act_method=2, mm_tensor=False, disable_names=["model.layers.0.mlp.down_proj"])
    Calibrator(model, cfg, calib_data=calib(), disable_level="L0", progress=False).run()
    assert isinstance(model.model.layers[1].mlp.down_proj, FakeQuantLinear)
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert not isinstance(model.model.layers[0].mlp.down_proj, FakeQuantLinear)


def test_disable_level_leaves_the_worst_linears_in_float():
    data = calib()
    probe = tiny_llama()
    errors = Calibrator(probe, QuantConfig(w_bit=4, a_bit=16, mm_tensor=False), calib_data=data,
                        progress=False).run().linear_errors
    worst = sorted(errors, key=errors.get, reverse=True)[:2]
    model = tiny_llama()
    cal = Calibrator(model, QuantConfig(w_bit=4, a_bit=16, mm_tensor=False), calib_data=data,
                     disable_level="L2", progress=False)
    report = cal.run()
    assert cal.auto_disabled == worst
    assert all(report.plans[n] is None for n in worst)
    assert sum(p is None for p in report.plans.values()) == 2
    assert not isinstance(model.get_submodule(worst[0]), FakeQuantLinear)
    with pytest.raises(RecipeError, match="disable_level"):
        Calibrator(model, QuantConfig(w_bit=8, a_bit=16), calib_data=calib(), disable_level="level2")


def test_label_free_weight_only_and_empty_calibration():
    model = tiny_llama()
    Calibrator(model, QuantConfig(w_bit=8, a_bit=16, mm_tensor=False), calib_data=None, progress=False).run()
    assert isinstance(model.model.layers[0].self_attn.q_proj, FakeQuantLinear)
    with pytest.raises(CalibrationError, match="empty"):
        Calibrator(tiny_llama(), QuantConfig(w_bit=8, a_bit=8), calib_data=[])
    with pytest.raises(CalibrationError):
        Calibrator(tiny_llama(), QuantConfig(w_bit=8, a_bit=8), calib_data=None)  # static W8A8 needs data
