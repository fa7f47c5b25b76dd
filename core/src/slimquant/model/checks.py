"""Is this a causal LM slimquant can quantize, and do the calibration tokens fit it? Checked before any work."""

from __future__ import annotations

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
