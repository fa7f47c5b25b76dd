"""Tiny random Hugging Face causal LMs built from configs (no downloads): one per architecture family."""

from __future__ import annotations

import torch
import transformers

VOCAB = 256
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 4
KV_HEADS = 2

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
               tie_word_embeddings=False)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, head_dim=16),
    "mistral": lambda: transformers.MistralConfig(**_COMMON, head_dim=16),
    "gemma": lambda: transformers.GemmaConfig(**_COMMON, head_dim=16),
    "opt": lambda: transformers.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=INTERMEDIATE,
                                          num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                          word_embed_proj_dim=HIDDEN, max_position_embeddings=128,
                                          tie_word_embeddings=False),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                            n_inner=INTERMEDIATE, n_positions=128, bos_token_id=0,
                                            eos_token_id=0, tie_word_embeddings=False),
    "phi": lambda: transformers.PhiConfig(**_COMMON, partial_rotary_factor=0.5),
    "mixtral": lambda: transformers.MixtralConfig(**{**_COMMON, "intermediate_size": 32}, num_local_experts=8,
                                                  num_experts_per_tok=2, head_dim=16),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**_COMMON, moe_intermediate_size=32,
                                                     shared_expert_intermediate_size=64, num_experts=8,
                                                     num_experts_per_tok=2, decoder_sparse_step=1,
                                                     mlp_only_layers=[]),
}

ARCHS = list(CONFIGS)
MOE_ARCHS = ("mixtral", "qwen2_moe")


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A float32 model in eval mode with deterministic random weights."""
    config = CONFIGS[arch]()
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def token_samples(count: int = 4, seqlen: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """`count` random calibration samples of `seqlen` token ids ([1, seqlen] each) for the tiny models, seeded."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (1, seqlen), generator=g) for _ in range(count)]
