"""What a fake-quantized model becomes on disk: msModelSlim tensor keys, their types, and per-Linear metadata.

Per quantized Linear `<name>` (a FakeQuantLinear):

- `<name>.weight`: the integer codes, int8 [out, in] in the signed range; 4-bit and narrower codes are packed
  two per byte (uint8 [out, ceil(in/2)], layout in `slimquant.export.packing`) unless packing is turned off;
- `<name>.weight_scale`, `<name>.weight_offset`: float32 [out, groups] with groups = ceil(in / group_size)
  (1 per channel); the last group may be shorter. Dequantization is (weight - weight_offset) * weight_scale,
  msModelSlim's convention; weight_offset is all zeros for symmetric weights;
- `<name>.g_idx`: int32 [in], only when the input channels are not grouped contiguously;
- `<name>.weight_codebook`: float32 [2^bits], only on a codebook grid (NF4): a code c dequantizes to
  weight_codebook[c + 2^(bits-1)] * weight_scale; such a grid has no zero point, so weight_offset is not written;
  meta `codebook_name` names the codebook when its grid does ("nf4", "fp4");
  elsewhere zero points may be fractional;
- scales stored quantized (`QuantizedScale`, bitsandbytes' double quantization; meta `scale_block` > 0):
  `<name>.weight_scale` is then int8 [out, groups], `<name>.weight_scale_scale` float32 [ceil(out * groups /
  scale_block)] and `<name>.weight_scale_offset` float32 [1], and the scale is weight_scale * weight_scale_scale[k //
  scale_block] + weight_scale_offset for the k-th scale in row-major order;
- `<name>.weight_outlier_index` (int32/int64 [k], flat row-major positions) and `<name>.weight_outlier_value`
  (float16/bfloat16 [k]): a weight's outliers (`QuantizedWeight.outliers`), added to the dequantized codes
  (meta `outliers`: k);
- a pruned weight (`QuantizedWeight.sparsity`, meta `sparsity`: "unstructured" or "N:M") keeps its mask in its codes
  (pruned weights dequantize to 0) and its type gains msModelSlim's sparse suffix: W8A8 becomes W8A8S;
- two-level scales (`QuantizedWeight.two_level`, msModelSlim W4A8_DYNAMIC per group; meta `channel_bits`):
  `<name>.weight_scale` / `<name>.weight_offset` float32 [out, 1] (the channel level, offsets zero) and
  `<name>.weight_scale_second` / `<name>.weight_offset_second` float32 [out, groups]; a code dequantizes to
  weight * (weight_scale_second * weight_scale) of its group;
- `<name>.<extra>`: every algorithm-specific tensor of QuantizedWeight.extras;
- `<name>.bias`: the float bias, when the Linear has one;
- static activations: `<name>.input_scale`, `<name>.input_offset` (float32, [1] per tensor or [in] per
  channel; x_q = round(x / input_scale) + input_offset), and when the integer kernel applies (per-tensor input
  scale, one symmetric weight group per channel) `<name>.deq_scale` = input_scale * weight_scale[:, 0]
  (float32 [out]) and `<name>.quant_bias` (int32 [out]), computed in float64 as

      quant_bias[o] = round(bias[o] / deq_scale[o]) - input_offset * sum_k weight[o, k]

  so that (x_q @ weight.T + quant_bias) * deq_scale == x_dequant @ W_dequant.T + bias up to bias rounding.

Every other state-dict tensor (embeddings, norms, lm_head, float Linears) keeps its name and dtype, type FLOAT.
A tensor sharing storage with an earlier one (tied lm_head) is stored once and listed under "tied".

The description's `slimquant` section (`slimquant.export.description`) also records the architecture
(config.model_type, config.architectures) and `float_tensors`, the state-dict keys of the float model the
output is for, so that a loader can refuse a model of another architecture whose shapes happen to agree.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from slimquant.errors import OutputError
from slimquant.export import kv_cache
from slimquant.export.description import FORMAT_VERSION, parse_output_meta
from slimquant.export.packing import MAX_PACKED_BITS, PACK_INT4, pack_int4
from slimquant.quant.fake_linear import FakeQuantLinear
from slimquant.quant.qweight import contiguous_g_idx

INT32 = (-(2**31), 2**31 - 1)
SPARSE_SUFFIX = "S"  # msModelSlim: "W8A8S" for sparse quantization


@dataclass
class Layout:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)
    owner: dict[str, str | None] = field(default_factory=dict)  # key -> quantized Linear name (None: float)
    linears: dict[str, dict] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    model_quant_type: str = "FLOAT"
    model_type: str | None = None
    architectures: list[str] | None = None
    float_tensors: list[str] = field(default_factory=list)
    kv_cache: dict | None = None  # `slimquant.export.kv_cache` metadata, when the attention cache is quantized

    def add(self, key: str, tensor: torch.Tensor, kind: str, owner: str | None = None) -> None:
        if key in self.tensors:
            raise OutputError(f"tensor key {key!r} would be written twice (an extra tensor clashes with it?)")
        self.tensors[key] = tensor.detach().cpu().contiguous()
        self.types[key] = kind
        self.owner[key] = owner

    def quant_type_lower(self) -> str:
        return self.model_quant_type.lower()


def linear_type(module: FakeQuantLinear) -> str:
    """W8A16, W4A16, W8A8, W8A8_DYNAMIC, ... as `Scheme.type_name` spells them."""
    act = module.act
    sparse = SPARSE_SUFFIX if module.sparsity is not None else ""
    if act is None:
        return f"W{module.bits}A16{sparse}"
    return f"W{module.bits}A{act.bits}{'_DYNAMIC' if act.dynamic else ''}{sparse}"


def int_kernel_params(w_scale: torch.Tensor, w_zero: torch.Tensor | None, act) -> tuple[torch.Tensor, float] | None:
    """deq_scale and the input offset, when an int8 x int8 kernel can run this Linear (else None)."""
    if act.scale.numel() != 1 or w_scale.shape[1] != 1 or w_zero is not None:
        return None
    deq = (act.scale.float().reshape(()) * w_scale[:, 0].float()).contiguous()
    offset = 0.0 if act.zero is None else float(act.zero.reshape(()))
    return deq, offset


def quant_bias(name: str, codes: torch.Tensor, bias: torch.Tensor | None, deq: torch.Tensor,
               offset: float) -> torch.Tensor:
    correction = codes.to(torch.int64).sum(dim=1) * int(round(offset))
    folded = torch.zeros_like(correction) if bias is None else torch.round(bias.double() / deq.double()).to(torch.int64)
    qb = folded - correction
    if qb.numel() and (int(qb.min()) < INT32[0] or int(qb.max()) > INT32[1]):
        raise OutputError(f"{name}: quant_bias overflows int32 (bias / deq_scale too large); "
                          "leave this Linear in float or quantize its input per token")
    return qb.to(torch.int32)


def _add_linear(layout: Layout, name: str, module: FakeQuantLinear, kind: str, pack: bool) -> None:
    qw = module.qweight
    out_features, in_features = qw.shape
    packed = pack and qw.bits <= MAX_PACKED_BITS
    own = lambda key, t: layout.add(f"{name}.{key}", t, kind, name)  # noqa: E731
    own("weight", pack_int4(qw.codes.cpu()) if packed else qw.codes)
    stored = qw.scale_quant
    two = qw.two_level
    if two is not None:  # msModelSlim W4A8_DYNAMIC: the channel level first, each group's scale "second"
        own("weight_scale", two.channel_scale.float())
        own("weight_scale_second", two.group_scale.float())
        own("weight_offset_second", torch.zeros_like(two.group_scale, dtype=torch.float32))
    elif stored is None:
        own("weight_scale", qw.scale.float())
    else:
        own("weight_scale", stored.codes)
        own("weight_scale_scale", stored.block_scale.float())
        own("weight_scale_offset", stored.offset.float())
    if two is not None:
        own("weight_offset", torch.zeros_like(two.channel_scale, dtype=torch.float32))
    elif qw.codebook is None:
        own("weight_offset", torch.zeros_like(qw.scale, dtype=torch.float32) if qw.zero is None else qw.zero.float())
    else:
        own("weight_codebook", qw.codebook.float())
    g_idx = qw.g_idx
    if g_idx is not None and torch.equal(g_idx.cpu().long(), contiguous_g_idx(in_features, qw.group_size).long()):
        g_idx = None
    if g_idx is not None:
        own("g_idx", g_idx.to(torch.int32))
    if qw.outliers is not None:
        own("weight_outlier_index", qw.outliers.index)
        own("weight_outlier_value", qw.outliers.values)
    for extra, tensor in qw.extras.items():
        own(extra, tensor)
    if module.bias is not None:
        own("bias", module.bias)
    act = module.act_qparams
    act_meta, int_kernel = None, False
    if act is not None:
        act_meta = {"bits": act.bits, "symmetric": act.symmetric, "dynamic": act.dynamic}
        if not act.dynamic:
            act_meta["per_channel"] = act.scale.numel() != 1
            own("input_scale", act.scale.float().reshape(-1))
            zero = torch.zeros_like(act.scale) if act.zero is None else act.zero
            own("input_offset", zero.float().reshape(-1))
            params = int_kernel_params(qw.scale, qw.zero, act)
            if params is not None:
                deq, offset = params
                own("deq_scale", deq)
                own("quant_bias", quant_bias(name, qw.codes.cpu(), None if module.bias is None
                                             else module.bias.detach().cpu(), deq.cpu(), offset))
                int_kernel = True
    layout.linears[name] = {
        "type": kind, "bits": qw.bits, "symmetric": qw.symmetric, "group_size": qw.group_size or 0,
        "in_features": in_features, "out_features": out_features, "groups": int(qw.scale.shape[1]),
        "pack": PACK_INT4 if packed else None, "g_idx": g_idx is not None, "extras": list(qw.extras),
        "bias": module.bias is not None, "act": act_meta, "int_kernel": int_kernel, "codebook": qw.codebook is not None,
    }
    if stored is not None:
        layout.linears[name]["scale_block"] = stored.block_size
    if qw.codebook is not None and qw.codebook_name:
        layout.linears[name]["codebook_name"] = qw.codebook_name
    if two is not None:
        layout.linears[name]["channel_bits"] = two.channel_bits
    if qw.outliers is not None:
        layout.linears[name]["outliers"] = int(qw.outliers.index.numel())
    if qw.sparsity is not None:
        layout.linears[name]["sparsity"] = qw.sparsity


def float_tensor_names(model: nn.Module, prefix: str = "") -> list[str]:
    """The state-dict keys `model` has in float: a quantized Linear counts as `<name>.weight` (and its bias).
    `prefix` is the module's own name when it is part of a model (a decoder layer's "model.layers.3")."""
    fakes = {n for n, m in model.named_modules(prefix=prefix) if isinstance(m, FakeQuantLinear)}
    names = []
    for key in model.state_dict(prefix=_dotted(prefix), keep_vars=True):
        owner, _, leaf = key.rpartition(".")
        names.append(f"{owner}.weight" if owner in fakes and leaf != "bias" else key)
    return list(dict.fromkeys(names))


def _dotted(prefix: str) -> str:
    return f"{prefix}." if prefix else ""


def _architecture(model: nn.Module) -> tuple[str | None, list[str] | None]:
    config = getattr(model, "config", None)
    architectures = getattr(config, "architectures", None)
    return getattr(config, "model_type", None), list(architectures) if architectures else None


def _storage_key(t: torch.Tensor):
    return (t.device.type, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None


def _check_linear_types(fakes: dict[str, FakeQuantLinear], linear_types: dict[str, str]) -> None:
    kinds = {n: linear_type(m) for n, m in fakes.items()}
    for name, kind in linear_types.items():
        if kind == "FLOAT":
            if name in fakes:
                raise OutputError(f"linear_types says {name} is FLOAT, but the model holds it quantized "
                                  f"({kinds[name]})")
            continue
        if name not in fakes:
            raise OutputError(f"linear_types says {name} is {kind}, but the model holds no quantized Linear there "
                              "(was the model quantized with this report?)")
        if kinds[name] not in (kind, kind + SPARSE_SUFFIX):  # the plan's scheme does not know of pruning
            raise OutputError(f"{name}: linear_types says {kind}, the quantized Linear is {kinds[name]}")


def build_layout(model: nn.Module, linear_types: dict[str, str] | None = None, pack: bool = True) -> Layout:
    fakes = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    _check_linear_types(fakes, linear_types or {})
    model_type, architectures = _architecture(model)
    layout = Layout(model_type=model_type, architectures=architectures)
    add_module(layout, model, pack=pack)
    finish_quant_type(layout)
    layout.kv_cache, cache = kv_cache.cache_tensors(model)
    for key, tensor in cache.items():
        layout.add(key, tensor, kv_cache.cache_type(layout.kv_cache["bits"]))
    return layout


def add_module(layout: Layout, module: nn.Module, prefix: str = "", pack: bool = True,
               seen: dict[tuple, str] | None = None) -> None:
    """Add `module`'s tensors (named under `prefix`, its name in the model) to `layout`: quantized Linears in their
    stored form, everything else as FLOAT; a tensor sharing storage with one already in `seen` is listed as tied."""
    fakes = {n: m for n, m in module.named_modules(prefix=prefix) if isinstance(m, FakeQuantLinear)}
    seen = {} if seen is None else seen
    for key, tensor in module.state_dict(prefix=_dotted(prefix), keep_vars=True).items():
        owner = key.rpartition(".")[0]
        if owner in fakes:
            if owner not in layout.linears:
                _add_linear(layout, owner, fakes[owner], linear_type(fakes[owner]), pack)
            continue
        storage = _storage_key(tensor)
        if storage is not None and storage in seen:
            layout.tied[key] = seen[storage]
            continue
        if storage is not None:
            seen[storage] = key
        layout.add(key, tensor, "FLOAT")
    layout.float_tensors += float_tensor_names(module, prefix)


def finish_quant_type(layout: Layout) -> None:
    """The model's type: the most common type of its quantized Linears (FLOAT when there is none)."""
    counts = Counter(linear["type"] for linear in layout.linears.values())
    if counts:
        layout.model_quant_type = counts.most_common(1)[0][0]


