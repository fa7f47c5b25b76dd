"""Is this a causal LM slimquant can quantize, and do the calibration tokens fit it? Checked before any work."""

from __future__ import annotations

import os

import torch
from torch import nn

from slimquant.errors import CalibrationError, ModelStructureError, NonFiniteError

POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def _encoder_model_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return set(MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def check_causal_lm_config(config) -> None:
    """Refuse encoder-only and encoder-decoder models: they are not causal LMs, whatever head transformers fits."""
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise ModelStructureError(f"model type {model_type!r} is an encoder-decoder model, not a causal LM")
    if model_type in _encoder_model_types() and not getattr(config, "is_decoder", False):
        raise ModelStructureError(f"model type {model_type!r} is an encoder (config.is_decoder is false), not a "
                                  "causal LM; slimquant quantizes decoder-only language models")


def check_causal_lm(model: nn.Module) -> None:
    """A model object handed to the Python API: a causal LM with an output head."""
    if not isinstance(model, nn.Module):
        raise ModelStructureError(f"expected a torch model, got {type(model).__name__}")
    config = getattr(model, "config", None)
    if config is None:
        raise ModelStructureError(f"{type(model).__name__} has no `config`: pass a Hugging Face causal LM")
    check_causal_lm_config(config)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ModelStructureError(f"{type(model).__name__} has no language-model head: load it with "
                                  "AutoModelForCausalLM, not AutoModel")


def max_positions(config) -> int | None:
    for key in POSITION_LIMIT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_sequence_length(config, length: int, what: str) -> None:
    limit = max_positions(config)
    if limit is not None and length > limit:
        raise CalibrationError(f"{what} is {length} tokens, but the model has {limit} positions "
                               f"({getattr(config, 'model_type', 'this model')}); use at most {limit}")


def check_samples(samples: list[torch.Tensor], model: nn.Module) -> None:
    """Every calibration sample is a non-empty row of token ids the model's embedding and positions can take."""
    if not samples:
        raise CalibrationError("calibration data is empty")
    vocab = model.get_input_embeddings().num_embeddings
    for i, ids in enumerate(samples):
        if not torch.is_tensor(ids) or ids.dtype not in (torch.int64, torch.int32):
            raise CalibrationError(f"calibration sample {i}: expected a tensor of token ids")
        if ids.numel() == 0 or ids.shape[-1] == 0:
            raise CalibrationError(f"calibration sample {i} has no tokens")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise CalibrationError(f"calibration sample {i} holds token id {bad}, outside the model's vocabulary "
                                   f"of {vocab} (was it tokenized for another model?)")
        check_sequence_length(model.config, ids.shape[-1], f"calibration sample {i}")


def check_finite(tensor: torch.Tensor, what: str) -> None:
    if torch.isfinite(torch.sum(tensor, dtype=torch.float32)):  # one NaN/Inf anywhere makes the sum non-finite
        return
    bad = (~torch.isfinite(tensor)).sum().item()  # or the sum overflowed: count for certain
    if bad:
        raise NonFiniteError(f"{what} holds {bad} NaN/Inf value(s)")


def check_model_finite(model: nn.Module) -> None:
    """Every floating-point parameter and buffer (rotary inv_freq included) of a loaded model is finite: checked
    right after loading, before anything generates, evaluates or calibrates with it. The model is first rewritten
    into the per-Linear form the runtime quantizes (exact: Conv1D as Linear, fused experts one Linear each), so that
    a bad value is named by its Linear."""
    from slimquant.model.structure import normalize_linears

    normalize_linears(model)
    tensors = dict(model.named_buffers())
    tensors.update(model.named_parameters())
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not tensor.is_meta:
            check_finite(tensor, name)


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_calibration_memory(config, num_samples: int, seqlen: int, memory: int | None = None) -> None:
    """Each decoder layer's inputs and outputs for every calibration token are kept while it is calibrated (in
    float32): refuse a calibration set that cannot fit in this machine's memory, before any of it is built."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    memory = memory if memory is not None else physical_memory_bytes()
    if not isinstance(hidden, int) or not memory:
        return
    tokens = num_samples * seqlen
    needed = tokens * hidden * 4 * 2
    if needed > memory:
        raise CalibrationError(f"calibration.num_samples x seqlen = {num_samples} x {seqlen} = {tokens} tokens would "
                               f"keep about {needed / 2**30:.1f} GiB of layer inputs and outputs (hidden size "
                               f"{hidden}), more than this machine's {memory / 2**30:.1f} GiB of memory; use fewer "
                               "or shorter samples")
