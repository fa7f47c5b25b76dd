"""Load a saved quantized output back into a float model (msModelSlim's FakeQuantizeCalibrator role).

    model = AutoModelForCausalLM.from_pretrained(float_dir)
    model = load_quantized(model, "out/model-w8a8")   # now the fake-quantized model, logits as after quantize()

Each quantized Linear becomes a FakeQuantLinear rebuilt from its codes and scales; every float tensor
(embeddings, norms changed by smoothing, lm_head, float Linears) is overwritten from the files; tied weights
are tied again. Anything missing, misshapen or corrupt raises an OutputError naming the tensor or file.

Before changing the model the loader checks that it is the architecture the output was saved from: the same
config.model_type (and config.architectures where both have one), no state-dict tensor the output neither
holds nor quantizes, every quantized Linear present with its shape, and no bias on a quantized Linear that
was saved without one. (A saved bias the model's Linear lacks is fine: shift smoothing adds such biases.)
Each Linear's tensors are checked against its description (`read_linear`) as they are read.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from torch import nn

from slimquant.errors import OutputError
from slimquant.export.description import LinearMeta, OutputMeta
from slimquant.export.kv_cache import restore_cache
from slimquant.export.layout import float_tensor_names, int_kernel_params, quant_bias
from slimquant.export.packing import PACK_INT4, unpack_int4
from slimquant.export.reader import QuantizedFiles
from slimquant.model.structure import normalize_linears, set_submodule
from slimquant.quant.actparams import ActQParams
from slimquant.quant.fake_linear import FakeQuantLinear
from slimquant.quant.outliers import WeightOutliers
from slimquant.quant.qweight import QuantizedScale, QuantizedWeight, qrange
from slimquant.quant.two_level import TwoLevelScale
from slimquant.smoothing import ensure_bias

__all__ = ["check_model_fits", "load_quantized", "read_linear"]

INDEX_DTYPES = (torch.int32, torch.int64)


# -- one saved Linear, checked against its description --------------------------------------------------------


def _tensor(files: QuantizedFiles, key: str, shape: tuple, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = files.get(key)
    if tuple(t.shape) != tuple(shape):
        raise OutputError(f"tensor {key} has shape {list(t.shape)}, expected {list(shape)}")
    if dtype is not None and t.dtype != dtype:
        raise OutputError(f"tensor {key} has dtype {t.dtype}, expected {dtype}")
    return t


def _required(files: QuantizedFiles, name: str, leaf: str, why: str) -> str:
    key = f"{name}.{leaf}"
    if key not in files:
        raise OutputError(f"{name}: {why} need tensor {key}, which the output lacks")
    return key


def _float_values(key: str, t: torch.Tensor) -> torch.Tensor:
    if not t.dtype.is_floating_point:
        raise OutputError(f"tensor {key} has dtype {t.dtype}, expected a floating-point type")
    if not torch.isfinite(t).all():
        raise OutputError(f"tensor {key} holds NaN or Inf")
    return t.float()


def _codes(files: QuantizedFiles, name: str, meta: LinearMeta) -> torch.Tensor:
    key, out_f, in_f = f"{name}.weight", meta.out_features, meta.in_features
    if meta.pack == PACK_INT4:
        codes = unpack_int4(_tensor(files, key, (out_f, (in_f + 1) // 2), torch.uint8), in_f)
    else:
        codes = _tensor(files, key, (out_f, in_f), torch.int8)
    lo, hi = qrange(meta.bits)
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise OutputError(f"tensor {key} holds codes in [{int(codes.min())}, {int(codes.max())}], outside the "
                          f"{meta.bits}-bit range [{lo}, {hi}] of its description (bits: {meta.bits})")
    return codes


def _scale(files: QuantizedFiles, key: str, out_f: int, groups: int) -> torch.Tensor:
    t = files.get(key)
    if groups == 1 and tuple(t.shape) == (out_f,):  # msModelSlim writes per-channel scales as [n]
        t = t.reshape(out_f, 1)
    if tuple(t.shape) != (out_f, groups):
        raise OutputError(f"tensor {key} has shape {list(t.shape)}, expected [{out_f}, {groups}]")
    return _float_values(key, t)


def _weight_offset(files: QuantizedFiles, name: str, meta: LinearMeta) -> torch.Tensor | None:
    if not meta.symmetric:
        key = _required(files, name, "weight_offset", "asymmetric weights (symmetric: false)")
        return _scale(files, key, meta.out_features, meta.groups)
    key = f"{name}.weight_offset"
    if key in files and _scale(files, key, meta.out_features, meta.groups).any():
        raise OutputError(f"{name}: the description says symmetric: true, but tensor {key} holds non-zero "
                          "offsets; the description and the tensors disagree")
    return None


def _g_idx(files: QuantizedFiles, name: str, meta: LinearMeta) -> torch.Tensor | None:
    if not meta.g_idx:
        return None
    key = _required(files, name, "g_idx", "permuted groups (g_idx: true)")
    g_idx = _tensor(files, key, (meta.in_features,))
    if g_idx.dtype not in INDEX_DTYPES:
        raise OutputError(f"tensor {key} has dtype {g_idx.dtype}, expected torch.int32")
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= meta.groups):
        raise OutputError(f"tensor {key} names groups in [{int(g_idx.min())}, {int(g_idx.max())}], outside "
                          f"[0, {meta.groups - 1}] (groups: {meta.groups})")
    return g_idx.to(torch.int32)


def _bias(files: QuantizedFiles, name: str, meta: LinearMeta) -> torch.Tensor | None:
    if not meta.bias:
        return None
    key = _required(files, name, "bias", "Linears with bias: true")
    bias = _tensor(files, key, (meta.out_features,))
    _float_values(key, bias)
    return bias


def _act(files: QuantizedFiles, name: str, meta: LinearMeta) -> ActQParams | None:
    act = meta.act
    if act is None:
        return None
    if act.dynamic:
        return ActQParams(act.bits, act.symmetric, True)
    shape = (meta.in_features,) if act.per_channel else (1,)
    why = "static activations (dynamic: false)"
    scale_key, offset_key = (_required(files, name, leaf, why) for leaf in ("input_scale", "input_offset"))
    scale = _float_values(scale_key, _tensor(files, scale_key, shape))
    zero = _float_values(offset_key, _tensor(files, offset_key, shape))
    if act.symmetric and zero.any():
        raise OutputError(f"{name}: the description says symmetric activations, but tensor {offset_key} holds "
                          "non-zero offsets; the description and the tensors disagree")
    return ActQParams(act.bits, act.symmetric, False, scale, None if act.symmetric else zero)


def _check_int_kernel(files: QuantizedFiles, name: str, qweight: QuantizedWeight, bias: torch.Tensor | None,
                      act: ActQParams | None) -> None:
    """deq_scale and quant_bias (what an int8 kernel runs with) agree with the tensors the loader uses."""
    params = int_kernel_params(qweight.scale, qweight.zero, act)
    if params is None:
        raise OutputError(f"{name}: int_kernel: true, but its saved scales do not allow an integer kernel")
    expected_deq, offset = params
    out_f = qweight.shape[0]
    deq = _tensor(files, _required(files, name, "deq_scale", "int_kernel: true Linears"), (out_f,), torch.float32)
    if not torch.allclose(deq, expected_deq, rtol=1e-6, atol=0):
        raise OutputError(f"tensor {name}.deq_scale differs from input_scale * weight_scale")
    saved_bias = _tensor(files, _required(files, name, "quant_bias", "int_kernel: true Linears"), (out_f,),
                         torch.int32)
    if not torch.equal(saved_bias, quant_bias(name, qweight.codes, bias, deq, offset)):
        raise OutputError(f"tensor {name}.quant_bias differs from the one the weights, bias and input offset give")


def _check_owned_tensors(files: QuantizedFiles, name: str, meta: LinearMeta) -> None:
    expected = meta.tensor_suffixes()
    unexpected = [k for k in files.keys_of(name) if k.rpartition(".")[2] not in expected]
    if unexpected:
        raise OutputError(f"{name}: the output holds {', '.join(unexpected)}, which the description of this Linear "
                          "does not account for (bias, g_idx, act, int_kernel and extras say which tensors it has)")


def _codebook(files: QuantizedFiles, name: str, meta: LinearMeta) -> torch.Tensor | None:
    if not meta.codebook:
        return None
    key = _required(files, name, "weight_codebook", "a codebook grid (codebook: true)")
    return _float_values(key, _tensor(files, key, (2 ** meta.bits,)))


def _stored_scale(files: QuantizedFiles, name: str, meta: LinearMeta) -> QuantizedScale:
    why = f"scales stored as codes (scale_block: {meta.scale_block})"
    codes = _tensor(files, f"{name}.weight_scale", (meta.out_features, meta.groups), torch.int8)
    blocks = -(-codes.numel() // meta.scale_block)
    key = _required(files, name, "weight_scale_scale", why)
    block_scale = _float_values(key, _tensor(files, key, (blocks,)))
    key = _required(files, name, "weight_scale_offset", why)
    return QuantizedScale(codes, block_scale, _float_values(key, _tensor(files, key, (1,))), meta.scale_block)


def _outliers(files: QuantizedFiles, name: str, meta: LinearMeta) -> WeightOutliers | None:
    if not meta.outliers:
        return None
    why = f"outliers (outliers: {meta.outliers})"
    index_key, value_key = (_required(files, name, leaf, why) for leaf in ("weight_outlier_index",
                                                                          "weight_outlier_value"))
    return WeightOutliers(_tensor(files, index_key, (meta.outliers,)), _tensor(files, value_key, (meta.outliers,)))


def _two_level(files: QuantizedFiles, name: str, meta: LinearMeta) -> TwoLevelScale:
    """weight_scale [out, 1] and weight_scale_second [out, groups], with all-zero offsets (symmetric groups)."""
    why = f"two-level scales (channel_bits: {meta.channel_bits})"
    out_f, groups = meta.out_features, meta.groups
    channel = _scale(files, _required(files, name, "weight_scale", why), out_f, 1)
    group = _scale(files, _required(files, name, "weight_scale_second", why), out_f, groups)
    for leaf, cols in (("weight_offset", 1), ("weight_offset_second", groups)):
        key = f"{name}.{leaf}"
        if key in files and _scale(files, key, out_f, cols).any():
            raise OutputError(f"{name}: tensor {key} holds non-zero offsets, but two-level scales are symmetric")
    return TwoLevelScale(group, channel, meta.channel_bits)


def read_linear(files: QuantizedFiles, name: str, meta: LinearMeta
                ) -> tuple[QuantizedWeight, torch.Tensor | None, ActQParams | None]:
    """The saved quantized Linear `name` (weight, bias, activation parameters), every tensor checked against
    its description: dtypes, shapes, codes within the declared bits, offsets against `symmetric`, g_idx range."""
    _check_owned_tensors(files, name, meta)
    codes = _codes(files, name, meta)
    stored = _stored_scale(files, name, meta) if meta.scale_block else None
    two = _two_level(files, name, meta) if meta.channel_bits else None
    if two is not None:
        scale, zero = two.dequantize(), None
    else:
        scale = stored.dequantize() if stored else _scale(files, f"{name}.weight_scale", meta.out_features,
                                                          meta.groups)
        zero = _weight_offset(files, name, meta)
    g_idx = _g_idx(files, name, meta)
    extras = {e: files.get(f"{name}.{e}") for e in meta.extras}
    codebook = _codebook(files, name, meta)
    if codebook is not None:
        zero = None
    bias = _bias(files, name, meta)
    try:
        qweight = QuantizedWeight(codes, scale, zero, meta.bits, meta.group_size or None, g_idx, extras, codebook,
                                  stored, _outliers(files, name, meta), meta.sparsity,
                                  codebook_name=meta.codebook_name if codebook is not None else None)
        if two is not None:
            qweight = replace(qweight, two_level=two)
        act = _act(files, name, meta)
    except ValueError as exc:
        raise OutputError(f"{name}: saved quantization parameters are invalid: {exc}") from None
    if meta.int_kernel:
        _check_int_kernel(files, name, qweight, bias, act)
    return qweight, bias, act


# -- the model: same architecture? ----------------------------------------------------------------------------


def _check_architecture(model: nn.Module, meta: OutputMeta) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type != meta.model_type:
        raise OutputError(f"the output was saved from a {meta.model_type!r} model, but this model is a "
                          f"{model_type!r} model; load it into the architecture it was saved from")
    architectures = getattr(config, "architectures", None)
    if architectures and meta.architectures and list(architectures) != meta.architectures:
        raise OutputError(f"the output was saved from {', '.join(meta.architectures)}, but this model is "
                          f"{', '.join(architectures)}")


def _check_tensor_names(model: nn.Module, meta: OutputMeta) -> None:
    saved = set(meta.float_tensors)
    unknown = [key for key in float_tensor_names(model) if key not in saved]
    if unknown:
        raise OutputError(f"the model has {len(unknown)} tensor(s) the output neither holds nor quantizes: "
                          f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}; is this the same "
                          "architecture?")


def _target_linear(model: nn.Module, name: str, meta: LinearMeta) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise OutputError(f"the output quantizes {name}, which the model does not have") from None
    if not isinstance(module, nn.Linear | FakeQuantLinear):
        raise OutputError(f"the output quantizes {name}, but the model's {name} is a {type(module).__name__}")
    if (module.out_features, module.in_features) != (meta.out_features, meta.in_features):
        raise OutputError(f"{name}: the model's Linear is [{module.out_features}, {module.in_features}], "
                          f"the saved one [{meta.out_features}, {meta.in_features}]; is this the same architecture?")
    if getattr(module, "bias", None) is not None and not meta.bias:
        raise OutputError(f"{name}: the model's Linear has a bias, but the output saved it without one "
                          "(bias: false); is this the same architecture?")
    return module


def check_model_fits(model: nn.Module, meta: OutputMeta) -> dict[str, nn.Module]:
    """The checks above on `model` (which may be a weightless skeleton); returns each quantized Linear's module."""
    _check_architecture(model, meta)
    normalize_linears(model)
    targets = {name: _target_linear(model, name, linear) for name, linear in meta.linears.items()}
    _check_tensor_names(model, meta)
    return targets


