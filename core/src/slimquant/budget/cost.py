"""What a Linear's quantized weight costs in storage: the codes plus the scales (and zero points) of its groups."""

from __future__ import annotations

from slimquant.config.scheme import Strategy, WeightArgs
from slimquant.quant.qweight import num_groups


def storage_bits(args: WeightArgs, out_features: int, in_features: int) -> int:
    """Code bits plus one scale (and, asymmetric, one zero point) per output channel and group, or per tensor."""
    codes = out_features * in_features * args.bits
    if args.strategy == Strategy.TENSOR:
        scales = 1
    elif args.strategy == Strategy.GROUP:
        scales = out_features * num_groups(in_features, args.group_size)
    else:
        scales = out_features
    scale_bits = 16 if args.scale_dtype == "float16" else 32
    return codes + scales * scale_bits * (1 if args.symmetric else 2)


def describe(args: WeightArgs) -> str:
    """A short label: 'w4 g128 asym', 'w8 ch sym'."""
    where = {Strategy.GROUP: f"g{args.group_size}", Strategy.CHANNEL: "ch", Strategy.TENSOR: "tensor"}[args.strategy]
    return f"w{args.bits} {where} {'sym' if args.symmetric else 'asym'}"
