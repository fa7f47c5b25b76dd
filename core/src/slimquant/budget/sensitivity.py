"""How much each Linear's quantization at each candidate width costs the model's output, measured on the float model.

- `kl_sensitivity`: the definition. KL(float || model) per token with only that Linear rounded to nearest at that
  candidate; one forward pass over the samples per Linear and candidate.
- `proxy_sensitivity`: its second-order estimate, 1/2 vec(dW)^T F vec(dW) with the Fisher F of the model's output
  distribution in Kronecker factors (K-FAC): F ~ diag(G) (x) A, A = E[x x^T] the Linear's input second moment and
  G the mean squared gradient of the log-likelihood (labels drawn from the model itself) at its output. One forward
  and one backward pass per sample, then per candidate sum_o G_o (dW A dW^T)_oo.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from slimquant.config.scheme import WeightArgs
from slimquant.eval.divergence import divergence, logits_of
from slimquant.quant.math import fake_quantize_weight


@torch.no_grad()
def kl_sensitivity(model: nn.Module, linears: dict[str, nn.Linear], candidates: list[WeightArgs],
                   samples: list[torch.Tensor]) -> dict[str, list[float]]:
    reference = logits_of(model, samples)
    out = {}
    for name, linear in linears.items():
        original = linear.weight.data.clone()
        try:
            out[name] = []
            for args in candidates:
                linear.weight.data.copy_(fake_quantize_weight(original, args))
                out[name].append(divergence(reference, model, samples).kl)
        finally:
            linear.weight.data.copy_(original)
    return out


class _Factors:
    """Running sums of x x^T (per token) and g^2 (per output channel) for one Linear."""

    def __init__(self, linear: nn.Linear):
        device = linear.weight.device
        self.inputs = torch.zeros(linear.in_features, linear.in_features, device=device)
        self.grads = torch.zeros(linear.out_features, device=device)
        self.tokens = 0


@contextmanager
def _output_gradients_only(model: nn.Module):
    """Gradients flow through the activations (from the embeddings on) but are not kept for any parameter."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.detach().requires_grad_())
    try:
        yield
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


def _hooks(linears: dict[str, nn.Linear], factors: dict[str, _Factors]):
    def make(name):
        def hook(module, inputs, output):
            f = factors[name]
            x = inputs[0].detach().reshape(-1, module.in_features).float()
            f.inputs.addmm_(x.t(), x)
            f.tokens += x.shape[0]

            def grad_hook(grad):
                f.grads += grad.detach().reshape(-1, module.out_features).float().pow(2).sum(0)
            if output.requires_grad:
                output.register_hook(grad_hook)
        return hook
    return [linear.register_forward_hook(make(name)) for name, linear in linears.items()]


def fisher_factors(model: nn.Module, linears: dict[str, nn.Linear], samples: list[torch.Tensor],
                   seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (A = E[x x^T], G = E[g^2]) over tokens, with labels drawn from the model's own output."""
    factors = {name: _Factors(linear) for name, linear in linears.items()}
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    handles = _hooks(linears, factors)
    try:
        with _output_gradients_only(model), torch.enable_grad():
            for ids in samples:
                logits = model(input_ids=ids.to(device), use_cache=False).logits[0].float()
                probs = torch.softmax(logits.detach(), -1).cpu()
                labels = torch.multinomial(probs, 1, generator=generator)[:, 0].to(device)
                F.cross_entropy(logits, labels, reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
    # per token both: the proxy then estimates KL per token, on the same scale as kl_sensitivity
    return {name: (f.inputs / max(f.tokens, 1), f.grads / max(f.tokens, 1)) for name, f in factors.items()}


@torch.no_grad()
def proxy_sensitivity(model: nn.Module, linears: dict[str, nn.Linear], candidates: list[WeightArgs],
                      samples: list[torch.Tensor], seed: int = 0) -> dict[str, list[float]]:
    out = {}
    for name, (inputs, grads) in fisher_factors(model, linears, samples, seed).items():
        weight = linears[name].weight.detach().float()
        out[name] = []
        for args in candidates:
            error = weight - fake_quantize_weight(weight, args)
            per_channel = ((error @ inputs) * error).sum(1)  # (dW A dW^T)_oo
            out[name].append(0.5 * float((per_channel * grads).sum()))
    return out
