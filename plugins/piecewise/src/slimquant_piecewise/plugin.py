"""`piecewise`: PaddleSlim's PieceWiseSearch, a searched SmoothQuant.

One alpha for a whole activation is a compromise: moderate channels want little migration, outlier channels a lot,
and where weight and activation outliers share a channel the formula over-scales the weight. So the channels of
each subgraph are split into `k_piece` pieces by their activation magnitude (1-D k-means on max|X|), and piece by
piece, smallest first, the factor is searched: every alpha on the grid [search_alpha_min, search_alpha_max] (the
SmoothQuant formula on that piece) and every constant factor on [search_scale_min, search_scale_max]. The loss is
the mean squared error between the float output of the subgraph's Linears and their output with quantized
(bits_length) activations and weights, on a bounded random sample of calibration tokens cached while observing.
Pieces not searched yet keep factor 1; with `search_piece` every k from 1 to k_piece is tried.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from slimquant.sdk import Smoother, TokenSample, hookimpl, smoothing

log = logging.getLogger(__name__)


class PieceWiseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["piecewise"] = "piecewise"
    k_piece: int = Field(1, ge=1, le=16, description="pieces the channels are split into by magnitude")
    search_piece: bool = Field(False, description="also search the number of pieces, 1..k_piece")
    search_alpha_min: float = Field(0.2, ge=0.0, le=1.0)
    search_alpha_max: float = Field(0.8, ge=0.0, le=1.0)
    search_alpha_step: float = Field(0.05, gt=0.0, description="PaddleSlim uses 0.01")
    search_scale_min: float = Field(1.0, gt=0.0, description="constant factors tried on a piece (1 = leave it)")
    search_scale_max: float = Field(5.0, gt=0.0)
    search_scale_step: float = Field(0.5, gt=0.0)
    bits_length: int = Field(8, ge=2, le=8, description="bits of the simulated quantization in the loss")
    weight_quant_method: Literal["abs_max", "abs_max_channel_wise"] = "abs_max_channel_wise"
    act_quant_method: Literal["abs_max", "abs_max_token"] = Field(
        "abs_max", description="abs_max: one static scale per tensor; abs_max_token: dynamic per token")
    loss_function: Literal["mse"] = "mse"
    smooth_all_linears: bool = Field(True, description="also v_proj -> o_proj and up_proj -> down_proj")
    sample_tokens: int = Field(512, ge=16, description="calibration tokens cached per Linear for the loss")
    sampler: Literal["max", "ema"] = "max"
    ema_decay: float = Field(0.98, gt=0.0, lt=1.0)
    skip: list[str] = Field(default_factory=list, description="leave alone subgraphs touching these names (globs)")

    @model_validator(mode="after")
    def _ranges(self) -> PieceWiseConfig:
        if self.search_alpha_min > self.search_alpha_max or self.search_scale_min > self.search_scale_max:
            raise ValueError("search_*_min must not exceed search_*_max")
        return self


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 50) -> torch.Tensor:
    """Labels 0..k-1 of a 1-D k-means on `values`, label order = centroid order (0 = smallest)."""
    v = values.float()
    k = max(1, min(k, int(v.unique().numel())))
    centroids = torch.quantile(v, torch.linspace(0, 1, k + 2, device=v.device)[1:-1])
    for _ in range(iters):
        labels = (v[:, None] - centroids[None, :]).abs().argmin(1)
        new = torch.stack([v[labels == i].mean() if (labels == i).any() else centroids[i] for i in range(k)])
        if torch.allclose(new, centroids):
            break
        centroids = new
    order = centroids.argsort()
    return order.argsort()[(v[:, None] - centroids[None, :]).abs().argmin(1)]


class PieceWiseSearchPlugin(Smoother):
    name = "piecewise"
    Config = PieceWiseConfig
    requires_calibration_data = True  # its scales come from activation ranges
    aliases = {"paddleslim": "PieceWiseSearch"}

    def __init__(self, config: PieceWiseConfig):
        self.config = config

    def observes(self, plan) -> bool:
        return False  # it observes in its own smoothing pass only

    @hookimpl
    def observe(self, ctx, name, module, inputs, output):
        if ctx.phase != "smooth":
            return
        c = self.config
        smoothing.record_range(ctx, self.name, name, inputs, c.sampler, c.ema_decay)
        ctx.state(self.name + ".sample").setdefault(name, TokenSample(c.sample_tokens)).update(inputs)

    @hookimpl
    def smooth(self, ctx):
        ranges, samples = ctx.state(self.name), ctx.state(self.name + ".sample")
        guard = smoothing.Guard(ctx, self.name)
        for unit in smoothing.units(ctx, self.config.smooth_all_linears, self.config.skip):
            span, x = unit.input_span(ranges), self._rows(unit, samples)
            if span is None or x is None:
                continue
            s = self.search(unit.source, x, smoothing.absmax(span), unit.weight_absmax(), unit.target_weight(),
                            unit.expand)
            guard.apply(unit, lambda unit=unit, s=s: smoothing.scale_unit(unit, s))
        guard.report()

    def _rows(self, unit, samples) -> torch.Tensor | None:
        """The cached inputs of the unit: a Linear that sees every token, else all its experts' rows."""
        seen = [n for n in unit.targets if n in samples and samples[n].rows is not None]
        dense = [n for n in seen if ".experts." not in n]
        if dense:
            return samples[dense[0]].rows.float()
        leaf = seen[0].rsplit(".", 1)[-1] if seen else None
        rows = [samples[n].rows for n in seen if n.endswith("." + str(leaf))]
        if not rows:
            return None
        x = torch.cat(rows).float()
        keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[: self.config.sample_tokens]
        return x[keep.to(x.device)]

    # -- the search ------------------------------------------------------------------------------------------------

    def _fake_quant(self, t: torch.Tensor, dim: int | None) -> torch.Tensor:
        qmax = 2 ** (self.config.bits_length - 1) - 1
        m = t.abs().amax() if dim is None else t.abs().amax(dim, keepdim=True)
        scale = (m / qmax).clamp_min(1e-8)
        return (t / scale).round().clamp(-qmax - 1, qmax) * scale

    def loss(self, x, w, ref, cols) -> float:
        c = self.config
        xq = self._fake_quant(x / cols, None if c.act_quant_method == "abs_max" else 1)
        wq = self._fake_quant(w * cols, 1 if c.weight_quant_method == "abs_max_channel_wise" else None)
        return float((xq @ wq.T - ref).pow(2).mean())

    @torch.no_grad()
    def search(self, where, x, act_absmax, w_absmax, w, expand) -> torch.Tensor:
        """The per-channel factors (source channels) of lowest loss; x [tokens, in], w [out, in]."""
        c = self.config
        x, w = x.to(w.device), w
        act_absmax, w_absmax = act_absmax.to(w.device), w_absmax.to(w.device)
        ref = x @ w.T
        alphas = torch.arange(c.search_alpha_min, c.search_alpha_max + 1e-9, c.search_alpha_step).tolist()
        consts = torch.arange(c.search_scale_min, c.search_scale_max + 1e-9, c.search_scale_step).tolist()
        candidates = [smoothing.migration_scales(act_absmax, w_absmax, a) for a in alphas]
        candidates += [torch.full_like(act_absmax, v) for v in consts]
        names = [f"alpha={a:.2f}" for a in alphas] + [f"scale={v:.1f}" for v in consts]
        best_s, best_loss = torch.ones_like(act_absmax), self.loss(x, w, ref, torch.ones_like(x[0]))
        plain = best_loss
        for k in (range(1, c.k_piece + 1) if c.search_piece else [c.k_piece]):
            labels, s, loss, chosen = kmeans_1d(act_absmax, k), torch.ones_like(act_absmax), float("inf"), []
            for piece in range(int(labels.max()) + 1):
                mask = labels == piece
                piece_best = (float("inf"), 0)
                for i, cand in enumerate(candidates):
                    trial = torch.where(mask, cand, s)
                    trial_loss = self.loss(x, w, ref, expand(trial))
                    if trial_loss <= piece_best[0]:
                        piece_best = (trial_loss, i)
                loss, s = piece_best[0], torch.where(mask, candidates[piece_best[1]], s)
                chosen.append(names[piece_best[1]])
            if loss < best_loss:
                best_s, best_loss = s, loss
            log.debug("%s: k=%d pieces %s, loss %.3e", where, k, chosen, loss)
        log.debug("%s: loss %.3e without smoothing, %.3e searched", where, plain, best_loss)
        return best_s
