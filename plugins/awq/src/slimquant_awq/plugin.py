"""`awq`: activation-aware weight quantization (Lin et al., 2024), as a smoother in front of any weight algorithm.

Per decoder layer, in its smoothing pass:

1. Scaling. For each unit (norm -> q/k/v, v -> o, norm -> gate/up, up -> down, MoE experts included) the input
   channels that carry large activations are protected: s = mean|x|^r (duo_scaling: / mean|w_normalized|^(1-r)),
   normalised to geometric mean 1, with r on a grid of `n_grid` points. Each candidate is judged by the output of
   the sub-block the unit feeds (attention, MLP, or the Linear itself), run on calibration inputs with the target
   weights fake-quantized as the plan will quantize them; no scaling (s = 1) is always a candidate. The best s is
   folded into the source and the targets, float-exact (checked by slimquant.smoothing.Guard; a unit the structure
   does not allow is left alone with a warning naming it).
2. Clipping (`clip`). Each Linear but the query/key projections gets, per output row and group, the weight range
   max|w| * (1 - i / n_grid), i < max_shrink * n_grid, whose quantized group output is closest to the float one
   on sampled input tokens; the weights are clamped to it. This changes the float weights on purpose: whichever
   weight algorithm follows ([awq] rounds to nearest, [awq, gptq] runs GPTQ) quantizes the clamped weights.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from slimquant.sdk import (
    Reduce,
    Smoother,
    Statistic,
    effective_group_size,
    fake_quantize_weight,
    hookimpl,
    name_matches,
    num_groups,
    smoothing,
)

log = logging.getLogger(__name__)


class AWQConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["awq"] = "awq"
    n_grid: int = Field(20, ge=1, description="scale exponents tried per unit: r = 0, 1/n_grid, ...")
    duo_scaling: bool = Field(True, description="s = x^r / w^(1-r) (llm-compressor's default) instead of x^r")
    clip: bool = Field(True, description="search a per-group clipping range after scaling")
    max_shrink: float = Field(0.5, gt=0, lt=1, description="the clipping search shrinks ranges by at most this")
    search_samples: int = Field(1, ge=1, description="calibration samples the scale search runs sub-blocks on")
    search_tokens: int = Field(128, ge=16, description="tokens, evenly spaced over those samples, that the search "
                               "runs a token-wise sub-block (the MLP, a Linear) on; attention gets whole samples")
    clip_tokens: int = Field(512, ge=16, description="input tokens the clipping search uses per Linear")
    clip_skip: list[str] = Field(default_factory=lambda: ["*q_proj", "*k_proj", "*.query", "*.key"],
                                 description="Linears not clipped (their outputs only meet in attention scores)")


class MeanAbs(Statistic):
    """Per input channel sum of |x| and the token count."""

    reductions = {"total": Reduce.SUM, "tokens": Reduce.SUM}

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.tokens = 0

    def add(self, total: torch.Tensor, tokens: int) -> None:
        self.total = total.clone() if self.total is None else self.total + total  # never shared: reduced in place
        self.tokens += tokens

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.tokens, 1)


class AWQPlugin(Smoother):
    name = "awq"
    Config = AWQConfig
    requires_calibration_data = True
    aliases = {"msmodelslim.w_method": "AWQ", "msmodelslim.anti_method": "m3"}

    def __init__(self, config: AWQConfig):
        self.config = config
        self._last: tuple[torch.Tensor, torch.Tensor, int] | None = None  # q/k/v see one tensor: sum it once

    def observes(self, plan) -> bool:
        return False  # its statistics come from its own smoothing pass

    @hookimpl
    def observe(self, ctx, name, module, inputs, output):
        if self._last is None or self._last[0] is not inputs:
            x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
            self._last = (inputs, x.abs().sum(0), x.shape[0])
        ctx.state(self.name).setdefault(name, MeanAbs()).add(*self._last[1:])

    @hookimpl
    def smooth(self, ctx):
        self._last = None
        stats = ctx.state(self.name)
        guard = smoothing.Guard(ctx, self.name)
        for unit in smoothing.units(ctx, all_linears=True):
            if not any(ctx.plan(n) is not None and n in stats for n in unit.targets):
                continue
            s = self._best_scales(ctx, unit, stats)
            if s is not None:
                guard.apply(unit, lambda unit=unit, s=s: smoothing.scale_unit(unit, s))
        guard.report()
        if self.config.clip:
            names = [n for n in ctx.quantized_names() if not any(name_matches(p, n) for p in self.config.clip_skip)]
            inputs = ctx.linear_inputs(names, self.config.search_samples, self.config.clip_tokens)
            for name, x in inputs.items():
                self._clip(ctx, name, x)

    # -- scaling ------------------------------------------------------------------------------------------

    def _search_inputs(self, ctx, block: str):
        return _token_sample(ctx.block_inputs(block, self.config.search_samples), self.config.search_tokens)

    @torch.no_grad()
    def _best_scales(self, ctx, unit, stats) -> torch.Tensor | None:
        x_mean = torch.stack([stats[n].mean for n in unit.targets if n in stats]).mean(0)
        x_mean = unit.reduce(x_mean, "mean")
        w_mean = unit.reduce(self._weight_mean(ctx, unit), "mean")
        block = _block_of(ctx, list(unit.targets))
        inputs = self._search_inputs(ctx, block)
        reference = ctx.run_block(block, inputs)
        originals = {n: t.weight.data for n, t in unit.targets.items()}
        try:  # each candidate puts new tensors in the targets' weights; the originals, never written, come back
            best, best_loss = None, self._loss(ctx, unit, block, inputs, reference, originals, None)
            for step in range(self.config.n_grid):
                ratio = step / self.config.n_grid
                s = x_mean.clamp_min(1e-4).pow(ratio)
                if self.config.duo_scaling:
                    s = s / w_mean.clamp_min(1e-4).pow(1 - ratio)
                s = s / (s.max() * s.min()).sqrt()
                s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
                loss = self._loss(ctx, unit, block, inputs, reference, originals, s)
                if loss < best_loss:
                    best, best_loss = s, loss
        finally:
            for name, target in unit.targets.items():
                target.weight.data = originals[name]
        log.debug("%s: %s -> %s best loss %.3e (%s)", self.name, unit.source, block, best_loss,
                  "scaled" if best is not None else "no scaling")
        return best

    def _weight_mean(self, ctx, unit) -> torch.Tensor:
        """Per input channel, the mean over output rows of |w| / max|w| of its group (AWQ's weight salience)."""
        means = []
        for name, target in unit.targets.items():
            w = target.weight.detach().float().abs()
            args = ctx.plan(name).scheme.weights if ctx.plan(name) else None
            group = effective_group_size(_group_size(args, ctx.grid(name)) if args is not None else None, w.shape[1])
            groups = num_groups(w.shape[1], group)
            pad = groups * group - w.shape[1]
            padded = torch.nn.functional.pad(w, (0, pad)).view(w.shape[0], groups, group)
            normalized = padded / padded.amax(-1, keepdim=True).clamp_min(1e-8)
            means.append(normalized.reshape(w.shape[0], -1)[:, : w.shape[1]].mean(0))
        return torch.stack(means).mean(0)

    def _loss(self, ctx, unit, block, inputs, reference, originals, s) -> float:
        """The sub-block's output error with the targets scaled by s (None: unscaled) and fake-quantized; the
        targets keep those weights (the caller restores them)."""
        for name, target in unit.targets.items():
            args = ctx.plan(name).scheme.weights if ctx.plan(name) else None
            if args is None:
                continue
            w = originals[name].float()
            if s is None:
                fake = fake_quantize_weight(w, args, grid=ctx.grid(name))
            else:
                cols = unit.expand(s).to(w.device)
                fake = fake_quantize_weight(w * cols, args, grid=ctx.grid(name)).div_(cols)  # new: divided in place
            target.weight.data = fake.to(originals[name].dtype)
        outs = ctx.run_block(block, inputs)
        num = sum(float((o - r).float().pow(2).sum()) for o, r in zip(outs, reference, strict=True))
        return num / max(sum(r.numel() for r in reference), 1)

    # -- clipping -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def _clip(self, ctx, name: str, x: torch.Tensor) -> None:
        args, grid = ctx.plan(name).scheme.weights, ctx.grid(name)
        linear = ctx.module(name)
        x = x.float()
        w = linear.weight.detach().float()
        cols = w.shape[1]
        group = effective_group_size(_group_size(args, grid), cols)
        groups = num_groups(cols, group)
        pad = groups * group - cols  # a shorter last group: zero columns, which add nothing to any output

        def grouped(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, pad)).view(t.shape[0], groups, group)

        wg = grouped(w)
        output_error = _group_output_error(grouped(x))
        org_max = wg.abs().amax(-1, keepdim=True)
        best_err = torch.full((w.shape[0], groups), float("inf"), device=w.device)
        best_max = org_max.clone()
        clipped = torch.empty_like(wg)
        for step in range(int(self.config.max_shrink * self.config.n_grid)):
            max_val = org_max * (1 - step / self.config.n_grid)
            torch.clamp(wg, -max_val, max_val, out=clipped)
            fake = fake_quantize_weight(clipped.view(w.shape[0], -1)[:, :cols], args, grid=grid)
            err = output_error((grouped(fake) if pad else fake.view_as(wg)).sub_(wg))
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better.unsqueeze(-1), max_val, best_max)
        clipped = torch.clamp(wg, -best_max, best_max).reshape(w.shape[0], -1)[:, :cols]
        linear.weight.data.copy_(clipped.to(linear.weight.dtype))


