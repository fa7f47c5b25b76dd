"""What one quantized Linear is, in compressed-tensors' vocabulary, and what of it the format cannot hold.

The same description is made from a plan (the `check` hook, before quantizing) and from a FakeQuantLinear (at
export, which also serves `slimquant export` on an output quantized earlier), so both refuse the same things.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimquant.sdk import FakeQuantLinear

PACKED = "pack-quantized"  # weight-only: codes packed into int32
INT = "int-quantized"  # weights and activations quantized: int8 codes


@dataclass(frozen=True)
class WeightSpec:
    bits: int
    symmetric: bool
    group_size: int | None  # None: one scale per output channel
    actorder: bool = False  # groups permuted over the input channels (weight_g_idx)

    def args(self) -> dict:
        args = {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric, "dynamic": False,
                "strategy": "group" if self.group_size else "channel", "group_size": self.group_size,
                "observer": "minmax"}
        if self.actorder:
            args["actorder"] = "group"
        return args


@dataclass(frozen=True)
class ActSpec:
    bits: int
    symmetric: bool
    dynamic: bool
    per_channel: bool = False

    def args(self) -> dict:
        return {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric, "dynamic": self.dynamic,
                "strategy": "token" if self.dynamic else "tensor", "group_size": None,
                "observer": None if self.dynamic else "minmax"}


@dataclass(frozen=True)
class LinearSpec:
    weights: WeightSpec
    act: ActSpec | None

    @property
    def format(self) -> str:
        return PACKED if self.act is None else INT

    def key(self) -> tuple:
        return self.format, tuple(sorted(self.weights.args().items())), \
            None if self.act is None else tuple(sorted(self.act.args().items()))


def spec_from_plan(plan) -> LinearSpec:
    w, a = plan.scheme.weights, plan.scheme.activations
    group = w.group_size if w.strategy == "group" else None  # a per-tensor scale is stored repeated per channel
    act = None if a is None else ActSpec(a.bits, a.symmetric, a.dynamic, a.strategy == "channel")
    return LinearSpec(WeightSpec(w.bits, w.symmetric, group), act)


def spec_from_module(module: FakeQuantLinear) -> LinearSpec:
    qw, act = module.qweight, module.act_qparams
    weights = WeightSpec(qw.bits, qw.symmetric, qw.group_size, qw.permuted_groups)
    if act is None:
        return LinearSpec(weights, None)
    per_channel = not act.dynamic and act.scale.numel() != 1
    return LinearSpec(weights, ActSpec(act.bits, act.symmetric, act.dynamic, per_channel))


def spec_problems(spec: LinearSpec, name: str | None, shape: tuple[int, int] | None) -> list[str]:
    """What the scheme asks that compressed-tensors cannot hold."""
    problems = []
    group = spec.weights.group_size
    if group and shape is not None and shape[1] % group:
        problems.append(f"weights.group_size: {name} has {shape[1]} input channels, not a multiple of group_size "
                        f"{group}; compressed-tensors' group strategy needs groups of equal size")
    if spec.act is not None and spec.act.per_channel:
        problems.append("activations.strategy: compressed-tensors has no static per-input-channel activation "
                        "scales; use strategy tensor (static) or token (dynamic)")
    return problems


def exact_in(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return bool(torch.equal(t.to(dtype).to(t.dtype), t))


def weight_problems(name: str, module: FakeQuantLinear, dtype: torch.dtype) -> list[str]:
    """What only the quantized tensors show: groups and scales the format cannot hold exactly (the features it
    does not hold are refused by the core before export)."""
    qw, problems = module.qweight, []
    if qw.permuted_groups:
        counts = torch.bincount(qw.g_idx.cpu().long(), minlength=qw.scale.shape[1])
        if not bool((counts == qw.group_size).all()):
            problems.append(f"{name}: g_idx puts unequal numbers of input channels in its groups; compressed-"
                            f"tensors' weight_g_idx needs exactly group_size ({qw.group_size}) channels per group")
    if not exact_in(qw.scale, dtype):
        problems.append(f"{name}: weight_scale is not exactly representable in {dtype}, the dtype in which "
                        "compressed-tensors loads and applies scales; export the model in float32")
    act = module.act_qparams
    if act is not None and not act.dynamic and not exact_in(act.scale, dtype):
        problems.append(f"{name}: input_scale is not exactly representable in {dtype}; export the model in float32")
    return problems
