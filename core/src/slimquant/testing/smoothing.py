"""Checks for smoothing plugins (SmoothQuant-style rewrites), slimquant's own and third parties':

    from slimquant.testing.smoothing import check_smoothing_keeps_float_model, w8a8_static_error

    def test_keeps_the_float_model():
        check_smoothing_keeps_float_model([{"name": "mysmoother"}], "llama")

    def test_helps_w8a8():
        assert w8a8_static_error([{"name": "mysmoother"}]) < 0.7 * w8a8_static_error([])
"""

from __future__ import annotations

import torch

from slimquant.testing.contract import ContractError
from slimquant.testing.models import tiny_model, token_samples

EQUIVALENCE_ARCHS = ("llama", "qwen2", "mistral", "gemma", "opt", "phi", "gpt2", "mixtral")
OUTLIER_CHANNELS = [3, 17, 40]


def smoothing_recipe(algorithms: list, scheme: str = "W8A8", **extra) -> dict:
    return {"scheme": scheme, "algorithms": algorithms, "model": {"device": "cpu"}, "runtime": {"progress": False},
            **extra}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def changed_parameters(before: dict, model) -> int:
    after = model.state_dict()
    return sum(1 for k, v in after.items() if k not in before or not torch.allclose(v, before[k]))


def check_smoothing_keeps_float_model(algorithms: list, arch: str, tolerance: float = 1e-4) -> int:
    """Smoothing alone (`slimquant.smooth_only`) on a tiny model of `arch` leaves its logits unchanged to
    `tolerance` and rewrites something; returns how many state-dict tensors it changed."""
    import slimquant
    from slimquant.model.structure import normalize_linears

    model = tiny_model(arch)
    normalize_linears(model)  # GPT-2 Conv1D -> Linear first, so parameters compare one to one
    ids = token_samples(1, 24, seed=7)[0]
    reference = logits(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slimquant.smooth_only(model, smoothing_recipe(algorithms), samples=token_samples(4, 32))
    error = relative_error(logits(model, ids), reference)
    if not error < tolerance:
        raise ContractError(f"smoothing {algorithms} changed {arch}'s logits by {error:.2e} (relative)")
    changed = changed_parameters(before, model)
    if not changed:
        raise ContractError(f"smoothing {algorithms} rewrote nothing on {arch}")
    return changed


def outlier_llama():
    """A tiny Llama whose norms emit a few huge channels, as real LLMs do."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[OUTLIER_CHANNELS] *= 60.0
    return model


def w8a8_static_error(smoothers: list) -> float:
    """The summed relative logit error of `outlier_llama` quantized W8A8 static (min-max ranges) after `smoothers`."""
    import slimquant

    model = outlier_llama()
    ids = token_samples(4, 32, seed=3)
    reference = [logits(model, i) for i in ids]
    slimquant.quantize(model, smoothing_recipe(smoothers + [{"name": "minmax", "act_method": 1}]),
                       samples=token_samples(8, 32))
    return sum(relative_error(logits(model, i), r) for i, r in zip(ids, reference, strict=True))
