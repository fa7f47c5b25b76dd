"""Equivalent rewrites that smoothers share: move a per-channel scale or shift from a norm (or a Linear) into the
modules its output feeds, so the float layer computes the same function while its activations quantize better.

A smoother reads `units(ctx)` (the layer's subgraphs from `ctx.subgraphs`, resolved to modules), accumulates input
ranges with `record_range` during the observation pass, and rewrites with `scale_unit` / `shift_unit` inside
`Guard.apply`. The guard runs the layer on one calibration batch after each rewrite and undoes, with a warning
naming the subgraph, any rewrite that changed the output: the structure did not allow it (a post-norm shortcut
whose residual is the norm output, a router that cannot take a bias, ...). The rest of the model is still smoothed
and quantized.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from slimquant.runtime.layer_inputs import first_sample, leading_tokens
from slimquant.runtime.plan import name_matches
from slimquant.stats import Reduce, Statistic

log = logging.getLogger(__name__)

GUARD_TOKENS = 64  # tokens of the sample a rewrite is checked on


class CannotRewrite(Exception):
    """The subgraph's structure does not allow this rewrite."""


# -- statistics --------------------------------------------------------------------------------------------------


class ChannelRange(Statistic):
    """Per-channel min and max of a Linear's input, batch by batch.

    sampler "max": the running extremes over all batches (SmoothQuant; PaddleSlim's MultiStepSampler); copies from
    several processes take the extremes. sampler "ema": a bias-corrected exponential moving average of each batch's
    extremes (PaddleSlim's EMASampler), so that one unusual batch weighs less; copies average, weighted by steps.
    """

    reductions = {"lo": Reduce.MIN, "hi": Reduce.MAX, "steps": Reduce.SUM}

    def __init__(self, sampler: str = "max", decay: float = 0.98):
        if sampler not in ("max", "ema"):
            raise ValueError(f"sampler must be 'max' or 'ema', got {sampler!r}")
        self.sampler, self.decay, self.steps = sampler, decay, 0
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        lo, hi = x.amin(0).float(), x.amax(0).float()
        if self.lo is None:
            self.lo, self.hi = (lo, hi) if self.sampler == "max" else ((1 - self.decay) * lo, (1 - self.decay) * hi)
        elif self.sampler == "max":
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        else:
            d = self.decay
            self.lo, self.hi = d * self.lo + (1 - d) * lo, d * self.hi + (1 - d) * hi
        self.steps += 1

    def merge(self, other: ChannelRange) -> None:
        if self.sampler == "max" or self.lo is None or other.lo is None:
            return super().merge(other)
        (lo_a, hi_a), (lo_b, hi_b) = self.span(), other.span()
        w = self.steps / (self.steps + other.steps)
        self.steps += other.steps
        correction = 1 - self.decay ** self.steps
        self.lo = (w * lo_a + (1 - w) * lo_b) * correction
        self.hi = (w * hi_a + (1 - w) * hi_b) * correction

    def span(self) -> tuple[torch.Tensor, torch.Tensor]:
        correction = 1.0 if self.sampler == "max" else 1 - self.decay ** self.steps
        return self.lo / correction, self.hi / correction


def record_range(ctx, plugin: str, name: str, x: torch.Tensor, sampler: str = "max", decay: float = 0.98) -> None:
    """The `observe` body every smoother shares: per-channel input ranges in the smoothing pass."""
    if ctx.phase == "smooth":
        ctx.state(plugin).setdefault(name, ChannelRange(sampler, decay)).update(x)


