"""A finished decoder layer as tensors + JSON, and back: what a checkpoint stores per layer.

The tensors are the layer's whole state_dict as it is after quantization (FakeQuantLinear codes, scales, zero points,
activation qparams, and every float tensor a smoother rewrote: norms, biases). The JSON records what a state_dict
cannot: which Linears became FakeQuantLinears with which non-tensor settings, and which modules a smoother gave a bias.
"""

from __future__ import annotations

import torch
from torch import nn

from slimquant.model.structure import set_submodule
from slimquant.quant.actparams import ActQParams
from slimquant.quant.fake_linear import FakeQuantLinear
from slimquant.quant.outliers import WeightOutliers
from slimquant.quant.qweight import QuantizedScale, QuantizedWeight
from slimquant.quant.two_level import TwoLevelScale
from slimquant.smoothing import ensure_bias


def _fake_meta(fake: FakeQuantLinear) -> dict:
    act = fake.act
    return {
        "bits": fake.bits, "group_size": fake.group_size, "compute_dtype": str(fake.compute_dtype).split(".")[-1],
        "codebook_name": fake.codebook_name, "scale_block_size": fake.scale_block_size,
        "channel_bits": fake.channel_bits, "sparsity": fake.sparsity,
        "extras": [n[len("extra_"):] for n, _ in fake.named_buffers(recurse=False) if n.startswith("extra_")],
        "act": None if act is None else {"bits": act.bits, "symmetric": act.symmetric, "dynamic": act.dynamic},
    }


def layer_state(layer: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a finished layer: CPU copies, none sharing memory (safetensors refuses shared tensors)."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in layer.state_dict().items()}
    fakes = {name: _fake_meta(m) for name, m in layer.named_modules() if isinstance(m, FakeQuantLinear)}
    biased = sorted(name for name, m in layer.named_modules()
                    if not isinstance(m, FakeQuantLinear) and type(m).__name__.endswith("WithBias"))
    return tensors, {"fake_linears": fakes, "biased": biased}


def _rebuild_fake(tensors: dict[str, torch.Tensor], meta: dict) -> FakeQuantLinear:
    get = tensors.get
    stored = None
    if meta["scale_block_size"] is not None:
        stored = QuantizedScale(get("scale_codes"), get("scale_block_scale"), get("scale_offset"),
                                meta["scale_block_size"])
    two = None
    if meta["channel_bits"] is not None:
        two = TwoLevelScale(get("weight_group_scale"), get("weight_channel_scale"), meta["channel_bits"])
    outliers = None if "outlier_index" not in tensors else WeightOutliers(get("outlier_index"), get("outlier_value"))
    extras = {name: tensors[f"extra_{name}"] for name in meta["extras"]}
    qweight = QuantizedWeight(get("codes"), get("weight_scale"), get("weight_zero"), meta["bits"], meta["group_size"],
                              get("g_idx"), extras, get("codebook"), stored, outliers, meta["sparsity"], two,
                              meta["codebook_name"])
    act = meta["act"]
    if act is not None:
        act = ActQParams(act["bits"], act["symmetric"], act["dynamic"], get("input_scale"), get("input_zero"))
    return FakeQuantLinear(qweight, get("bias"), act, compute_dtype=getattr(torch, meta["compute_dtype"]),
                           input_transform=get("input_transform"))


def restore_layer_state(layer: nn.Module, tensors: dict[str, torch.Tensor], meta: dict, assign: bool = False) -> None:
    """Turn a float layer (as loaded) into the finished layer `layer_state` recorded; strict: every tensor must fit.
    assign=True puts the saved tensors in place of the layer's own (which may be on the meta device)."""
    for name, fake_meta in meta["fake_linears"].items():
        prefix = f"{name}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        set_submodule(layer, name, _rebuild_fake(own, fake_meta))
    for name in meta["biased"]:
        ensure_bias(layer.get_submodule(name))
    for key in tensors:  # a Linear a smoother gave a bias (nn.Linear takes one without a class change)
        owner, _, leaf = key.rpartition(".")
        module = layer.get_submodule(owner) if owner else layer
        if leaf == "bias" and isinstance(module, nn.Linear) and module.bias is None:
            ensure_bias(module)
    layer.load_state_dict(tensors, strict=True, assign=assign)
