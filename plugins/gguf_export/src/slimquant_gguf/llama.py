"""The architectures written to GGUF: llama.cpp's name for each, its tensor names, the q/k row order its
convert_hf_to_gguf.py uses (Llama's rotary halves interleaved; Qwen's left as they are), and the hyperparameters.

Each is one that llama.cpp runs and transformers' GGUF reader loads back: Llama, Mistral (written as llama, as
llama.cpp's converter does), Qwen2 (q/k/v biases) and Qwen3 (per-head q/k norms)."""

from __future__ import annotations

import gguf
import torch

ARCHITECTURES = {  # transformers' model_type -> (llama.cpp's architecture, whether q/k rows are permuted)
    "llama": (gguf.MODEL_ARCH.LLAMA, True),
    "mistral": (gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": (gguf.MODEL_ARCH.QWEN2, False),
    "qwen3": (gguf.MODEL_ARCH.QWEN3, False),
}


def arch_name(config) -> str:
    """llama.cpp's name of the model's architecture ("llama", "qwen2", ...)."""
    return gguf.MODEL_ARCH_NAMES[ARCHITECTURES[config.model_type][0]]


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotary halves -> llama.cpp's interleaved pairs, per head, along dim 0 (any trailing shape)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_heads(hf_name: str, config) -> int | None:
    """The head count q_proj / k_proj rows are permuted with; None for every other tensor and architecture."""
    if not ARCHITECTURES[config.model_type][1]:
        return None
    if hf_name.endswith("self_attn.q_proj.weight"):
        return config.num_attention_heads
    if hf_name.endswith("self_attn.k_proj.weight"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def gguf_name(hf_name: str, config) -> str | None:
    tensor_map = gguf.get_tensor_name_map(ARCHITECTURES[config.model_type][0], config.num_hidden_layers)
    return tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def write_hyperparameters(writer: gguf.GGUFWriter, config, name: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    writer.add_rope_freq_base(float(theta or getattr(config, "rope_theta", 10000.0)))