def absmax(span: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    lo, hi = span
    return torch.maximum(lo.abs(), hi.abs())


def migration_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-channel scales s = max|X|^alpha / max|W|^(1 - alpha) that, dividing the activations and multiplying the
    weights, move a share `alpha` of the range from one to the other; 1 where a channel is never used."""
    a, w = act_absmax.float(), w_absmax.float().to(act_absmax.device)
    s = (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)
    return torch.where((a > 0) & (w > 0) & torch.isfinite(s), s, torch.ones_like(s))


# -- subgraphs as modules ----------------------------------------------------------------------------------------


@dataclass
class Unit:
    """A source (norm, or the Linear of an exact pair) whose output channels feed `targets` and `extra` (modules
    left in float that read the same tensor, such as MoE routers: a rewrite must update them as well).

    Grouped-query attention: o_proj has `repeat` query heads per v_proj head, so per-channel factors live on the
    v_proj channels (`head_dim` each) and are repeated onto o_proj's input channels.
    """

    source: str
    kind: str  # "norm", "attention" (v -> o) or "gated" (up -> down)
    module: nn.Module
    targets: dict[str, nn.Linear]
    extra: dict[str, nn.Module] = field(default_factory=dict)
    repeat: int = 1
    head_dim: int = 0

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        """Source channels -> the targets' input channels."""
        if self.repeat == 1:
            return t
        return t.reshape(-1, 1, self.head_dim).expand(-1, self.repeat, -1).reshape(-1)

    def reduce(self, t: torch.Tensor, op: str = "amax") -> torch.Tensor:
        """The targets' input channels -> source channels (max or min over the query heads of each kv head)."""
        if self.repeat == 1:
            return t
        return getattr(t.reshape(-1, self.repeat, self.head_dim), op)(1).reshape(-1)

    def input_span(self, ranges: dict[str, ChannelRange]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per source channel (min, max) of what the targets read; MoE experts each see some of the tokens."""
        spans = [ranges[n].span() for n in self.targets if n in ranges and ranges[n].steps]
        if not spans:
            return None
        lo = torch.stack([s[0] for s in spans]).amin(0)
        hi = torch.stack([s[1] for s in spans]).amax(0)
        return self.reduce(lo, "amin"), self.reduce(hi, "amax")

    def weight_absmax(self) -> torch.Tensor:
        """Per source channel, the largest |weight| in that input column over all targets."""
        w = torch.stack([t.weight.detach().abs().amax(0).float() for t in self.targets.values()]).amax(0)
        return self.reduce(w, "amax")

    def target_weight(self) -> torch.Tensor:
        """All targets' weights stacked along the output dimension, float32."""
        return torch.cat([t.weight.detach().float() for t in self.targets.values()])


def _head_dim(ctx, linear_name: str) -> int:
    parent = ctx.module(linear_name.rpartition(".")[0])
    hd = getattr(parent, "head_dim", None) or getattr(getattr(parent, "config", None), "head_dim", None)
    return int(hd) if hd else 0


def units(ctx, all_linears: bool = False, skip: list[str] = ()) -> list[Unit]:
    """The layer's rewritable subgraphs: norm -> Linears, and with `all_linears` also v -> o and up -> down.
    `skip` (exact names, globs, 're:' patterns) leaves out a subgraph whose source or any target matches."""
    out = []
    for sg in ctx.subgraphs:
        if (sg.kind != "norm" and not all_linears) or any(name_matches(p, n) for p in skip
                                                             for n in [sg.source, *sg.targets]):
            continue
        targets = {n: ctx.module(n) for n in sg.targets}
        unit = Unit(sg.source, sg.kind, ctx.module(sg.source), targets, {n: ctx.module(n) for n in sg.extra})
        if sg.kind == "attention":
            produced, read = unit.module.out_features, next(iter(targets.values())).in_features
            if produced != read:
                unit.repeat, unit.head_dim = read // produced, _head_dim(ctx, sg.source)
                if read % produced or not unit.head_dim or produced % unit.head_dim:
                    log.warning("%s -> %s: cannot map %d attention channels onto %d; left alone", sg.source,
                                sg.targets[0], produced, read)
                    continue
        out.append(unit)
    return out


# -- the rewrites ------------------------------------------------------------------------------------------------


def norm_flavor(norm: nn.Module) -> str:
    """"scale" for y = n(x) * w (+ b); "offset" for y = n(x) * (1 + w) (+ b), as Gemma's RMSNorm. Probed by running
    a copy with zero weight and bias: a scale norm then outputs zeros."""
    probe = copy.deepcopy(norm).to("cpu", torch.float32)
    with torch.no_grad():
        probe.weight.zero_()
        if getattr(probe, "bias", None) is not None:
            probe.bias.zero_()
        x = torch.randn(2, probe.weight.shape[-1], generator=torch.Generator().manual_seed(0))
        return "scale" if float(probe(x).abs().max()) < 1e-6 else "offset"


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


@torch.no_grad()
def scale_unit(unit: Unit, s: torch.Tensor) -> None:
    """Divide the source's output channel c by s[c]; multiply the input columns that read it by s[c]."""
    src = unit.module
    s = s.float().to(src.weight.device)
    if unit.kind == "norm":
        w = src.weight.float()
        _set(src.weight, (1 + w) / s - 1 if norm_flavor(src) == "offset" else w / s)
    else:
        _set(src.weight, src.weight.float() / s[:, None])
    if getattr(src, "bias", None) is not None:
        _set(src.bias, src.bias.float() / s)
    for lin, cols in [(t, unit.expand(s)) for t in unit.targets.values()] + [(m, s) for m in unit.extra.values()]:
        _set(lin.weight, lin.weight.float() * cols.to(lin.weight.device))


class _AddBias:
    """Mixed into a norm class that has no bias: y = norm(x) + bias. The state dict keeps the norm's own names."""

    def forward(self, x, *args, **kwargs):
        out = super().forward(x, *args, **kwargs)
        return out + self.bias.to(out.dtype)


_BIASED: dict[type, type] = {}


def ensure_bias(module: nn.Module) -> nn.Parameter:
    """The module's bias, created as zeros where it has none (also used by the loader for shifted norms)."""
    if getattr(module, "bias", None) is not None:
        return module.bias
    ref = module.weight
    size = ref.shape[0] if isinstance(module, nn.Linear) else ref.shape[-1]
    bias = nn.Parameter(torch.zeros(size, dtype=ref.dtype, device=ref.device), requires_grad=False)
    if isinstance(module, nn.Linear) or isinstance(module, nn.LayerNorm):
        module.bias = bias  # their forward already reads self.bias
    else:
        cls = type(module)
        module.__class__ = _BIASED.setdefault(cls, type(f"{cls.__name__}WithBias", (_AddBias, cls), {}))
        module.register_parameter("bias", bias)
    return module.bias


@torch.no_grad()
def shift_unit(unit: Unit, z: torch.Tensor) -> None:
    """Subtract z[c] from the source's output channel c and add W @ z into the bias of every module reading it.

    Exact through a norm, and through v -> o because attention weights sum to one; not through a gated activation.
    Norms and Linears without a bias get one (RMSNorm-type norms through a subclass that adds it).
    """
    if unit.kind == "gated":
        raise CannotRewrite("a shift does not pass through the gated activation")
    for name, m in unit.extra.items():
        if not isinstance(m, nn.Linear):
            raise CannotRewrite(f"{name} ({type(m).__name__}) reads it too and has no bias to absorb the shift")
    z = z.float().to(unit.module.weight.device)
    bias = ensure_bias(unit.module)
    _set(bias, bias.float() - z)
    for lin, zz in [(t, unit.expand(z)) for t in unit.targets.values()] + [(m, z) for m in unit.extra.values()]:
        b = ensure_bias(lin)
        _set(b, b.float() + lin.weight.float() @ zz.to(lin.weight.device))


# -- checked application -----------------------------------------------------------------------------------------


def _snapshot(unit: Unit) -> list:
    saved = []
    for m in [unit.module, *unit.targets.values(), *unit.extra.values()]:
        params = {k: (None if p is None else p.detach().clone()) for k, p in m._parameters.items()}
        saved.append((m, m.__class__, params))
    return saved


def _restore(saved: list) -> None:
    for m, cls, params in saved:
        m.__class__ = cls
        for k in list(m._parameters):
            if k not in params:
                del m._parameters[k]
        for k, p in params.items():
            if p is None:
                m._parameters[k] = None
            elif m._parameters.get(k) is None:
                m._parameters[k] = nn.Parameter(p, requires_grad=False)
            else:
                m._parameters[k].data.copy_(p)


class Guard:
    """Applies rewrites to one decoder layer, each checked against the layer's output on the first GUARD_TOKENS
    tokens of one calibration sample (in the model's dtype, so that an exact rewrite stays within rounding of it): a
    rewrite that is not exact shows on any token."""

    def __init__(self, ctx, algorithm: str):
        self.ctx, self.algorithm = ctx, algorithm
        dtype = next(ctx.layer.parameters()).dtype
        self.tolerance = 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2
        self.check_input = first_sample(ctx.inputs[0])
        self.reference = ctx.run_layer([self.check_input])[0].float()
        self._shorten()
        self.applied: list[str] = []

    def _shorten(self) -> None:
        """Check on the sample's first tokens from now on, if the layer gives the first rows of its full output on
        them (a causal layer whose inputs leading_tokens cut correctly)."""
        short = leading_tokens(self.check_input, GUARD_TOKENS)
        if short is self.check_input:
            return
        expected = self.reference[..., :GUARD_TOKENS, :]
        try:
            out = self.ctx.run_layer([short])[0].float()
        except (RuntimeError, ValueError, IndexError):  # a dimension cut that was not the tokens'
            return
        if out.shape == expected.shape and _relative_error(out, expected) <= self.tolerance / 100:
            self.check_input, self.reference = short, out

    def apply(self, unit: Unit, rewrite: Callable[[], None]) -> bool:
        saved = _snapshot(unit)
        try:
            rewrite()
        except CannotRewrite as exc:
            _restore(saved)
            log.warning("%s: %s -> %s left unchanged: %s", self.algorithm, unit.source, _names(unit), exc)
            return False
        err = _relative_error(self.ctx.run_layer([self.check_input])[0].float(), self.reference)
        if not err <= self.tolerance:
            _restore(saved)
            log.warning("%s: %s -> %s left unchanged: the rewrite changed the output of %s (relative error %.1e), "
                        "so its output also reaches something else (e.g. a post-norm shortcut)", self.algorithm,
                        unit.source, _names(unit), self.ctx.prefix, err)
            return False
        self.applied.append(unit.source)
        return True

    def report(self) -> None:
        log.info("%s %s: rewrote %d subgraph(s): %s", self.algorithm, self.ctx.prefix, len(self.applied),
                 ", ".join(a[len(self.ctx.prefix) + 1:] for a in self.applied) or "none")


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out - reference).norm() / reference.norm().clamp_min(1e-30))


def _names(unit: Unit) -> str:
    leaves = ",".join(sorted({n.rsplit(".", 1)[-1] for n in unit.targets}))
    return leaves if len(unit.targets) <= 4 else f"{len(unit.targets)} Linears ({leaves})"