def description(layout: Layout, files: dict[str, str]) -> dict:
    """The quant_model_description JSON: msModelSlim's flat {key: type} plus slimquant's metadata."""
    group_sizes = {lin["group_size"] for lin in layout.linears.values()}
    bits = {lin["bits"] for lin in layout.linears.values()}
    desc: dict = {"model_quant_type": layout.model_quant_type, "version": "1.0.0"}
    if layout.kv_cache is not None:
        desc["kv_cache_type"] = kv_cache.cache_type(layout.kv_cache["bits"])
    second = sorted({lin["type"] for lin in layout.linears.values() if lin.get("channel_bits")})
    if second:  # msModelSlim marks outputs with two-level scales
        desc["model_quant_type_second"] = second[0]
    if len(group_sizes) == 1:
        desc["group_size"] = group_sizes.pop()
    if len(bits) == 1:
        desc["weight_bits"] = bits.pop()
    desc["slimquant"] = {"format": FORMAT_VERSION, "model_type": layout.model_type,
                         "architectures": layout.architectures, "float_tensors": layout.float_tensors,
                         "linears": layout.linears, "tied": layout.tied, "files": dict(sorted(files.items()))}
    if layout.kv_cache is not None:
        desc["slimquant"]["kv_cache"] = layout.kv_cache
    parse_output_meta(desc["slimquant"], "the description being written")  # never write what a reader refuses
    desc.update(layout.types)
    return desc