# -- loading ---------------------------------------------------------------------------------------------------


def _rebuild(files: QuantizedFiles, name: str, meta: LinearMeta, module: nn.Module) -> FakeQuantLinear:
    qweight, bias, act = read_linear(files, name, meta)
    fake = isinstance(module, FakeQuantLinear)
    dtype = module.compute_dtype if fake else module.weight.dtype
    device = module.codes.device if fake else module.weight.device
    return FakeQuantLinear(qweight, bias, act, compute_dtype=dtype).to(device)


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
    extra = [k for k in files.keys() if k not in state and k not in owned and k not in files.cache_keys]
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
    state = model.state_dict(keep_vars=True)
    for alias, source in tied.items():
        if alias not in state or source not in state:
            raise OutputError(f"the output ties {alias} to {source}, but the model lacks "
                              f"{alias if alias not in state else source}")
        parent_name, _, leaf = alias.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        source_tensor = state[source]
        if isinstance(getattr(parent, leaf), nn.Parameter) and isinstance(source_tensor, nn.Parameter):
            setattr(parent, leaf, source_tensor)
        else:
            with torch.no_grad():
                getattr(parent, leaf).copy_(source_tensor)


def load_quantized(model: nn.Module, output_dir: str | os.PathLike, verify: bool = True) -> nn.Module:
    """Turn the float `model` (same architecture) into the fake-quantized model saved in `output_dir`.

    verify: require the sha256 of each weight file (and shard index) in the description and check it before
    reading the file; verify=False skips both.
    """
    files = QuantizedFiles(output_dir, verify=verify)
    meta = files.meta
    targets = check_model_fits(model, meta)
    for name, module in targets.items():
        set_submodule(model, name, _rebuild(files, name, meta.linears[name], module))
    _load_floats(model, files, set(targets), meta.tied)
    _tie(model, meta.tied)
    restore_cache(model, files, meta.kv_cache)
    return model
