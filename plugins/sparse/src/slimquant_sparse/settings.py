"""What one pruning + quantization run of a Linear needs to know, as plain data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SparseSettings:
    bits: int = 8
    symmetric: bool = True
    signed: bool = True  # symmetric scales: see slimquant.quant.math.weight_range_to_qparams
    group_size: int | None = None  # None: per output channel (or per tensor when per_tensor)
    per_tensor: bool = False
    sparsity: float = 0.5  # unstructured: the fraction of weights pruned (ignored for N:M)
    pattern: str = "unstructured"  # or "2:4", "4:8": at most N nonzeros in every M consecutive input columns
    blocksize: int = 128
    percdamp: float = 0.01
    fraction: float = 0.0  # at most this fraction of the weights kept as 16-bit outliers (0: none)
    sigma_factor: float = 3.0  # an outlier lies over sigma_factor standard deviations from its row's mean

    @property
    def n_m(self) -> tuple[int, int] | None:
        if self.pattern == "unstructured":
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    @property
    def prunes(self) -> bool:
        return self.n_m is not None or self.sparsity > 0
