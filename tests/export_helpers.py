"""Shared by the export tests: a tiny Llama whose widths are not multiples of 32, quantized per recipe."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny_models import token_samples

import slimquant
from slimquant.export import save_quantized
from slimquant.export.names import sha256_file

# hidden 48 and intermediate 80 are not multiples of 32: the last group of every W4A16 g32 row is shorter
CONFIG = dict(vocab_size=256, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, attention_bias=True, mlp_bias=True)
W4G32 = {"bits": 4, "symmetric": False, "group_size": 32}
RECIPES = {
    "W8A8": {"scheme": "W8A8"},
    "W8A8_DYNAMIC": {"scheme": "W8A8_DYNAMIC"},
    "W4A16": {"scheme": "W4A16", "weights": W4G32},
    "mixed": {"scheme": "W8A8", "ignore": ["model.layers.0.mlp.gate_proj"], "overrides": [
        {"targets": ["*.down_proj"], "weights": W4G32, "weight_only": True},
        {"targets": ["*.up_proj"], "weights": {"bits": 3, "symmetric": True, "group_size": 32}, "weight_only": True},
        {"targets": ["*.o_proj"], "activations": {"bits": 8, "symmetric": False, "strategy": "channel"}},
        {"targets": ["*.v_proj"], "scheme": "W8A8_DYNAMIC"}]},
}


def float_llama(tied: bool = True, seed: int = 0, **overrides) -> torch.nn.Module:
    config = transformers.LlamaConfig(**{**CONFIG, **overrides}, tie_word_embeddings=tied)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


_CACHE: dict = {}


def base_model() -> torch.nn.Module:
    """The float model every export test quantizes (built once; tests deep-copy it before changing it)."""
    if "float" not in _CACHE:
        _CACHE["float"] = float_llama()
    return _CACHE["float"]


def quantized(float_model, kind: str):
    """(fake-quantized model, report) for one recipe; smoothing-like change to a norm so norms must round-trip."""
    if kind not in _CACHE:
        model = copy.deepcopy(float_model)
        recipe = {**RECIPES[kind], "model": {"device": "cpu"}, "runtime": {"progress": False}}
        report = slimquant.quantize(model, recipe, samples=token_samples(2, 16))
        with torch.no_grad():
            model.model.layers[1].input_layernorm.weight.mul_(1.5)
        _CACHE[kind] = (model, report)
    return _CACHE[kind]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(token_samples(1, 24, seed=7)[0]).logits


def saved(float_model, kind, tmp_path, **kwargs):
    model, report = quantized(float_model, kind)
    out = tmp_path / kind.lower()
    save_quantized(model, out, linear_types=report.linear_types(), **kwargs)
    return model, out


def description(out: Path) -> dict:
    (path,) = out.glob("quant_model_description_*.json")
    return json.loads(path.read_text())


def rewrite_weights(out: Path, mutate) -> None:
    """Change the (single) safetensors file and record its new checksum, as a buggy writer would."""
    (path,) = out.glob("quant_model_weight_*.safetensors")
    tensors = mutate(load_file(path))
    save_file(tensors, str(path))
    (desc_path,) = out.glob("quant_model_description_*.json")
    desc = json.loads(desc_path.read_text())
    desc["slimquant"]["files"][path.name] = sha256_file(path)
    desc_path.write_text(json.dumps(desc))
