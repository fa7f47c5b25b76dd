"""How far a quantized model's next-token distribution is from the float model's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Divergence:
    kl: float  # mean KL(float || quantized) per token, in nats
    top1: float  # share of tokens where both models pick the same next token
    tokens: int


@torch.no_grad()
def logits_of(model, samples: list[torch.Tensor]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(input_ids=s.to(device), use_cache=False).logits[0].float().cpu() for s in samples]


@torch.no_grad()
def divergence(reference_logits: list[torch.Tensor], model, samples: list[torch.Tensor]) -> Divergence:
    kl_sum, agree, tokens = 0.0, 0, 0
    for ref, got in zip(reference_logits, logits_of(model, samples), strict=True):
        p_log = F.log_softmax(ref, -1)
        q_log = F.log_softmax(got, -1)
        kl_sum += float((p_log.exp() * (p_log - q_log)).sum())
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        tokens += ref.shape[0]
    return Divergence(kl_sum / tokens, agree / tokens, tokens)
