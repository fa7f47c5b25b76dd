"""msModelSlim's use_kvcache_quant=True: the kv_cache section (C8), quantized by the cache plugin."""

import json

import torch
from test_msmodelslim_api import calib, tiny_llama

from slimquant.compat.msmodelslim import Calibrator, QuantConfig
from slimquant.runtime import kv_attention


def test_use_kvcache_quant_maps_onto_the_kv_cache_section():
    recipe = QuantConfig(w_bit=8, a_bit=8, mm_tensor=False, use_kvcache_quant=True).to_recipe()
    assert recipe.kv_cache.model_dump() == {"bits": 8, "strategy": "channel", "symmetric": False, "dynamic": False,
                                            "algorithm": None}
    assert QuantConfig(w_bit=8, a_bit=8, mm_tensor=False).to_recipe().kv_cache is None


def test_calibrator_quantizes_the_cache(tmp_path):
    model = tiny_llama()
    cfg = QuantConfig(w_bit=8, a_bit=8, mm_tensor=False, use_kvcache_quant=True)
    calibrator = Calibrator(model, cfg, calib_data=calib(), disable_level="L0", progress=False)
    calibrator.run()
    quantizers = kv_attention.quantizers(model)
    assert len(quantizers) == 2
    assert all(q.key_scale.shape == (2, 8) and q.key_zero is not None for q in quantizers.values())
    calibrator.save(str(tmp_path / "out"), save_type=["safe_tensor"])
    desc = json.loads(next((tmp_path / "out").glob("quant_model_description*.json")).read_text())
    assert desc["kv_cache_type"] == "C8" and desc["model.layers.0.self_attn.k_proj.kv_cache_scale"] == "C8"
    assert torch.isfinite(model(torch.randint(0, 128, (1, 8))).logits).all()
