"""`rotate`: orthogonal rotations fused into the weights before any quantizer runs (QuaRot's offline rotations).

- R1, the residual stream: each norm's weight is folded into the Linears that read it, then the embeddings, every
  module that reads the stream (q/k/v, gate/up, routers, experts, lm_head) and every Linear that writes it
  (o_proj, down_proj) are turned by one orthogonal matrix Q: the stream carries h Q instead of h, and RMSNorm, which
  only divides by the vector's length, commutes with Q.
- R2, the attention heads: v_proj's rows and o_proj's columns of every head turn by one head_dim rotation.

Q is a Hadamard matrix scaled to be orthogonal (H_m x H_2^k for sizes that are not powers of two), or a
randomized one (sign flips from `seed`). The result is a model of the same architecture and Linears, so every
quantizer runs after it and every format holds it; the float model's logits are checked against the original's
before anything is quantized. Tied embeddings are untied (the plan notes the bytes added).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from slimquant.sdk import Feature, ModelTransform, PluginError, hookimpl
from slimquant_rotate import fuse, guard
from slimquant_rotate.hadamard import orthogonal_hadamard, supported
from slimquant_rotate.structure import find_residual, model_problems

PROBE_TOKENS = 32
TOLERANCE = 1e-3  # relative to the largest |logit|: float32 rounding of a fused product stays far below it


class RotateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["rotate"] = "rotate"
    residual: bool = Field(True, description="R1: rotate the residual stream")
    heads: bool = Field(True, description="R2: rotate each attention head's values (v_proj rows, o_proj columns)")
    seed: int | None = Field(None, description="randomized Hadamard: flip signs drawn from this seed (None: plain)")
    online: bool = Field(False, description="R4: a Hadamard rotation of every down_proj's input, applied to the "
                                            "activations at run time (in memory; formats must hold online transforms)")
    guard: bool = Field(True, description="keep each rotation only where it lowers the rounding error of the Linears "
                                          "it turns, measured on calibration inputs (when the run has them)")
    guard_samples: int = Field(4, ge=1, description="calibration batches the guard measures on")


class RotatePlugin(ModelTransform):
    name = "rotate"
    Config = RotateConfig
    distributed = True  # deterministic and data-free: every process rotates alike

    def output_features(self, plan) -> dict:
        return {Feature.ONLINE_TRANSFORM: "online: true (R4 on down_proj's input)"} if self.config.online else {}

    @hookimpl
    def check_model(self, ctx):
        problems = model_problems(ctx.model, ctx.prefix, ctx.layers)
        if problems:
            return problems
        config = ctx.model.config
        sizes = {"hidden_size": config.hidden_size} if self.config.residual else {}
        if self.config.heads:
            sizes["head_dim"] = _head_dim(config)
        return [f"{key} {n}: no Hadamard matrix of that order is built here" for key, n in sizes.items()
                if not supported(n)]

    @hookimpl
    def transform_model(self, ctx):
        model = ctx.model
        ids = torch.randint(0, model.config.vocab_size, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))
        ids = ids.to(model.get_input_embeddings().weight.device)
        before = model(ids).logits.double()
        residual = find_residual(model, ctx.prefix, ctx.layers, ids) if self.config.residual else None
        q = orthogonal_hadamard(model.config.hidden_size, self.config.seed) if residual else None
        head_dim = _head_dim(model.config)
        r = orthogonal_hadamard(head_dim, None if self.config.seed is None else self.config.seed + 1)
        heads = self._attention_pairs(ctx) if self.config.heads else []
        online = self._online_targets(ctx, residual) if self.config.online else []
        if self.config.guard:
            residual, heads, online = self._guarded(ctx, residual, q, heads, r, online)
        if residual is not None:
            added = fuse.untie(model)
            if added:
                ctx.note(f"untied the output embedding from the input embedding: +{added / 2**20:.1f} MiB")
            self._rotate_residual(ctx, residual, q)
        for v, o in heads:
            fuse.rotate_heads(v, o, r, head_dim)
        if self.config.heads:
            ctx.note(f"R2: {head_dim}-wide rotation of the values in {len(heads)} attention layers")
        shared: dict[tuple, torch.Tensor] = {}  # one matrix per size, shared by every Linear of that width
        for name in online:
            linear = ctx.model.get_submodule(name)
            h = orthogonal_hadamard(linear.in_features)
            fuse.rotate_inputs(linear, h)
            key = (linear.in_features, linear.weight.dtype, linear.weight.device)
            ctx.set_input_transform(name, shared.setdefault(key, h.to(linear.weight.dtype).to(linear.weight.device)))
        if self.config.online:
            ctx.note(f"R4: online rotation of the input of {len(online)} down projections")
        after = model(ids).logits.double()
        error = float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))
        if not error <= TOLERANCE:
            raise PluginError(f"rotate: the rotated model's logits differ from the original's by {error:.2e} of "
                              "their largest value; the model's structure was misread, nothing was quantized")
        ctx.note(f"logits of the rotated float model match the original's to {error:.1e}")

    def _rotate_residual(self, ctx, residual, q) -> None:
        modules = dict(ctx.model.named_modules())
        for sub in residual.sublayers:
            fuse.fold_norm(modules[sub.norm], [modules[r] for r in sub.readers])
        fuse.fold_norm(modules[residual.final_norm], [modules[residual.head]])
        for name in [residual.embedding, *(r for s in residual.sublayers for r in s.readers), residual.head]:
            fuse.rotate_inputs(modules[name], q)
        for name in residual.writers:
            fuse.rotate_outputs(modules[name], q)
        readers = sum(len(s.readers) for s in residual.sublayers)
        ctx.note(f"R1: {q.shape[0]}-wide residual rotation, {len(residual.sublayers)} norms folded, "
                 f"{readers} readers and {len(residual.writers)} writers turned")

    @staticmethod
    def _attention_pairs(ctx) -> list[tuple]:
        pairs = []
        for layer in ctx.layers:
            attention = getattr(layer, "self_attn", None)
            v, o = getattr(attention, "v_proj", None), getattr(attention, "o_proj", None)
            if v is not None and o is not None:
                pairs.append((v, o))
        return pairs

    @staticmethod
    def _calibrated(ctx, name: str) -> bool:
        """Whether the Linear's weight algorithm feeds rounding errors back through calibration data (GPTQ)."""
        return ctx.plans[name].weight_algorithm in ctx.calibrated_weight_algorithms

    @staticmethod
    def _online_targets(ctx, residual) -> list[str]:
        """The Linears R4 turns: every MLP writer (down_proj, an expert's w2), found like R1's writers."""
        writers = residual.writers if residual is not None else [
            n for n in ctx.plans if n.rpartition(".")[2] in ("down_proj", "w2")]
        return [n for n in writers if n.rpartition(".")[2] != "o_proj"]

    def _guarded(self, ctx, residual, q, heads, r, online):
        """The rotations that lower the rounding error of the Linears they turn (slimquant_rotate.guard)."""
        names = {m: n for n, m in ctx.model.named_modules()}
        planned = [n for n, p in ctx.plans.items() if p is not None]
        if ctx.samples:
            inputs = guard.catch_inputs(ctx.model, planned, ctx.samples, self.config.guard_samples)
        else:
            inputs = dict.fromkeys(planned)
            ctx.note("guard: no calibration data, so it compares the rounding error of the weights alone")
        args = {n: ctx.plans[n].scheme.weights for n in inputs}
        acts = {n: ctx.plans[n].scheme.activations for n in inputs}
        calibrated = {n: bool(ctx.samples) and self._calibrated(ctx, n) for n in inputs}

        def err(module, name, turn):
            return guard.error(module, inputs[name], args[name], turn, acts[name], calibrated[name])

        modules = dict(ctx.model.named_modules())
        plain = {n: guard.Turn() for n in inputs}
        turned = dict(plain)
        if residual is not None:
            for sub in residual.sublayers:
                gain = fuse.norm_gain(modules[sub.norm]).double().cpu()
                turned.update({n: guard.Turn(right=q, gain=gain) for n in sub.readers if n in inputs})
            turned.update({n: guard.Turn(left=q.T) for n in residual.writers if n in inputs})
            before = sum(err(modules[n], n, plain[n]) for n in inputs)
            after = sum(err(modules[n], n, turned[n]) for n in inputs)
            keep = after < before
            ctx.note(f"guard: R1 {'kept' if keep else 'dropped'} (summed relative rounding error of the "
                     f"{len(inputs)} quantized Linears {before:.4g} without, {after:.4g} with)")
            if not keep:
                residual, turned = None, plain
        kept, dropped = [], []
        for v, o in heads:
            vn, on = names[v], names[o]
            if vn not in inputs or on not in inputs:  # a Linear left in float, or one no token reached
                kept.append((v, o))
                continue
            rows = torch.block_diag(*[r.T] * (v.out_features // r.shape[0]))
            cols = torch.block_diag(*[r] * (o.in_features // r.shape[0]))
            base_v, base_o = turned[vn], turned[on]
            with_v = guard.Turn(left=rows, right=base_v.right, gain=base_v.gain)
            with_o = guard.Turn(left=base_o.left, right=cols)
            without = err(v, vn, base_v) + err(o, on, base_o)
            with_r2 = err(v, vn, with_v) + err(o, on, with_o)
            (kept if with_r2 < without else dropped).append((v, o))
        if heads:
            layers = [names[v].removeprefix(f"{ctx.prefix}.").split(".")[0] for v, _ in dropped]
            ctx.note(f"guard: R2 kept in {len(kept)} of {len(heads)} attention layers"
                     + (f" (dropped in layers {', '.join(layers)})" if layers else ""))
        online_kept = []
        for name in online:
            if name not in inputs:
                online_kept.append(name)
                continue
            base = turned[name]
            h = orthogonal_hadamard(modules[name].in_features)
            with_r4 = guard.Turn(left=base.left, right=h)
            if err(modules[name], name, with_r4) < err(modules[name], name, base):
                online_kept.append(name)
        if online:
            ctx.note(f"guard: R4 kept on {len(online_kept)} of {len(online)} down projections")
        return residual, kept, online_kept


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
