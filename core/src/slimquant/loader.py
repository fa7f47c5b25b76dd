"""Load a saved quantized output back into a float model (msModelSlim's FakeQuantizeCalibrator role).

    model = AutoModelForCausalLM.from_pretrained(float_dir)
    model = load_quantized(model, "out/model-w8a8")   # now the fake-quantized model, logits as after quantize()

Each quantized Linear becomes a FakeQuantLinear rebuilt from its codes and scales; every float tensor
(embeddings, norms changed by smoothing, lm_head, float Linears) is overwritten from the files; tied weights
are tied again. Anything missing, misshapen or corrupt raises an OutputError naming the tensor or file.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from slimquant.errors import OutputError
from slimquant.export.packing import PACK_INT4, unpack_int4
from slimquant.export.reader import QuantizedFiles
from slimquant.model.structure import normalize_linears, set_submodule
from slimquant.quant.actparams import ActQParams
from slimquant.quant.fake_linear import FakeQuantLinear
from slimquant.quant.qweight import QuantizedWeight, num_groups
from slimquant.smoothing import ensure_bias

__all__ = ["load_quantized"]


def _tensor(files: QuantizedFiles, key: str, shape: tuple, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = files.get(key)
    if tuple(t.shape) != tuple(shape):
        raise OutputError(f"tensor {key} has shape {list(t.shape)}, expected {list(shape)}")
    if dtype is not None and t.dtype != dtype:
        raise OutputError(f"tensor {key} has dtype {t.dtype}, expected {dtype}")
    return t


def _codes(files: QuantizedFiles, name: str, meta: dict) -> torch.Tensor:
    out_f, in_f = meta["out_features"], meta["in_features"]
    if meta.get("pack") == PACK_INT4:
        return unpack_int4(_tensor(files, f"{name}.weight", (out_f, (in_f + 1) // 2), torch.uint8), in_f)
    if meta.get("pack"):
        raise OutputError(f"{name}: unknown weight packing {meta['pack']!r}")
    return _tensor(files, f"{name}.weight", (out_f, in_f), torch.int8)


def _scale(files: QuantizedFiles, key: str, out_f: int, groups: int) -> torch.Tensor:
    t = files.get(key)
    if groups == 1 and tuple(t.shape) == (out_f,):  # msModelSlim writes per-channel scales as [n]
        t = t.reshape(out_f, 1)
    if tuple(t.shape) != (out_f, groups):
        raise OutputError(f"tensor {key} has shape {list(t.shape)}, expected [{out_f}, {groups}]")
    return t.float()


def _act(files: QuantizedFiles, name: str, act: dict | None, in_f: int) -> ActQParams | None:
    if act is None:
        return None
    if act["dynamic"]:
        return ActQParams(act["bits"], act["symmetric"], True)
    shape = (in_f,) if act.get("per_channel") else (1,)
    scale = _tensor(files, f"{name}.input_scale", shape).float()
    zero = None if act["symmetric"] else _tensor(files, f"{name}.input_offset", shape).float()
    return ActQParams(act["bits"], act["symmetric"], False, scale, zero)


def _rebuild(files: QuantizedFiles, name: str, meta: dict, module: nn.Module) -> FakeQuantLinear:
    out_f, in_f = meta["out_features"], meta["in_features"]
    if (module.out_features, module.in_features) != (out_f, in_f):
        raise OutputError(f"{name}: the model's Linear is [{module.out_features}, {module.in_features}], "
                          f"the saved one [{out_f}, {in_f}]; is this the same architecture?")
    group_size = meta["group_size"] or None
    groups = meta.get("groups", num_groups(in_f, group_size))
    codes = _codes(files, name, meta)
    scale = _scale(files, f"{name}.weight_scale", out_f, groups)
    zero = None if meta["symmetric"] else _scale(files, f"{name}.weight_offset", out_f, groups)
    g_idx = _tensor(files, f"{name}.g_idx", (in_f,)).to(torch.int32) if meta.get("g_idx") else None
    extras = {e: files.get(f"{name}.{e}") for e in meta.get("extras", [])}
    bias = _tensor(files, f"{name}.bias", (out_f,)) if meta.get("bias") else None
    try:
        qweight = QuantizedWeight(codes, scale, zero, meta["bits"], group_size, g_idx, extras)
        act = _act(files, name, meta.get("act"), in_f)
    except ValueError as exc:
        raise OutputError(f"{name}: saved quantization parameters are invalid: {exc}") from None
    weight = getattr(module, "weight", None)
    dtype = module.compute_dtype if isinstance(module, FakeQuantLinear) else weight.dtype
    device = module.codes.device if isinstance(module, FakeQuantLinear) else weight.device
    return FakeQuantLinear(qweight, bias, act, compute_dtype=dtype).to(device)


def _replace_linears(model: nn.Module, files: QuantizedFiles) -> set[str]:
    for name, meta in files.meta["linears"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise OutputError(f"the output quantizes {name}, which the model does not have") from None
        if not isinstance(module, nn.Linear | FakeQuantLinear):
            raise OutputError(f"the output quantizes {name}, but the model's {name} is a {type(module).__name__}")
        try:
            set_submodule(model, name, _rebuild(files, name, meta, module))
        except KeyError as exc:
            raise OutputError(f"{name}: description metadata lacks {exc}") from None
    return set(files.meta["linears"])


def _add_shift_biases(model: nn.Module, files: QuantizedFiles, quantized: set[str]) -> None:
    """A shift smoother gives norms (and float Linears) a bias the float model lacks: create it before loading."""
    state = model.state_dict(keep_vars=True)
    for key in files.keys():
        owner, _, leaf = key.rpartition(".")
        if leaf != "bias" or key in state or owner in quantized or f"{owner}.weight" not in state:
            continue
        module = model.get_submodule(owner)
        if getattr(module, "bias", None) is None:
            ensure_bias(module)


def _load_floats(model: nn.Module, files: QuantizedFiles, quantized: set[str], tied: dict[str, str]) -> None:
    _add_shift_biases(model, files, quantized)
    state = model.state_dict(keep_vars=True)
    owned = {k for k in files.keys() if k.rpartition(".")[0] in quantized}
    extra = [k for k in files.keys() if k not in state and k not in owned]
    if extra:
        raise OutputError(f"the output holds tensor(s) the model does not have: {', '.join(extra[:5])}; "
                          "is this the same architecture?")
    for key, target in state.items():
        if key.rpartition(".")[0] in quantized:
            continue
        source = tied.get(key, key)
        if source not in files:
            raise OutputError(f"tensor {key} is missing from the output")
        if key in tied:
            continue
        value = files.get(key)
        if value.shape != target.shape:
            raise OutputError(f"tensor {key} has shape {list(value.shape)}, the model's is {list(target.shape)}")
        with torch.no_grad():
            target.copy_(value)


def _tie(model: nn.Module, tied: dict[str, str]) -> None:
    for alias, source in tied.items():
        parent_name, _, leaf = alias.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        source_tensor = model.state_dict(keep_vars=True)[source]
        if isinstance(getattr(parent, leaf), nn.Parameter) and isinstance(source_tensor, nn.Parameter):
            setattr(parent, leaf, source_tensor)
        else:
            with torch.no_grad():
                getattr(parent, leaf).copy_(source_tensor)


def load_quantized(model: nn.Module, output_dir: str | os.PathLike, verify: bool = True) -> nn.Module:
    """Turn the float `model` (same architecture) into the fake-quantized model saved in `output_dir`.

    verify: check each weight file's sha256 against the description before reading it.
    """
    files = QuantizedFiles(output_dir, verify=verify)
    tied = files.meta.get("tied", {})
    normalize_linears(model)
    quantized = _replace_linears(model, files)
    _load_floats(model, files, quantized, tied)
    _tie(model, tied)
    return model
