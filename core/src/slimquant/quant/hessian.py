"""The input Hessian H = 2/n * sum_t x_t x_t^T of a Linear and its damped inverse factor (GPTQ, SparseGPT)."""

from __future__ import annotations

import logging
import weakref

import torch

from slimquant.stats import Reduce, Statistic

log = logging.getLogger(__name__)
DAMP_GROWTH = 10.0
MAX_DAMP_TRIES = 5  # damp_percent, x10, x100, ... before falling back to the diagonal of H


class HessianAccumulator(Statistic):
    """sum_t x_t x_t^T and the token count; `hessian` is 2/n times the sum. float32 unless told otherwise.

    The sum is symmetric, so only its upper block triangle is accumulated (row blocks of BLOCK columns, each times
    the columns from its own on: about a third fewer flops on wide inputs); `hessian` mirrors it. bfloat16 inputs
    (from calibration passes in bfloat16, see slimquant.runtime.precision) are multiplied in bfloat16, 3x faster
    on CPUs with native bfloat16: each call's block sums are rounded to bfloat16 once (2^-9 relative) before
    they are added up in float32."""

    reductions = {"sum": Reduce.SUM, "tokens": Reduce.SUM}
    BLOCK = 256

    def __init__(self, in_features: int, device=None, dtype: torch.dtype = torch.float32):
        self.sum = torch.zeros(in_features, in_features, device=device, dtype=dtype)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        self.tokens += x.shape[0]
        n = x.shape[1]
        half = x.dtype == torch.bfloat16 and self.sum.dtype == torch.float32  # float16 sums would overflow
        if not half:
            x = x.to(self.sum.dtype)
        for start in range(0, n, self.BLOCK):
            end = min(start + self.BLOCK, n)
            if half:  # the products are exact and sum in float32 inside the matmul, which rounds its result once
                self.sum[start:end, start:] += (x[:, start:end].t() @ x[:, start:]).float()
            else:
                self.sum[start:end, start:].addmm_(x[:, start:end].t(), x[:, start:])

    @property
    def hessian(self) -> torch.Tensor:
        upper = torch.triu(self.sum)
        return (upper + torch.triu(self.sum, 1).t()) * (2.0 / max(self.tokens, 1))


def drop_dead_inputs(hessian: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of H and W where inputs that never fired (H[i, i] == 0) get H[i, i] = 1 and a zero weight column."""
    h, w = hessian.clone(), weight.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return h, w


def inverse_hessian_factor(hessian: torch.Tensor, damp_percent: float, name: str = "") -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, so that U^T U = (H + damp I)^-1.

    The damping grows tenfold while a factorization fails (a singular or badly conditioned H); if it never
    succeeds, the diagonal of H alone is used, which never fails and reduces GPTQ to rounding to nearest.
    """
    diag = torch.diagonal(hessian)
    mean = diag.mean().clamp_min(1e-12)
    damp = damp_percent
    for attempt in range(MAX_DAMP_TRIES):
        damped = hessian.clone()
        damped.diagonal().add_(damp * mean)
        # With J the order reversal and L L^T = J H J, U = J L^-1 J: one factorization and one triangular inverse
        lower, info = torch.linalg.cholesky_ex(damped.flip(0, 1))
        if info == 0:
            eye = torch.eye(len(lower), dtype=lower.dtype, device=lower.device)
            upper = torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)
            if torch.isfinite(upper).all():
                if attempt:
                    log.info("%s: Hessian not positive definite; damped with %.3g x mean(diag H)", name, damp)
                return upper
        damp *= DAMP_GROWTH
    log.warning("%s: Hessian stays singular up to damping %.3g x mean(diag H); using its diagonal only",
                name, damp / DAMP_GROWTH)
    return torch.diag((diag.clamp_min(0) + damp_percent * mean).rsqrt())


def accumulate_shared(state: dict, name: str, in_features: int, inputs: torch.Tensor) -> None:
    """Add `inputs` to the Hessian of Linear `name` in a plugin's layer state. Linears that read the very same
    tensor (q/k/v, gate/up) share one accumulator, fed once."""
    last = state.get("last input")  # (a weak reference to the last input, its accumulator)
    if last is not None and last[0]() is inputs:
        state.setdefault(name, last[1])
        if state[name] is last[1]:
            return
    if name not in state:
        state[name] = HessianAccumulator(in_features, device=inputs.device)
    state[name].add(inputs)
    state["last input"] = (weakref.ref(inputs), state[name])
