"""Several processes on torch.distributed: each calibrates on its share of the samples, statistics are reduced.

Launched with `torchrun --nproc-per-node N slimquant quantize ...` (or any launcher that sets WORLD_SIZE, RANK,
MASTER_ADDR and MASTER_PORT). Each process takes samples rank, rank + N, ...; after every observation pass the
layer's `slimquant.stats.Statistic` objects are combined as their classes declare (sums add, ranges take min/max).
Each Linear is then quantized once: whole clusters of Linears (those reading one input) on one process each,
assigned by estimated cost and broadcast (`assign_owners`, `broadcast_qweight`), when there are at least two clusters
per process; otherwise a weight algorithm that declares `row_parallel` quantizes only this process's block of each
Linear's rows (`ctx.row_block`) and the blocks are gathered. Every process ends with the same quantized model. Only
rank 0 saves and reports.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from slimquant.errors import RecipeError
from slimquant.quant.qweight import QuantizedWeight
from slimquant.stats import Reduce, Statistic

log = logging.getLogger(__name__)

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
_OPS = {Reduce.SUM: dist.ReduceOp.SUM, Reduce.MIN: dist.ReduceOp.MIN, Reduce.MAX: dist.ReduceOp.MAX}


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    size: int = 1

    @property
    def several(self) -> bool:
        return self.size > 1

    def row_block(self, rows: int) -> slice:
        """This process's contiguous block of `rows` (the first ones get one more when they do not divide)."""
        base, extra = divmod(rows, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def block_sizes(self, rows: int) -> list[int]:
        base, extra = divmod(rows, self.size)
        return [base + (r < extra) for r in range(self.size)]


def current() -> Ranks:
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def launched_with_several() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: torch.device) -> Ranks:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA, hccl on NPU)."""
    if not launched_with_several() or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise RecipeError("this torch build has no torch.distributed: run a single process")
    backend = BACKENDS.get(device.type)
    if backend is None:
        raise RecipeError(f"no torch.distributed backend for device {device.type!r}")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    ranks = current()
    log.info("process %d of %d (%s)", ranks.rank, ranks.size, backend)
    return ranks


def leave(ranks: Ranks, finished: bool) -> None:
    """Leave the process group `join` made: a process that exits with it still up may abort in the backend's
    teardown ("terminate called without an active exception") after its work is done. When every process `finished`
    its job, they wait for each other first, so that none tears its connections down while another still runs."""
    if ranks.several and dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def reduce_statistic(stat: Statistic, device: torch.device, owner: str) -> None:
    """Combine this process's copy of `stat` with every other process's, in place."""
    for attr, op in stat.reductions.items():
        if op not in _OPS:
            raise RecipeError(f"plugin {owner!r} keeps a {type(stat).__name__} whose {attr!r} combines by "
                              f"{op.value}: not supported on several processes yet; run a single process")
        value = getattr(stat, attr)
        if value is None:
            raise RecipeError(f"plugin {owner!r}: {type(stat).__name__}.{attr} is empty on process "
                              f"{dist.get_rank()} (did its calibration share reach this Linear?); run a single "
                              "process or give more samples")
        if torch.is_tensor(value):
            reduced = value.contiguous()
            dist.all_reduce(reduced, _OPS[op])
            setattr(stat, attr, reduced)
        else:
            number = torch.tensor([value], dtype=torch.float64, device=device)
            dist.all_reduce(number, _OPS[op])
            setattr(stat, attr, type(value)(number.item()))


def gather_rows(block: QuantizedWeight, rows: int, ranks: Ranks, owner: str, name: str) -> QuantizedWeight:
    """Every process's row block of one Linear's quantized weight, stacked in rank order."""
    if (block.outliers is not None or block.scale_quant is not None or block.two_level is not None
            or block.extras):
        raise RecipeError(f"{name}: plugin {owner!r} is row_parallel but returned outliers, quantized scales, "
                          "two-level scales or extras, which cannot be gathered by rows yet")
    sizes = ranks.block_sizes(rows)
    parts = {"codes": block.codes, "scale": block.scale, "zero": block.zero}
    full = {}
    for key, tensor in parts.items():
        if tensor is None:
            full[key] = None
            continue
        padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[: tensor.shape[0]] = tensor
        pieces = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(pieces, padded)
        full[key] = torch.cat([p[:n] for p, n in zip(pieces, sizes, strict=True)])
    return QuantizedWeight(codes=full["codes"], scale=full["scale"], zero=full["zero"], bits=block.bits,
                           group_size=block.group_size, g_idx=block.g_idx, codebook=block.codebook,
                           sparsity=block.sparsity, codebook_name=block.codebook_name)


def assign_owners(clusters: list[list[str]], costs: list[float], ranks: Ranks) -> dict[str, int]:
    """Each cluster of Linears to one process: costliest first, each to the process with the least work so far."""
    load = [0.0] * ranks.size
    owners: dict[str, int] = {}
    for i in sorted(range(len(clusters)), key=lambda i: -costs[i]):
        rank = min(range(ranks.size), key=lambda r: load[r])
        load[rank] += costs[i]
        owners.update((name, rank) for name in clusters[i])
    return owners


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def broadcast_qweight(qweight: QuantizedWeight | None, src: int, ranks: Ranks, device: torch.device, owner: str,
                      name: str) -> QuantizedWeight:
    """Linear `name`'s quantized weight, made by process `src` (which passes it; the others pass None), on every
    process. Codes, scales, zero points and g_idx travel; weights with more than that are refused on every process."""
    header = torch.zeros(9, dtype=torch.int64, device=device)
    if ranks.rank == src:
        plain = (qweight.outliers is None and qweight.scale_quant is None and qweight.two_level is None
                 and not qweight.extras and qweight.codebook is None and qweight.sparsity is None)
        rows, cols = qweight.codes.shape
        zero_dtype = -1 if qweight.zero is None else _DTYPES.index(qweight.zero.dtype)
        header = torch.tensor([int(plain), rows, cols, qweight.scale.shape[1], _DTYPES.index(qweight.scale.dtype),
                               zero_dtype, qweight.g_idx is not None, qweight.bits, qweight.group_size or 0],
                              dtype=torch.int64, device=device)
    dist.broadcast(header, src)
    plain, rows, cols, groups, scale_dtype, zero_dtype, has_g_idx, bits, group_size = header.tolist()
    if not plain:
        raise RecipeError(f"{name}: plugin {owner!r} returned outliers, quantized scales, two-level scales, a "
                          "codebook, sparsity or extras, which cannot be sent between processes yet; run a single "
                          "process")
    if ranks.rank == src:
        codes, scale, zero, g_idx = (None if t is None else t.to(device).contiguous()
                                     for t in (qweight.codes, qweight.scale, qweight.zero, qweight.g_idx))
    else:
        codes = torch.empty(rows, cols, dtype=torch.int8, device=device)
        scale = torch.empty(rows, groups, dtype=_DTYPES[scale_dtype], device=device)
        zero = None if zero_dtype < 0 else torch.empty(rows, groups, dtype=_DTYPES[zero_dtype], device=device)
        g_idx = torch.empty(cols, dtype=torch.int32, device=device) if has_g_idx else None
    for tensor in (codes, scale, zero, g_idx):
        if tensor is not None:
            dist.broadcast(tensor, src)
    if ranks.rank == src:
        return qweight
    return QuantizedWeight(codes=codes, scale=scale, zero=zero, bits=bits, group_size=group_size or None,
                           g_idx=g_idx)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