def _group_size(args, grid) -> int | None:
    """Input channels per scale as the plan quantizes them: the grid's (K-quants, NF4 blocks) or the scheme's."""
    if grid is not None:
        return grid.group_size(args)
    return args.group_size if args.strategy == "group" else None


def _group_output_error(xg: torch.Tensor):
    """For inputs xg [tokens, groups, k], a function of a weight change d [rows, groups, k] giving, per row and group,
    the mean over tokens of (x_g . d_g)^2: the squared error that group adds to the Linear's output. With groups no
    longer than the tokens it is the quadratic form d_g^T (X_g^T X_g / n) d_g, which never builds the
    [tokens, rows, groups] products."""
    tokens, groups, k = xg.shape
    if k <= tokens:
        gram = torch.einsum("ngk,ngl->gkl", xg, xg) / tokens

        def error(d: torch.Tensor) -> torch.Tensor:
            dg = d.transpose(0, 1)  # [groups, rows, k]
            return torch.bmm(dg, gram).mul_(dg).sum(-1).t()
    else:
        xt = xg.transpose(0, 1)  # [groups, tokens, k]

        def error(d: torch.Tensor) -> torch.Tensor:
            return torch.bmm(xt, d.permute(1, 2, 0)).pow_(2).mean(1).t()
    return error


def _token_sample(inputs, tokens: int):
    """A sub-block called with one tensor and nothing else (an MLP, a Linear: no mask, no positions) treats each token
    on its own, so `tokens` evenly spaced rows of all its inputs judge it as well as the whole samples, at a fraction
    of the cost. Anything else (attention) keeps its whole samples."""
    if not inputs or any(len(args) != 1 or kwargs for args, kwargs in inputs):
        return inputs
    x = torch.cat([args[0].reshape(-1, args[0].shape[-1]) for args, _ in inputs])
    if x.shape[0] <= tokens:
        return inputs
    rows = torch.linspace(0, x.shape[0] - 1, tokens, device=x.device).long()
    return [((x[rows].unsqueeze(0),), {})]


def _block_of(ctx, targets: list[str]) -> str:
    """The sub-block whose output judges a unit, relative to the layer: the Linear itself, or the deepest module
    holding all targets ("" when only the whole layer does)."""
    relative = [t[len(ctx.prefix) + 1:].split(".") for t in targets]
    if len(relative) == 1:
        return ".".join(relative[0])
    common = []
    for level in zip(*relative, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)
